"""`geoscout run`: the whole job, from a competition folder to a submission and a report.

validate -> extract -> classifiers -> regressor -> ensemble -> evaluate -> predict -> report.
Each finished stage leaves a marker in WORK/stages/ holding a key of everything it depended on;
a rerun skips a stage whose key still matches, so it is idempotent and resumes after a kill
(extraction itself resumes shard by shard). Outputs are swapped into place whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import tomllib

from . import __version__
from .atomic import atomic_write_text
from .competition import TEST_TRUTH_CSV
from .data import load_competition, validate_competition
from .errors import ConfigError
from .extract.backbones import get_spec
from .extract.runner import extract
from .problems import InputError
from .stages import (
    HeadPaths,
    evaluate_stage,
    fit_ensemble_stage,
    load_train,
    predict_stage,
    regressor_backbone,
    train_classifier_stage,
    train_regressor_stage,
    validation_mask,
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
    flip: bool = False  # also extract mirrored views, for the ensemble's flip TTA (twice the extraction work)

    def __post_init__(self) -> None:
        self.data_dir, self.work_dir = Path(self.data_dir), Path(self.work_dir)
        self.backbones = [get_spec(b).name for b in self.backbones]
        if not self.backbones or len(self.backbones) > 2:
            raise ConfigError(f"run takes one or two backbones; got {self.backbones}")
        if not self.presets:
            raise ConfigError("give at least one preset")

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
            if isinstance(value, dict):
                tables.append(f"\n[{key}]\n" + "".join(f"{json.dumps(k)} = {json.dumps(str(v))}\n" for k, v in value.items()))
            else:
                lines.append(f"{key} = {json.dumps(str(value) if isinstance(value, Path) else value)}")
        return "\n".join(lines) + "\n" + "".join(tables)


@dataclass
class RunResult:
    work_dir: Path
    submission: Path
    report: Path
    scores: dict[str, dict[str, float]]
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
            batch_size=config.batch_size, workers=config.workers, bad_images=config.bad_images, flip=config.flip,
            check_images=False, progress=progress)
    store_keys = {b: read_store_attrs(features_path(store, "train", b))["backbone_fingerprint"] for b in config.backbones}

    validation_mask(store, load_train(store, config.backbones[:1]))  # made once; every head shares it
    split_key = _key(validation_split_path(store).read_text())
    scores: dict[str, dict[str, float]] = {}
    for preset in config.presets:
        heads = HeadPaths(heads_root, preset)
        classifier_keys = {}
        for b in config.backbones:
            classifier_keys[b] = _key("classifier", preset, b, config.seed, dataset, store_keys[b], split_key, __version__)
            stages.run(f"{preset}.classifier-{b}", classifier_keys[b],
                       lambda b=b: train_classifier_stage(store, heads, b, device=config.device, seed=config.seed, progress=progress),
                       [heads.classifier(b)])
        rb = regressor_backbone(config.backbones)
        regressor_key = _key("regressor", preset, classifier_keys[rb], config.seed)
        stages.run(f"{preset}.regressor", regressor_key,
                   lambda: train_regressor_stage(store, heads, rb, device=config.device, seed=config.seed, progress=progress),
                   [heads.regressor])
        if len(config.backbones) == 2:
            stages.run(f"{preset}.ensemble", _key("ensemble", preset, classifier_keys, regressor_key, config.flip),
                       lambda: fit_ensemble_stage(store, heads, config.backbones, device=config.device),
                       [heads.ensemble])
        evaluation = evaluate_stage(store, heads, device=config.device)
        scores.update({f"{preset}/{_model_name(name)}": m for name, m in evaluation.metrics.items() if name != "baseline"})
        scores["baseline"] = evaluation.metrics["baseline"]

    final = HeadPaths(heads_root, config.presets[0])
    _write_evaluation(work, store, final, scores, config, progress)
    submission = work / "submission.csv"
    predict_stage(store, final, submission, device=config.device)
    log(f"[done] wrote {submission}")
    report = build_report(work)
    log(f"[done] report: {report}")
    return RunResult(work, submission, report, scores, stages.ran, stages.skipped)


def _model_name(name: str) -> str:
    """evaluate() names rows by backbone; the report wants the kind of head too."""
    if name in ("ensemble", "baseline"):
        return name
    if name.endswith("+regressor"):
        return f"regressor-{name.removesuffix('+regressor')}"
    return f"classifier-{name}"


def _write_evaluation(work: Path, store: Path, final: HeadPaths, scores: dict, config: RunConfig, progress: bool) -> None:
    """What the report reads (see report.py): scores, the final model's validation predictions, the alpha curve."""
    eval_dir = work / "eval"
    eval_dir.mkdir(exist_ok=True)
    final_model = f"{final.preset}/ensemble" if final.ensemble.exists() else f"{final.preset}/regressor-{regressor_backbone(config.backbones)}"
    specs = [get_spec(b) for b in config.backbones]
    run_info = {
        "data_dir": str(config.data_dir.resolve()),
        "synthetic": (config.data_dir / TEST_TRUTH_CSV).exists(),
        "random_backbones": any(s.random_init for s in specs),
        "backbones": config.backbones,
        "presets": config.presets,
        "final_model": final_model,
    }
    atomic_write_text(work / "run.json", json.dumps(run_info, indent=2))
    atomic_write_text(eval_dir / "scores.json", json.dumps(scores, indent=2))
    predictions = validation_predictions(store, final, device=config.device)
    tmp = eval_dir / "val_predictions.csv.tmp"
    predictions.write_csv(tmp)
    os.replace(tmp, eval_dir / "val_predictions.csv")
    curve_path = eval_dir / "alpha_curve.json"
    if final.ensemble.exists():
        record = json.loads((final.ensemble / "ensemble.json").read_text())
        curve = [{"alpha": p["alpha"], **{k: p[k] for k in ("score", "classification_score", "gps_score")}} for p in record["alpha_curve"]]
        atomic_write_text(curve_path, json.dumps({"chosen_alpha": record["alpha"], "curve": curve}, indent=2))
    else:
        curve_path.unlink(missing_ok=True)


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
    log(f"\nsubmission: {result.submission}\nreport:     {result.report}  (open it in a browser)")
    return result
