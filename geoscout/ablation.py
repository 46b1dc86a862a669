"""`geoscout ablate`: the seed recipe, the default, and the default without each of its parts.

Every recipe trains on the same cached features, validation split and folds, once per seed, and is
scored on the validation rows (touched by no choice: every choice is made on out-of-fold outputs)
and, when the data folder has test_ground_truth.csv (synthetic data), on the test split. A member
whose config two recipes share is trained once, so a variant that only changes the ensemble or its
decoding costs no training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .atomic import atomic_write_text
from .errors import ConfigError
from .heads.api import evaluate, fit_ensemble, train_members
from .heads.configio import config_to_dict
from .heads.members import MemberSpec
from .heads.presets import Recipe, recipe, with_changes
from .stages import StoreData
from .store.reader import StoreError

TABLE_KEYS = ("score", "classification_score", "gps_score", "mean_km", "median_km")


@dataclass(frozen=True)
class Variant:
    """One part of the default, as the changes that take it out."""

    name: str
    make: Callable[[Recipe], Recipe]


VARIANTS = (
    Variant("default - probe", lambda r: with_changes(r, "default - probe", kinds=("classifier",))),
    Variant("default - classifiers (the probe alone)", lambda r: with_changes(r, "default - classifiers", kinds=("probe",))),
    Variant("default - haversine smoothing", lambda r: with_changes(r, "default - haversine smoothing",
                                                                     member={"haversine_tau_km": 0.0})),
    Variant("default - geocells", lambda r: with_changes(r, "default - geocells", member={"geocells": 0, "haversine_tau_km": 0.0})),
    Variant("default - view dropout", lambda r: with_changes(r, "default - view dropout", member={"view_dropout": 0.0})),
    Variant("default - regressor", lambda r: with_changes(r, "default - regressor", ensemble={"regressor": "off"})),
    Variant("default - retrieval", lambda r: with_changes(r, "default - retrieval", decode={"retrieval_k": 0})),
    Variant("default - expected-distance decoding", lambda r: with_changes(r, "default - expected-distance decoding",
                                                                            decode={"candidates": (1,)})),
    Variant("default, fitted weights -> equal weights", lambda r: with_changes(
        r, "default, equal weights", ensemble={"weights": "fixed", "fixed_weights": (1.0,) * len(r.members)})),
    # Only where the store was extracted with --layers K: DINOv2's linear-evaluation inputs.
    Variant("default + multi-layer features", lambda r: with_changes(
        r, "default + multi-layer features", inputs=("features", "layers", "patch_mean"))),
)


RECIPE_NAMES = ("seed", "default", *(v.name for v in VARIANTS))


def recipes(backbones: list[str], only: list[str] | None = None) -> list[Recipe]:
    """The seed recipe, the default and its variants; `only` keeps those names, in this order."""
    unknown = sorted(set(only or ()) - set(RECIPE_NAMES))
    if unknown:
        raise ConfigError(f"unknown ablation recipe(s) {unknown}; the recipes are {list(RECIPE_NAMES)}")
    default = recipe("default", backbones)
    every = [recipe("seed", backbones), default, *(dataclasses.replace(v.make(default), name=v.name) for v in VARIANTS)]
    return [r for r in every if not only or r.name in only]


def _member_dir(root: Path, spec: MemberSpec, folds: int) -> Path:
    digest = hashlib.sha256(json.dumps([spec.kind, list(spec.backbones), config_to_dict(spec.config), folds],
                                       sort_keys=True).encode()).hexdigest()[:10]
    return root / f"{spec.name}-{digest}"


def _readable(data: StoreData, plan: Recipe, log: Callable[[str], None]) -> bool:
    """Whether the store holds every dataset the recipe's members read (multi-layer ones need --layers)."""
    for inputs in {m.config.inputs for m in plan.members}:
        try:
            data.split("train", inputs)
        except StoreError:
            log(f"{plan.name}: left out, the store has no {list(inputs)} (extract with --layers K)")
            return False
    return True


def _summary(values: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {"mean": float(np.mean([v[k] for v in values])), "std": float(np.std([v[k] for v in values]))}
            for k in TABLE_KEYS}


def run_ablation(store_dir: Path, *, work_dir: Path, seeds: int = 3, device: str = "cpu", backbones: list[str] | None = None,
                 only: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Train and score every recipe (or those named in `only`) for seeds 0..seeds-1; write
    WORK/eval/ablation.json and return it."""
    store_dir, work_dir = Path(store_dir), Path(work_dir)
    data = StoreData(store_dir, backbones)
    truth = data.test_truth()
    rows = []
    plans = [p for p in recipes(data.backbones, only) if _readable(data, p, log)]
    for plan in plans:
        if not plan.members:
            raise ConfigError(f"recipe {plan.name!r} has no member")
        for seed in range(seeds):
            started = time.perf_counter()
            folder = work_dir / "ablation" / f"seed{seed}"
            protocol = data.protocol(plan.folds, seed)
            dirs = {m.name: _member_dir(folder, m, plan.folds) for m in plan.members}
            todo = [m for m in plan.members if not (dirs[m.name] / "head.json").is_file()]
            train_members(data.source("train"), todo, protocol, {m.name: dirs[m.name] for m in todo}, device=device, seed=seed,
                          progress=False)
            ensemble_dir = folder / f"ensemble-{hashlib.sha256(json.dumps(plan.key(), sort_keys=True).encode()).hexdigest()[:10]}"
            fitted = fit_ensemble(data.train, member_dirs=list(dirs.values()), protocol=protocol, out_dir=ensemble_dir,
                                  config=plan.ensemble, regressor_config=plan.regressor, device=device, seed=seed, progress=False)
            row = {"recipe": plan.name, "seed": seed, "weights": fitted.weights, "decode": fitted.decode,
                   "regressor": fitted.regressor,
                   "validation": evaluate(data.source("train"), protocol, ensemble_dir=ensemble_dir,
                                          device=device).metrics["ensemble"]}
            if truth is not None:
                row["test"] = evaluate(data.source("train"), protocol, ensemble_dir=ensemble_dir, device=device,
                                       truth=(data.source("test"), *truth)).metrics["ensemble"]
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
            shown = row.get("test", row["validation"])
            log(f"{plan.name:<45} seed {seed}: score {shown['score']:.4f}, mean {shown['mean_km']:.0f} km ({row['seconds']:.0f} s)")
    splits = ["validation", *(["test"] if truth is not None else [])]
    names = [p.name for p in plans]
    result = {
        "store": str(store_dir.resolve()),
        "backbones": data.backbones,
        "seeds": seeds,
        "n_validation": int(data.validation_mask().sum()),
        "n_test": None if truth is None else len(truth[0]),
        "recipes": [{"name": n, **{s: _summary([r[s] for r in rows if r["recipe"] == n]) for s in splits}} for n in names],
        "runs": rows,
    }
    out = work_dir / "eval" / "ablation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1, default=float))
    return result


def markdown_table(result: dict, split: str) -> str:
    """The recipes as a Markdown table of mean ± std over the seeds on one split."""
    labels = {"score": "final score", "classification_score": "classification", "gps_score": "gps score",
              "mean_km": "mean km", "median_km": "median km"}
    lines = ["| recipe | " + " | ".join(labels[k] for k in TABLE_KEYS) + " |", "| --- |" + " ---: |" * len(TABLE_KEYS)]
    for entry in result["recipes"]:
        cells = []
        for k in TABLE_KEYS:
            m = entry[split][k]
            cells.append(f"{m['mean']:.0f} ± {m['std']:.0f}" if k.endswith("_km") else f"{m['mean']:.4f} ± {m['std']:.4f}")
        lines.append(f"| {entry['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
