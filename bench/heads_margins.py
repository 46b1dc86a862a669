"""How sure are the regime table's margins? A paired bootstrap over test rows, and the seed's headroom.

The competition score is a mean over locations: a row earns 0.7 x its classification credit (1, 0.6,
0.4, 0.25, 0.15 for the true state at rank 1..5) + 0.3 x (1 - its km / 5000), as long as the mean
error stays under 5,000 km. So the margin between two recipes on one test split is the mean of
per-row differences, and resampling the test rows (the same rows for both recipes: paired) shows
how much of it is the luck of which 500 or 1,000 locations were drawn. Each table row averages its
seeds' margins; each bootstrap draw resamples every seed's test rows.

It retrains nothing: it reads the heads `bench/heads.py regimes` trained (the current recipes'
digests) and predicts the test split again, checking each recipe's classification credit and mean km
against what results.jsonl recorded. The probe is refitted as `regimes` fitted it (the same answers,
given the same BLAS threads).

The headroom: the seed recipe loses 1 - its score, part of it in classification, 0.7 x (1 - its
classification credit), the rest in position (its mean km / 5000 x 0.3, which no recipe brings to 0).
The table puts the 0.005 margin beside both losses.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import heads_regimes as hr
import numpy as np

from geoscout.geo import haversine_km
from geoscout.heads import predict, recipe
from geoscout.metric import classification_points
from geoscout.stages import HeadPaths, StoreData

TARGET = 0.005  # the margin the heads are asked for
DRAWS = 2000


def row_scores(credit: np.ndarray, km: np.ndarray) -> np.ndarray:
    """Each location's share of the score from its classification credit and error: their mean is the
    competition score (while the mean error is under 5,000 km)."""
    return 0.7 * credit + 0.3 * (1.0 - km / 5000.0)


def recipe_prediction(data: StoreData, work: Path, preset: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The test split's top-5 class ids and positions of a recipe that run_recipe trained."""
    plan = recipe(preset, hr.BACKBONES)
    fit_rows = data.protocol(plan.folds, seed).folds.fit_rows
    out = predict(data.source("test"), HeadPaths(work, preset).ensemble, device="cpu", gallery=data.train, fit_rows=fit_rows)
    return out.top5, np.stack([out.lat, out.lon], axis=1)


def per_row(cache: Path, results: list[dict], regimes: list[str] | None = None, log=print) -> dict[tuple, dict[str, np.ndarray]]:
    """(regime, size, seed) -> recipe -> per-row scores and classification credits on the test split,
    for every data set with the probe, the default and the seed recipe at their current digests."""
    digests = {"probe": "sklearn-LogisticRegressionCV", "default": hr.recipe_digest("default"), "seed": hr.recipe_digest("seed")}
    recorded = {}
    for r in results:
        if digests.get(r["recipe"]) == r["digest"]:
            recorded.setdefault(r["data"], {})[r["recipe"]] = r
    out = {}
    for name, by_recipe in sorted(recorded.items()):
        if regimes and next(iter(by_recipe.values()))["regime"] not in regimes:
            continue
        if set(by_recipe) != set(digests):
            log(f"  {name}: skipped, it lacks {sorted(set(digests) - set(by_recipe))} at the current recipes' digests")
            continue
        first = by_recipe["default"]
        started = time.perf_counter()
        data = StoreData(cache / name / "store", hr.BACKBONES)
        class_id, latlon = data.test_truth()
        rows, seconds = {}, {}
        for label, row in by_recipe.items():
            began = time.perf_counter()
            if label == "probe":
                top5, point = hr.probe_prediction(data)
            else:
                top5, point = recipe_prediction(data, cache / name / f"heads-{digests[label]}", label, first["seed"])
            seconds[label] = time.perf_counter() - began
            credit = classification_points(class_id, top5)
            km = haversine_km(latlon[:, 0], latlon[:, 1], point[:, 0], point[:, 1])
            recorded_test = row["test"]
            if abs(credit.mean() - recorded_test["classification_score"]) > 1e-9 or abs(km.mean() - recorded_test["mean_km"]) > 1e-3:
                raise SystemExit(f"{name}: {label} now scores classification {credit.mean():.6f} and {km.mean():.4f} km, "
                                 f"results.jsonl {recorded_test['classification_score']:.6f} and {recorded_test['mean_km']:.4f} km: "
                                 "the heads on disk are not the ones the table reports")
            rows[label] = row_scores(credit, km)
            rows[f"{label}:credit"] = credit
        out[(first["regime"], first["size"], first["seed"])] = rows
        log(f"  {name}: default − seed {rows['default'].mean() - rows['seed'].mean():+.4f}  ("
            + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + f"; {time.perf_counter() - started:.0f} s)")
    if not out:
        raise SystemExit("no data set in the cache has the probe, the default and the seed recipe at their current digests"
                         + (f" for regimes {regimes}" if regimes else ""))
    return out


def bootstrap(diffs: list[np.ndarray], *, draws: int = DRAWS, seed: int = 0) -> np.ndarray:
    """Bootstrap draws of the mean over seeds of each seed's mean row difference (rows resampled per seed)."""
    rng = np.random.default_rng(seed)
    total = np.zeros(draws)
    for d in diffs:
        total += d[rng.integers(0, len(d), size=(draws, len(d)))].mean(axis=1)
    return total / len(diffs)


def table(data: dict[tuple, dict[str, np.ndarray]]) -> str:
    lines = ["| regime | size | default − seed [95 % interval] | bootstrap draws ≥ +0.005 | rows whose class credit differs: "
             "default better / seed better | seed's loss, 1 − score: all / in classification | 0.005 as a share of it: "
             "all / classification | default − probe [95 % interval] |",
             "| --- | --- | --- | ---: | --- | --- | --- | --- |"]
    groups = {}
    for (regime, size, seed), rows in data.items():
        groups.setdefault((regime, size), []).append(rows)
    for (regime, size), runs in groups.items():
        cells = []
        for other in ("seed", "probe"):
            diffs = [r["default"] - r[other] for r in runs]
            boot = bootstrap(diffs)
            low, high = np.percentile(boot, [2.5, 97.5])
            cells.append((np.mean([d.mean() for d in diffs]), low, high, (boot >= TARGET).mean()))
        better = sum(int((r["default:credit"] > r["seed:credit"]).sum()) for r in runs)
        worse = sum(int((r["default:credit"] < r["seed:credit"]).sum()) for r in runs)
        rows_total = sum(len(r["default"]) for r in runs)
        loss = np.mean([1 - r["seed"].mean() for r in runs])
        loss_cls = np.mean([0.7 * (1 - r["seed:credit"].mean()) for r in runs])
        share = " / ".join(f"{TARGET / x:.0%}" if x > 0 else "–" for x in (loss, loss_cls))
        (m, lo, hi, above), (pm, plo, phi, _) = cells
        seeds = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
        lines.append(f"| {regime} | {size} ({seeds}) | {m:+.4f} [{lo:+.4f}, {hi:+.4f}] | {above:.0%} "
                     f"| {better} / {worse} of {rows_total:,} | {loss:.4f} / {loss_cls:.4f} | {share} "
                     f"| {pm:+.4f} [{plo:+.4f}, {phi:+.4f}] |")
    return "\n".join(lines)


def main(cache: Path, regimes: list[str] | None = None, log=print) -> str:
    unknown = sorted(set(regimes or ()) - set(hr.REGIMES))
    if unknown:
        raise SystemExit(f"unknown regime(s) {unknown}; available: {', '.join(hr.REGIMES)}")
    path = cache / "results.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run `python bench/heads.py regimes --cache {cache}` first")
    results = [json.loads(line) for line in path.read_text().splitlines()]
    return table(per_row(cache, results, regimes, log))
