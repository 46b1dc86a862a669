"""The heads against a tuned logistic probe and the seed recipe, across regimes of synthetic data.

Each regime is a `geoscout synth` difficulty (neighbouring states that look alike, 100-200 rows per
state, imbalanced states, noisy and broken views, and all of them at once) at two sizes (1,500 / 500
and 6,000 / 1,000 locations), drawn with several seeds. Every data set is extracted with the two tiny random
backbones (`--bad-images mask`, as the broken views need) into its own store, cached under --cache.
Recipes are trained on the store's training split exactly as `geoscout run` does (validation split,
K folds) and scored on the test split, which no choice ever saw.

The floor is what a user would write in ten lines: scikit-learn's LogisticRegressionCV (C among
0.01..100 by 5-fold CV log-loss) on the standardised mean of each location's views, both backbones
side by side, fitted on every training row (the heads leave the 10% validation rows out of fitting),
and the predicted state's training centroid as the position.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geoscout.extract.runner import extract
from geoscout.geo import spherical_mean
from geoscout.heads.presets import recipe
from geoscout.index import masked_view_mean
from geoscout.metric import score_predictions
from geoscout.stages import HeadPaths, StoreData, evaluate_stage, fit_ensemble_stage, train_members_stage
from geoscout.synth import difficulty_from, synthesize

BACKBONES = ["tiny-clip-random", "tiny-convnext-random"]
SIZES = {"small": (1500, 500), "large": (6000, 1000), "xlarge": (24000, 1000)}  # xlarge: how far more rows go, not in the table


@dataclass(frozen=True)
class Regime:
    name: str
    difficulty: str
    states: dict[str, int]  # size -> states
    what: str
    overrides: tuple[tuple[str, float], ...] = ()  # difficulty fields changed from the named one


REGIMES = {
    r.name: r for r in (
        Regime("lookalike", "lookalike", {"small": 10, "large": 20}, "neighbouring states look alike (lookalike 0.9)"),
        Regime("few-rows", "standard", {"small": 10, "large": 33}, "100-200 training rows per state (lookalike 0.85)",
               (("lookalike", 0.85),)),
        Regime("imbalanced", "imbalanced", {"small": 15, "large": 25}, "state frequencies fall as rank^-1.2 (lookalike 0.9)"),
        Regime("noisy", "noisy", {"small": 10, "large": 20},
               "4x grain, 25% blank views, 5% broken (masked) views (lookalike 0.6)"),
        Regime("hard", "hard", {"small": 15, "large": 25},
               "all at once: lookalike 0.8, imbalance 0.8, 3x grain, 15% blank and 3% broken views"),
    )
}
KEYS = ("score", "classification_score", "gps_score", "top1_accuracy", "mean_km")


def dataset(cache: Path, regime: Regime, size: str, seed: int, log=print) -> Path:
    """The store of one (regime, size, seed), made once: synth, then extract with the tiny backbones."""
    n_train, n_test = SIZES[size]
    states = regime.states["large" if size == "xlarge" else size]
    level = difficulty_from(regime.difficulty, **dict(regime.overrides))
    tag = hashlib.sha256(repr(level).encode()).hexdigest()[:6]  # another difficulty is another data set
    root = cache / f"{regime.name}-{size}-seed{seed}-{tag}"
    store = root / "store"
    if (root / "ready").exists():
        return store
    started = time.perf_counter()
    data = root / "data"
    if not (data / "train_ground_truth.csv").exists():
        synthesize(data, n_train=n_train, n_test=n_test, n_states=states, seed=seed, progress=False,
                   difficulty=level)
    extract(data, store, backbones=BACKBONES, device="cpu", bad_images="mask", check_images=False, progress=False)
    (root / "ready").write_text("")
    log(f"  data {root.name}: {time.perf_counter() - started:.0f} s")
    return store


def probe_prediction(data: StoreData) -> tuple[np.ndarray, np.ndarray]:
    """LogisticRegressionCV on standardised view means of every training row: the test split's top-5 class
    ids (N, 5) and positions (N, 2), the predicted state's training centroid."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = data.train, data.split("test")
    x = np.concatenate([masked_view_mean(train.features[b], train.masks[b])[0] for b in BACKBONES], axis=1)
    x_test = np.concatenate([masked_view_mean(test.features[b], test.masks[b])[0] for b in BACKBONES], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on the weakest C
        model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[0.01, 0.1, 1.0, 10.0, 100.0], cv=5,
                                                                     scoring="neg_log_loss", max_iter=2000))
        model.fit(x, train.class_id)
    proba = model.predict_proba(x_test)
    classes = model.classes_
    top5 = classes[np.argsort(-proba, axis=1)[:, :5]]
    centroids = {c: spherical_mean(*train.latlon[train.class_id == c].T) for c in classes}
    point = np.array([centroids[c] for c in top5[:, 0]])
    if top5.shape[1] < 5:
        top5 = np.pad(top5, ((0, 0), (0, 5 - top5.shape[1])), constant_values=-1)
    return top5, point


def probe_floor(data: StoreData) -> dict:
    """The probe's metrics on the test split."""
    top5, point = probe_prediction(data)
    class_id, latlon = data.test_truth()
    return score_predictions(class_id, latlon[:, 0], latlon[:, 1], top5, point[:, 0], point[:, 1])


def run_recipe(store: Path, work: Path, preset: str, seed: int) -> dict:
    """Train a preset's recipe on the store as `geoscout run` does; its metrics on the test split and
    on the validation rows."""
    data = StoreData(store, BACKBONES)
    plan = recipe(preset, BACKBONES)
    heads = HeadPaths(work, preset)
    started = time.perf_counter()
    train_members_stage(data, heads, plan, device="cpu", seed=seed, progress=False)
    result = fit_ensemble_stage(data, heads, plan, device="cpu", seed=seed, progress=False)
    seconds = time.perf_counter() - started
    test = evaluate_stage(data, heads, plan, device="cpu", seed=seed, split="test").metrics
    val = evaluate_stage(data, heads, plan, device="cpu", seed=seed).metrics
    return {"test": test["ensemble"], "validation": val["ensemble"], "test_all": test, "validation_all": val,
            "seconds": seconds, "weights": dict(zip(result.members, result.weights)),
            "decode": result.decode, "regressor": result.regressor, "oof": result.oof}


def digest(obj) -> str:
    """A short name for a JSON-able config: the cache folder and results key of what it trains."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def recipe_digest(preset: str) -> str:
    return digest(recipe(preset, BACKBONES).key())


def run(cache: Path, *, regimes: list[str], sizes: list[str], seeds: list[int], presets: list[str], fresh: bool,
        log=print) -> list[dict]:
    """Every (regime, size, seed): the floor and each preset, cached per recipe digest in results.jsonl."""
    results_path = cache / "results.jsonl"
    done = {}
    if results_path.exists() and not fresh:
        for line in results_path.read_text().splitlines():
            row = json.loads(line)
            done[(row["data"], row["recipe"], row["digest"])] = row
    rows = []
    for size in sizes:  # every regime at the small size first: the table fills in the cheap cells first
        for name in regimes:
            regime = REGIMES[name]
            for seed in seeds:
                store = dataset(cache, regime, size, seed, log)
                wanted = [("probe", "sklearn-LogisticRegressionCV")] + [(p, recipe_digest(p)) for p in presets]
                for label, digest in wanted:
                    key = (store.parent.name, label, digest)
                    if key in done:
                        rows.append(done[key])
                        continue
                    started = time.perf_counter()
                    if label == "probe":
                        row = {"test": probe_floor(StoreData(store, BACKBONES))}
                    else:
                        row = run_recipe(store, store.parent / f"heads-{digest}", label, seed)
                    row.update(regime=name, size=size, seed=seed, data=store.parent.name, recipe=label, digest=digest,
                               seconds_total=time.perf_counter() - started)
                    with results_path.open("a") as f:
                        f.write(json.dumps(row, default=float) + "\n")
                    rows.append(row)
                    t = row["test"]
                    log(f"  {name:<10} {size:<5} seed {seed}  {label:<8} score {t['score']:.4f}  top-1 "
                        f"{t['top1_accuracy']:.4f}  mean {t['mean_km']:6.0f} km  ({row['seconds_total']:.0f} s)")
    return rows


def table(rows: list[dict], presets: list[str], split: str = "test") -> str:
    """Markdown: per regime and size, mean ± std over seeds of each recipe, and the default's margins."""
    labels = ["probe", *presets]
    lines = ["| regime | size | " + " | ".join(f"{r}: score / top-1 / mean km" for r in labels)
             + " | default − probe: score / km | default − seed: score / km |",
             "| --- | --- |" + " --- |" * (len(labels) + 2)]
    groups = {}
    for row in rows:
        groups.setdefault((row["regime"], row["size"]), {}).setdefault(row["recipe"], {})[row["seed"]] = row
    for (regime, size), by_recipe in groups.items():
        cells = []
        for label in labels:
            runs = [r[split] for r in by_recipe.get(label, {}).values() if split in r]
            if not runs:
                cells.append("–")
                continue
            stat = {k: (np.mean([m[k] for m in runs]), np.std([m[k] for m in runs])) for k in KEYS}
            cells.append(f"{stat['score'][0]:.4f} ± {stat['score'][1]:.4f} / {stat['top1_accuracy'][0]:.3f} / "
                         f"{stat['mean_km'][0]:.0f} ± {stat['mean_km'][1]:.0f}")
        for other in ("probe", "seed"):
            seeds = sorted(set(by_recipe.get("default", {})) & set(by_recipe.get(other, {})))
            if not seeds:
                cells.append("–")
                continue
            ds = [by_recipe["default"][s][split]["score"] - by_recipe[other][s][split]["score"] for s in seeds]
            dk = [by_recipe["default"][s][split]["mean_km"] - by_recipe[other][s][split]["mean_km"] for s in seeds]
            cells.append(f"{np.mean(ds):+.4f} ± {np.std(ds):.4f} / {np.mean(dk):+.0f}")
        n = len(next(iter(by_recipe.values())))
        lines.append(f"| {regime} | {size} ({n} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines)
