"""`geoscout ablate`: the seed recipe, the default, and the default without each of its additions.

Every recipe trains on the same cached features and the store's validation split, once per seed,
and is scored on the validation rows (where its alpha, temperatures and retrieval weight were
chosen) and, when the data folder has test_ground_truth.csv (synthetic data), on the held-out test
split. Heads are shared between recipes whose configs agree, so a decoding-only variant costs
no training.
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
from .competition import TEST_TRUTH_CSV
from .heads.api import fit_ensemble, predict, train_classifier, train_regressor
from .heads.ensemble import EnsembleConfig
from .heads.models import ClassifierConfig, RegressorConfig
from .heads.presets import classifier_preset, config_to_dict, ensemble_preset, regressor_preset
from .metric import read_truth, score_predictions
from .stages import load_train, regressor_backbone, validation_mask
from .store.features import SplitFeatures
from .store.reader import read_manifest, read_split

TABLE_KEYS = ("score", "classification_score", "gps_score", "mean_km", "median_km")


@dataclass(frozen=True)
class Recipe:
    name: str
    classifier: Callable[[str], ClassifierConfig]  # backbone -> config
    regressor: RegressorConfig
    ensemble: EnsembleConfig


def _preset(name: str) -> Recipe:
    return Recipe(name, lambda b: classifier_preset(name, backbone=b), regressor_preset(name), ensemble_preset(name))


Changes = dict[str, dict]  # "classifier" | "regressor" | "ensemble" | "decode" -> field values


@dataclass(frozen=True)
class Addition:
    """One addition to the seed's design, as the config changes that turn it off and on."""

    name: str
    off: Changes
    on: Changes  # what it means when the default leaves it out


ADDITIONS = (
    Addition("haversine smoothing", off={"classifier": {"haversine_tau_km": 0.0, "label_smoothing": 0.1}},
             on={"classifier": {"haversine_tau_km": 250.0, "label_smoothing": 0.0}}),
    Addition("geocells", off={"classifier": {"geocells": 0}}, on={"classifier": {"geocells": 300}}),
    Addition("retrieval", off={"decode": {"retrieval_k": 0}}, on={"decode": {"retrieval_k": 32}}),
    # The regressor's anchor belongs here: training on the true cell makes every candidate's offset
    # mean "where inside this cell", which only the multi-candidate belief asks for.
    Addition("expected-distance decoding", off={"decode": {"candidates": 1}, "regressor": {"anchor": "predicted"}},
             on={"decode": {"candidates": 5}, "regressor": {"anchor": "true"}}),
    Addition("flip TTA", off={"ensemble": {"flip_tta": "none"}}, on={"ensemble": {"flip_tta": "swap"}}),
)


def _configs(recipe: Recipe) -> dict:
    return {"classifier": recipe.classifier("any"), "regressor": recipe.regressor, "ensemble": recipe.ensemble,
            "decode": recipe.ensemble.decode}


def _applies(recipe: Recipe, changes: Changes) -> bool:
    configs = _configs(recipe)
    return all(getattr(configs[part], k) == v for part, values in changes.items() for k, v in values.items())


def _variant(base: Recipe, name: str, changes: Changes) -> Recipe:
    ens = dataclasses.replace(base.ensemble, **changes.get("ensemble", {}))
    return Recipe(
        name,
        lambda b: dataclasses.replace(base.classifier(b), **changes.get("classifier", {})),
        dataclasses.replace(base.regressor, **changes.get("regressor", {})),
        dataclasses.replace(ens, decode=dataclasses.replace(ens.decode, **changes.get("decode", {}))),
    )


def recipes(*, taus: tuple[float, ...] = ()) -> list[Recipe]:
    """seed, default, the default with each addition toggled ("default - X" when the default has it,
    "default + X" when not), PIGEON's smoothing across state borders, the naive flip, other taus."""
    default = _preset("default")
    toggled = [
        _variant(default, f"default - {a.name}", a.off) if not _applies(default, a.off) else _variant(default, f"default + {a.name}", a.on)
        for a in ADDITIONS
    ]
    return [
        _preset("seed"),
        default,
        *toggled,
        _variant(default, "default, smoothing across state borders", {"classifier": {"haversine_within_state": False}}),
        _variant(default, "default, naive flip (no E/W swap)", {"ensemble": {"flip_tta": "naive"}}),
        *(_variant(default, f"default, tau {tau:g} km", {"classifier": {"haversine_tau_km": tau}}) for tau in taus),
    ]


def _key(*configs) -> str:
    blob = json.dumps([config_to_dict(c) if dataclasses.is_dataclass(c) else c for c in configs], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _test_truth(store_dir: Path, test: SplitFeatures) -> tuple[np.ndarray, np.ndarray] | None:
    """(class ids, latlon) of the test rows in store order, or None without a truth file."""
    path = Path(read_manifest(store_dir)["data_dir"]) / TEST_TRUTH_CSV
    if not path.exists():
        return None
    truth = read_truth(path)
    row = {int(s): i for i, s in enumerate(truth.sample_id)}
    order = np.array([row[int(s)] for s in test.sample_id])
    class_of = {int(s): c for c, s in enumerate(test.classes)}
    class_id = np.array([class_of[int(s)] for s in truth.state_idx[order]])
    return class_id, np.stack([truth.latitude[order], truth.longitude[order]], axis=1)


def _summary(values: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {"mean": float(np.mean([v[k] for v in values])), "std": float(np.std([v[k] for v in values]))}
            for k in TABLE_KEYS}


def run_ablation(
    store_dir: Path, *, work_dir: Path, seeds: int = 3, taus: tuple[float, ...] = (), device: str = "cpu",
    log: Callable[[str], None] = print,
) -> dict:
    """Train and score every recipe for seeds 0..seeds-1; write WORK/eval/ablation.json and return it."""
    store_dir, work_dir = Path(store_dir), Path(work_dir)
    train = load_train(store_dir)
    backbones = sorted(train.features)
    if len(backbones) != 2:
        raise ValueError(f"the ablation compares ensembles of two backbones; the store has {backbones}")
    test = read_split(store_dir, "test", backbones)
    truth = _test_truth(store_dir, test)
    mask = validation_mask(store_dir, train)
    reader = regressor_backbone(backbones)
    heads = work_dir / "ablation"
    rows = []
    for recipe in recipes(taus=taus):
        for seed in range(seeds):
            started = time.perf_counter()
            folder = heads / f"seed{seed}"
            classifiers = {}
            for b in backbones:
                config = recipe.classifier(b)
                classifiers[b] = folder / f"classifier-{b}-{_key(config)}"
                if not classifiers[b].exists():
                    train_classifier(train, backbone=b, val_mask=mask, out_dir=classifiers[b], config=config, device=device,
                                     seed=seed, progress=False)
            regressor = folder / f"regressor-{_key(recipe.classifier(reader), recipe.regressor)}"
            if not regressor.exists():
                train_regressor(train, classifier_dir=classifiers[reader], val_mask=mask, out_dir=regressor,
                                config=recipe.regressor, device=device, seed=seed, progress=False)
            ensemble = folder / f"ensemble-{_key(*(recipe.classifier(b) for b in backbones), recipe.regressor, recipe.ensemble)}"
            fitted = fit_ensemble(train, classifier_dirs=classifiers, val_mask=mask, out_dir=ensemble, regressor_dir=regressor,
                                  config=recipe.ensemble, device=device)
            row = {"recipe": recipe.name, "seed": seed, "validation": fitted.metrics, "flip_tta": fitted.flip_tta,
                   "retrieval_weight": fitted.retrieval_weight, "alpha": fitted.alpha}
            if truth is not None:
                pred = predict(test, ensemble_dir=ensemble, device=device, gallery=train)
                row["test"] = score_predictions(truth[0], truth[1][:, 0], truth[1][:, 1], pred.top5, pred.lat, pred.lon)
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
            shown = row.get("test", row["validation"])
            log(f"{recipe.name:<40} seed {seed}: score {shown['score']:.4f}, mean {shown['mean_km']:.0f} km "
                f"({row['seconds']:.0f} s)")
    names = list(dict.fromkeys(r["recipe"] for r in rows))
    splits = ["validation", *(["test"] if truth is not None else [])]
    result = {
        "store": str(store_dir.resolve()),
        "backbones": backbones,
        "seeds": seeds,
        "n_validation": int(mask.sum()),
        "n_test": None if truth is None else len(test),
        "recipes": [
            {"name": n, **{s: _summary([r[s] for r in rows if r["recipe"] == n]) for s in splits}} for n in names
        ],
        "runs": rows,
    }
    out = work_dir / "eval" / "ablation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1))
    return result


def markdown_table(result: dict, split: str) -> str:
    """The recipes as a Markdown table of mean ± std over the seeds on one split."""
    labels = {"score": "final score", "classification_score": "classification", "gps_score": "gps score",
              "mean_km": "mean km", "median_km": "median km"}
    lines = ["| recipe | " + " | ".join(labels[k] for k in TABLE_KEYS) + " |", "| --- |" + " ---: |" * len(TABLE_KEYS)]
    for recipe in result["recipes"]:
        cells = []
        for k in TABLE_KEYS:
            m = recipe[split][k]
            cells.append(f"{m['mean']:.0f} ± {m['std']:.0f}" if k.endswith("_km") else f"{m['mean']:.4f} ± {m['std']:.4f}")
        lines.append(f"| {recipe['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
