"""`geoscout run`: the whole job, from a competition folder to a submission and a report.

validate -> extract -> per preset: each ensemble member (cross-fitted) -> the ensemble (weights,
regressor and decoding fitted on out-of-fold outputs) -> evaluate -> predict -> report.
Each finished stage leaves a marker in WORK/stages/ holding a key of everything it depended on (the
resolved head configs, not the preset's name, so editing a preset retrains what it changed); a rerun
skips a stage whose key still matches, so it is idempotent and resumes after a kill (extraction itself
resumes shard by shard). Outputs are swapped into place whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from . import __version__
from .atomic import atomic_write_text
from .competition import TEST_TRUTH_CSV
from .data import load_competition, validate_competition
from .errors import ConfigError
from .extract.backbones import get_spec
from .extract.runner import extract
from .heads.api import read_ensemble
from .heads.configio import config_to_dict
from .heads.presets import PRESETS, Recipe, recipe
from .problems import InputError
from .stages import (
    HeadPaths,
    StoreData,
    evaluate_stage,
    fit_ensemble_stage,
    predict_stage,
    train_members_stage,
    validation_predictions,
)
from .store.layout import features_path, validation_split_path
from .store.reader import read_store_attrs

CONFIG_FILE = "config.toml"


@dataclass
class RunConfig:
    data_dir: Path
    work_dir: Path
    backbones: list[str] = field(default_factory=lambda: ["streetclip", "convnextv2-large"])
    weights: dict[str, str] = field(default_factory=dict)
    presets: list[str] = field(default_factory=lambda: ["default"])  # the first one writes the submission
    device: str = "auto"
    batch_size: int = 0
    workers: int = -1
    bad_images: str = "fail"
    seed: int = 0
    folds: int = 5  # K of the cross-fitting (every preset)
    precision: str = "auto"  # of the backbones: bf16 on recent GPUs, fp16 on older ones, fp32 on the CPU
    compile: bool | None = None  # torch.compile the backbones; None: on with CUDA, off on the CPU
    flip: bool = False  # also extract mirrored views, for the ensemble's flip TTA (twice the extraction work)

    def __post_init__(self) -> None:
        self.data_dir, self.work_dir = Path(self.data_dir), Path(self.work_dir)
        self.backbones = list(dict.fromkeys(get_spec(b).name for b in self.backbones))
        if not self.backbones:
            raise ConfigError("give at least one backbone")
        if not self.presets:
            raise ConfigError("give at least one preset")
        unknown = [p for p in self.presets if p not in PRESETS]
        if unknown:
            raise ConfigError(f"unknown preset(s) {unknown}; available: {', '.join(PRESETS)}")

    def recipe(self, preset: str) -> Recipe:
        return dataclasses.replace(recipe(preset, self.backbones), folds=self.folds)

    @classmethod
    def from_toml(cls, path: Path, **overrides) -> "RunConfig":
        data = tomllib.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def to_toml(self) -> str:
        """The resolved configuration, so a run can be reproduced with `geoscout run --config`."""
        lines = [f"# geoscout {__version__}: resolved configuration of this run"]
        tables = []
        for key, value in asdict(self).items():
            if value is None:  # TOML has no null: a missing key takes the default
                lines.append(f"# {key}: default")
            elif isinstance(value, dict):
                tables.append(f"\n[{key}]\n" + "".join(f"{json.dumps(k)} = {json.dumps(str(v))}\n" for k, v in value.items()))
            else:
                lines.append(f"{key} = {json.dumps(str(value) if isinstance(value, Path) else value)}")
        return "\n".join(lines) + "\n" + "".join(tables)


@dataclass
class RunResult:
    work_dir: Path
    submission: Path
    report: Path
    scores: dict[str, dict[str, float]]  # validation rows
    test_scores: dict[str, dict[str, float]]  # the test split, only where its truth is known (synthetic data)
    ran: list[str]
    skipped: list[str]


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Stages:
    """Runs a stage unless its marker holds the same key; writes the marker after the stage's outputs."""

    def __init__(self, work_dir: Path, log: Callable[[str], None]):
        self.dir = work_dir / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def run(self, name: str, key: str, fn: Callable[[], object], outputs: list[Path] = ()) -> bool:
        marker = self.dir / f"{name}.json"
        if marker.exists() and json.loads(marker.read_text()).get("key") == key and all(Path(p).exists() for p in outputs):
            self.skipped.append(name)
            self.log(f"[skip] {name}: complete")
            return False
        marker.unlink(missing_ok=True)
        self.log(f"[run]  {name}")
        fn()
        atomic_write_text(marker, json.dumps({"key": key}))
        self.ran.append(name)
        return True


def run_pipeline(config: RunConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> RunResult:
    """Everything from the competition folder to WORK/submission.csv and WORK/report/."""
    from .report import build_report

    work = config.work_dir
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / CONFIG_FILE, config.to_toml())
    store = work / "store"
    heads_root = work / "heads"
    stages = _Stages(work, log)

    competition = load_competition(config.data_dir)  # CSV problems stop the run before anything else
    dataset = competition.fingerprint()

    def validate() -> None:
        report = validate_competition(config.data_dir, workers=None, progress=progress)
        if not report.ok and config.bad_images == "fail":
            raise InputError(report.problems, str(config.data_dir))
        if not report.ok:
            log(f"{len(report.problems)} bad image(s): their views will be masked (--bad-images mask)")

    stages.run("validate", _key(dataset, config.bad_images), validate)

    log("[run]  extract (resumes; skips complete stores)")
    extract(config.data_dir, store, backbones=config.backbones, weights=config.weights, device=config.device,
            precision=config.precision, compile=config.compile, batch_size=config.batch_size, workers=config.workers,
            bad_images=config.bad_images, flip=config.flip, check_images=False, progress=progress)
    store_keys = {b: read_store_attrs(features_path(store, "train", b))["backbone_fingerprint"] for b in config.backbones}
    data = StoreData(store, list(config.backbones))  # each split is read once for every stage below
    data.validation_mask()  # made once; every head shares it
    split_key = _key(validation_split_path(store).read_text())
    scores: dict[str, dict[str, float]] = {}
    test_scores: dict[str, dict[str, float]] = {}
    truth = data.test_truth()
    for preset in config.presets:
        plan = config.recipe(preset)
        heads = HeadPaths(heads_root, preset)
        member_keys = {}
        for spec in plan.members:
            member_keys[spec.name] = _key("member", spec.name, config_to_dict(spec.config),
                                          [store_keys[b] for b in spec.backbones], split_key, plan.folds, config.seed,
                                          __version__)
            stages.run(f"{preset}.{spec.name}", member_keys[spec.name],
                       lambda spec=spec: train_members_stage(data, heads, plan, names=[spec.name], device=config.device,
                                                             seed=config.seed, progress=progress),
                       [heads.member(spec.name)])
        ensemble_key = _key("ensemble", member_keys, config_to_dict(plan.ensemble), config_to_dict(plan.regressor),
                            config.flip)
        stages.run(f"{preset}.ensemble", ensemble_key,
                   lambda: fit_ensemble_stage(data, heads, plan, members=[m.name for m in plan.members],
                                              device=config.device, seed=config.seed, progress=progress),
                   [heads.ensemble])
        evaluation = evaluate_stage(data, heads, plan, device=config.device, seed=config.seed)
        scores.update({f"{preset}/{name}": m for name, m in evaluation.metrics.items() if name != "baseline"})
        scores["baseline"] = evaluation.metrics["baseline"]
        if truth is not None:
            on_test = evaluate_stage(data, heads, plan, device=config.device, seed=config.seed, split="test")
            test_scores.update({f"{preset}/{name}": m for name, m in on_test.metrics.items() if name != "baseline"})
            test_scores["baseline"] = on_test.metrics["baseline"]

    final_plan = config.recipe(config.presets[0])
    final = HeadPaths(heads_root, config.presets[0])
    _write_evaluation(work, data, final, final_plan, scores, test_scores, config)
    submission = work / "submission.csv"
    predict_stage(data, final, final_plan, submission, device=config.device, seed=config.seed)
    log(f"[done] wrote {submission}")
    report = build_report(work)
    log(f"[done] report: {report}")
    return RunResult(work, submission, report, scores, test_scores, stages.ran, stages.skipped)


def ensemble_summary(ensemble_dir: Path) -> dict:
    """What the report draws of an ensemble: members with weights, temperatures and OOF scores."""
    record = read_ensemble(ensemble_dir)
    keys = ("score", "top1_accuracy", "mean_km", "nll")
    return {
        "members": [{"name": m["name"], "kind": m["kind"], "backbones": m["backbones"], "weight": m["weight"],
                     "temperature": m["temperature"], "oof": {k: m["oof"][k] for k in keys}} for m in record["members"]],
        "oof": {k: record["oof"][k] for k in keys},
        "regressor": record["regressor"],
        "retrieval_weight": record["decode"]["retrieval_weight"],
        "candidates": record["decode"]["candidates"],
        "fallback_to": record["fallback_to"],
        "folds": record["folds"],
        "flip_tta_note": record.get("flip_tta_note"),  # absent from ensembles fitted before it was recorded
    }


def _write_evaluation(work: Path, data: StoreData, final: HeadPaths, plan: Recipe, scores: dict, test_scores: dict,
                      config: RunConfig) -> None:
    """What the report reads (see report.py): scores, the final ensemble's validation predictions and members."""
    eval_dir = work / "eval"
    eval_dir.mkdir(exist_ok=True)
    specs = [get_spec(b) for b in config.backbones]
    run_info = {
        "data_dir": str(config.data_dir.resolve()),
        "synthetic": (config.data_dir / TEST_TRUTH_CSV).exists(),
        "random_backbones": any(s.random_init for s in specs),
        "backbones": config.backbones,
        "presets": config.presets,
        "final_model": f"{final.preset}/ensemble",
        "folds": config.folds,
    }
    atomic_write_text(work / "run.json", json.dumps(run_info, indent=2))
    atomic_write_text(eval_dir / "scores.json", json.dumps(scores, indent=2))
    test_path = eval_dir / "test_scores.json"
    if test_scores:
        atomic_write_text(test_path, json.dumps(test_scores, indent=2))
    else:
        test_path.unlink(missing_ok=True)
    predictions = validation_predictions(data, final, plan, device=config.device, seed=config.seed)
    tmp = eval_dir / "val_predictions.csv.tmp"
    predictions.write_csv(tmp)
    os.replace(tmp, eval_dir / "val_predictions.csv")
    atomic_write_text(eval_dir / "ensemble.json", json.dumps(ensemble_summary(final.ensemble), indent=2))
    (eval_dir / "alpha_curve.json").unlink(missing_ok=True)  # written by earlier versions


def score_table(scores: dict[str, dict[str, float]], keys=("score", "classification_score", "gps_score", "top1_accuracy", "mean_km", "median_km")) -> str:
    width = max(len(n) for n in scores) + 2
    lines = [f"{'model':<{width}}" + "".join(f"{k:>22}" for k in keys)]
    for name, m in scores.items():
        lines.append(f"{name:<{width}}" + "".join(f"{m[k]:>22.4f}" for k in keys))
    return "\n".join(lines)


DEMO_BANNER = """\
==============================================================================
 geoscout demo: SYNTHETIC data (rendered from real US place coordinates) and
 RANDOMLY INITIALISED tiny backbones. The numbers show the pipeline works end
 to end; they say nothing about real street-view accuracy.
=============================================================================="""


def run_demo(work_dir: Path, *, n_train: int = 600, n_test: int = 150, n_states: int = 20, seed: int = 0,
             progress: bool = True, log: Callable[[str], None] = print) -> RunResult:
    """Synthesise a dataset, run the whole pipeline with the tiny random backbones, both presets."""
    from .synth import synthesize

    work_dir = Path(work_dir)
    data_dir = work_dir / "data"
    log(DEMO_BANNER)
    if not (data_dir / "train_ground_truth.csv").exists():
        log(f"[run]  synth: {n_train} train + {n_test} test locations, {n_states} states -> {data_dir}")
        tmp = work_dir / "data.tmp"
        synthesize(tmp, n_train=n_train, n_test=n_test, n_states=n_states, seed=seed, progress=False)
        os.replace(tmp, data_dir)
    config = RunConfig(data_dir=data_dir, work_dir=work_dir, backbones=["tiny-clip-random", "tiny-convnext-random"],
                       presets=["default", "seed"], device="cpu", seed=seed)
    result = run_pipeline(config, progress=progress, log=log)
    log("\nvalidation scores (synthetic data, random backbones):")
    log(score_table(result.scores))
    if result.test_scores:
        log("\ntest-split scores (synthetic data only: the competition keeps its test truth):")
        log(score_table(result.test_scores))
    log(f"\nsubmission: {result.submission}\nreport:     {result.report}  (open it in a browser)")
    return result
