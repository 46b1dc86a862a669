"""The heads at competition scale: time and peak memory of every stage, accuracy against a logistic probe.

Synthetic features with a planted answer (`geoscout.testing.make_planted_features`): 65,980 training
and 16,495 test locations x 4 views, two backbones sharing the labels (1024-d and 1536-d, CLIP- and
ConvNeXt-like widths), fp16, 33 classes over a USA-like box, position inside a class recoverable,
per-view noise, 15% of views masked (their slots hold garbage), 1% of locations with no view at all.
Both splits are written to a real store with geoscout's `ShardedWriter` (test without labels, as in
the competition) and read back with `read_split`; `--in-memory` skips the store.

Stages, timed one after the other in this process (peak memory: VmHWM of /proc/self/status, reset
before each stage through /proc/self/clear_refs; CUDA: torch.cuda.max_memory_allocated, reset per stage):
  load (read_split train + test, page cache evicted first), each member of the preset's recipe
  cross-fitted over K folds, the ensemble (temperatures, weights, regressor folds, retrieval, decoding
  choices, all on out-of-fold outputs), predict on the test split;
and the probe a user would reach for: scikit-learn LogisticRegression (lbfgs, C=1, standardised inputs)
on the masked mean of each location's views, both backbones side by side, coordinates at the
predicted class's centroid. Both are scored on the test split with the competition metric.

    python bench/heads.py scale                  # the full run (about 3 GB RAM, 4 GB temporary disk)
    python bench/heads.py scale --smoke          # a minute
    python bench/heads.py scale --preset seed --train 8000 --test 2000
    python bench/heads.py scale --device cuda --json $OUT/heads.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import torch
from benchlib import evict

from geoscout.atomic import atomic_write_text
from geoscout.competition import NO_PREDICTION
from geoscout.geo import spherical_mean
from geoscout.heads import fit_ensemble, make_protocol, predict, recipe, train_members
from geoscout.metric import score_predictions
from geoscout.store.features import SplitFeatures
from geoscout.store.layout import MANIFEST, SCHEMA_VERSION, features_path, samples_path
from geoscout.store.reader import read_split
from geoscout.store.split import make_validation_split
from geoscout.store.writer import ShardedWriter, StoreIdentity
from geoscout.testing import make_planted_features

CLIP, CONVNEXT = "streetclip", "convnextv2-large"  # in this order: the seed preset gives the first one its StreetCLIP role
FULL = dict(train=65_980, test=16_495, dims={CLIP: 1024, CONVNEXT: 1536})
SMOKE = dict(train=1_500, test=400, dims={CLIP: 64, CONVNEXT: 96})
NUM_CLASSES = 33
VAL_FRACTION = 0.1  # geoscout.stages.DEFAULT_VAL_FRACTION
MISSING = 0.15  # the planted generator's default share of masked views
# Difficulty: the distance between two class prototypes over the noise of a location's mean view
# (about 3.4 views present). Two random N(0, I_d) prototypes are sqrt(2d) apart, so the noise per
# view is sqrt(2d) / 2 / separation * sqrt(3.4): the same difficulty at any width (--smoke too).
SEPARATION = {CLIP: 2.2, CONVNEXT: 2.0}
RADIUS_DEG = 1.2  # the generator keeps class centres 2.5 radii apart; 33 classes fit in its box up to about 1.4
SHARD_SIZE = 1024  # extract's default


# ------------------------------------------------------------------------------------------ memory, load


def _status_kb(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Stages:
    """Times each stage; memory peaks per stage (see the module doc)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rows: list[dict] = []
        self.resettable = _reset_peak()

    @contextlib.contextmanager
    def stage(self, name: str, group: str):
        gc.collect()
        self.resettable = _reset_peak() and self.resettable
        rss0 = _status_kb("VmRSS")
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        load0 = loadavg()
        started = time.perf_counter()
        row = {"stage": name, "group": group}
        yield row
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            row["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        row["seconds"] = time.perf_counter() - started
        row["rss_start_gb"] = rss0 / 1e6
        row["peak_rss_gb"] = _status_kb("VmHWM") / 1e6  # cumulative if not resettable
        row["peak_above_start_gb"] = row["peak_rss_gb"] - row["rss_start_gb"]
        row["load_start"], row["load_end"] = load0, loadavg()
        self.rows.append(row)
        extra = f", CUDA peak {row['cuda_peak_gb']:.2f} GB" if "cuda_peak_gb" in row else ""
        print(f"  {name:<34} {row['seconds']:8.1f} s  peak RSS {row['peak_rss_gb']:.2f} GB "
              f"(+{row['peak_above_start_gb']:.2f}){extra}  load {row['load_end']}", flush=True)

    def total(self, group: str) -> float:
        return sum(r["seconds"] for r in self.rows if r["group"] == group)


# ------------------------------------------------------------------------------------------ data


def noise_for(dims: dict[str, int], separation: dict[str, float]) -> dict[str, float]:
    views = 4 * (1 - MISSING)
    return {b: float(np.sqrt(2 * d) / 2 / separation[b] * np.sqrt(views)) for b, d in dims.items()}


def planted(n: int, dims: dict[str, int], noise: dict[str, float], *, split: str, seed: int) -> SplitFeatures:
    # world_seed fixes classes, centres and prototypes (shared by both splits); seed draws the locations
    return make_planted_features(n=n, num_classes=NUM_CLASSES, dims=dims, noise=noise, radius_deg=RADIUS_DEG,
                                 missing_fraction=MISSING, world_seed=0, seed=seed, split=split,
                                 dataset_fingerprint="bench-heads")


def write_store(store_dir: Path, splits: dict[str, SplitFeatures]) -> None:
    """One store folder in geoscout's layout; the test sample table has no labels, as in the competition."""
    first = next(iter(splits.values()))
    store_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(store_dir / MANIFEST, json.dumps({
        "schema_version": SCHEMA_VERSION, "dataset_fingerprint": first.dataset_fingerprint,
        "classes": first.classes.tolist()}))
    for split, feats in splits.items():
        n = len(feats)
        labelled = split == "train"
        state_idx = feats.classes[feats.class_id] if labelled else None
        pl.DataFrame({
            "sample_id": feats.sample_id,
            "state_idx": pl.Series(state_idx if labelled else [None] * n, dtype=pl.Int64),
            "class_id": pl.Series(feats.class_id if labelled else [None] * n, dtype=pl.Int64),
            "latitude": pl.Series(feats.latlon[:, 0] if labelled else [None] * n, dtype=pl.Float64),
            "longitude": pl.Series(feats.latlon[:, 1] if labelled else [None] * n, dtype=pl.Float64),
        }).write_csv(samples_path(store_dir, split))
        for backbone, arr in feats.features.items():
            identity = StoreIdentity(
                split=split, backbone=backbone, n_rows=n, split_fingerprint=f"bench-{split}",
                dataset_fingerprint=feats.dataset_fingerprint,
                backbone_fingerprint=feats.backbone_fingerprints[backbone], spec={}, weights_identity={},
                preprocessing={}, classes=feats.classes.tolist(), dims={"features": arr.shape[2]}, shard_size=SHARD_SIZE,
                precision="fp32",
            )
            writer = ShardedWriter(store_dir, identity)
            writer.prepare()
            for shard in range(writer.n_shards):
                rows = writer.shard_rows(shard)
                writer.write_shard(shard, {"features": arr[rows.start:rows.stop]},
                                   feats.masks[backbone][rows.start:rows.stop], [])
            writer.seal(feats.sample_id)


# ------------------------------------------------------------------------------------------ probe


def masked_mean(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, D) float32 mean of the present views; zeros for a location without any."""
    acc = np.zeros((features.shape[0], features.shape[2]), dtype=np.float32)
    for v in range(features.shape[1]):
        np.add(acc, features[:, v], out=acc, where=mask[:, v, None])
    count = mask.sum(axis=1)
    acc[count > 0] /= count[count > 0, None]
    return acc


def class_centroids(class_id: np.ndarray, latlon: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((n_classes, 2))
    for c in range(n_classes):
        rows = class_id == c
        if rows.any():
            out[c] = spherical_mean(latlon[rows, 0], latlon[rows, 1])
    return out


def run_probe(stages: Stages, train: SplitFeatures, test: SplitFeatures, train_rows: np.ndarray,
              backbones: list[str], max_iter: int, threads: int | None) -> tuple[dict, dict]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads) if threads else contextlib.nullcontext():
        with stages.stage("probe: masked mean + standardise", "probe"):
            x_train = np.concatenate([masked_mean(train.features[b], train.masks[b]) for b in backbones], axis=1)[train_rows]
            x_test = np.concatenate([masked_mean(test.features[b], test.masks[b]) for b in backbones], axis=1)
            scaler = StandardScaler().fit(x_train)
            x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
        y = train.class_id[train_rows]
        with stages.stage(f"probe: LogisticRegression fit ({max_iter} it)", "probe") as row, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning at a moderate max_iter is the point
            clf = LogisticRegression(solver="lbfgs", max_iter=max_iter, C=1.0).fit(x_train, y)
            row["iterations"] = int(np.max(clf.n_iter_))
        with stages.stage("probe: predict test", "probe"):
            proba = clf.predict_proba(x_test)
            order = np.argsort(-proba, axis=1)[:, :5]
            top5 = np.full((len(x_test), 5), NO_PREDICTION, dtype=np.int64)
            top5[:, : order.shape[1]] = clf.classes_[order]
            centroids = class_centroids(y, train.latlon[train_rows], len(train.classes))
            lat, lon = centroids[top5[:, 0]].T
    return {"top5": top5, "lat": lat, "lon": lon}, {"iterations": int(np.max(clf.n_iter_)), "max_iter": max_iter}


# ------------------------------------------------------------------------------------------ heads


def run_heads(stages: Stages, train: SplitFeatures, test: SplitFeatures, val_mask: np.ndarray, work: Path,
              args: argparse.Namespace) -> tuple[dict, dict]:
    backbones = list(train.features)
    plan = dataclasses.replace(recipe(args.preset, backbones), folds=args.folds)
    info = {"members": {}}
    with stages.stage("heads: process warm-up (lazy imports)", "heads"):
        # AdamW's first construction imports torch._dynamo (about 2 s): once per process, which every
        # `geoscout train` stage pays too; timed here so the first member is not charged for it.
        torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    with stages.stage(f"heads: protocol (validation split, {plan.folds} folds)", "heads"):
        protocol = make_protocol(train, val_mask, folds=plan.folds)
    dirs = {m.name: work / "heads" / m.name for m in plan.members}
    for spec in plan.members:
        with stages.stage(f"heads: {spec.name} ({plan.folds} folds)", "heads") as row:
            r = train_members(train, [spec], protocol, dirs, device=args.device, progress=args.progress)[0]
            row.update(oof_score=r.oof["score"], oof_top1=r.oof["top1_accuracy"],
                       steps=[f["steps_run"] for f in r.details["folds"]], l2=r.details.get("l2"))
        info["members"][spec.name] = {"oof": r.oof, "details": r.details}
    with stages.stage("heads: fit_ensemble (weights, regressor folds, retrieval, decoding)", "heads") as row:
        e = fit_ensemble(train, member_dirs=list(dirs.values()), protocol=protocol, out_dir=work / "heads" / "ensemble",
                         config=plan.ensemble, regressor_config=plan.regressor, device=args.device, progress=args.progress)
        row.update(weights=e.weights, decode=e.decode, regressor=e.regressor, oof_score=e.oof["ensemble"]["score"])
    info["ensemble"] = {"weights": dict(zip(e.members, e.weights)), "temperatures": e.temperatures, "decode": e.decode,
                        "regressor": e.regressor, "oof": e.oof}
    with stages.stage(f"heads: predict test ({len(test):,} rows)", "heads"):
        pred = predict(test, work / "heads" / "ensemble", device=args.device, gallery=train,
                       fit_rows=protocol.folds.fit_rows)
    return {"top5": pred.top5, "lat": pred.lat, "lon": pred.lon}, {"info": info}


def score(pred: dict, truth: SplitFeatures) -> dict:
    return score_predictions(truth.class_id, truth.latlon[:, 0], truth.latlon[:, 1], pred["top5"], pred["lat"], pred["lon"])


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    out = {"cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "numpy": np.__version__}
    try:
        import sklearn
        out["sklearn"] = sklearn.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", help="head preset: default or seed")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the probe always runs on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads and the BLAS pool (default: leave as is)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (1,500 / 400 locations, 64-d / 96-d): seconds")
    p.add_argument("--train", type=int, default=None, help="training locations (default 65,980; fewer = a labelled subset)")
    p.add_argument("--test", type=int, default=None, help="test locations (default 16,495)")
    p.add_argument("--folds", type=int, default=5, help="K of the cross-fitting")
    p.add_argument("--probe-max-iter", type=int, default=200, help="LogisticRegression max_iter")
    p.add_argument("--no-probe", action="store_true", help="skip the logistic probe (e.g. where scikit-learn is missing)")
    p.add_argument("--in-memory", action="store_true", help="no store: hand the generated arrays to the heads directly")
    p.add_argument("--dir", default=None, help="parent folder of the temporary store and heads (default: the system's)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument("--progress", action="store_true", help="show the heads' progress bars")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)  # numpy's BLAS and faiss's OpenMP too (the probe's and the retrieval's)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a plain `kill` still removes the temporary folder
    sizes = dict(SMOKE if args.smoke else FULL)
    n_train, n_test = args.train or sizes["train"], args.test or sizes["test"]
    dims = sizes["dims"]
    noise = noise_for(dims, SEPARATION)
    device = torch.device(args.device)
    started = time.perf_counter()
    info = {"machine": machine(), "argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M"), "preset": args.preset,
            "device": args.device, "train": n_train, "test": n_test, "dims": dims, "noise": noise,
            "separation": SEPARATION, "radius_deg": RADIUS_DEG, "folds": args.folds, "load_at_start": loadavg()}
    print(f"heads benchmark: {n_train:,} train + {n_test:,} test locations x 4 views, {dims}, fp16, "
          f"{NUM_CLASSES} classes; preset {args.preset!r}, {args.folds} folds, device {args.device}, "
          f"torch threads {torch.get_num_threads()}; load {loadavg()}", flush=True)
    stages = Stages(device)
    work = Path(tempfile.mkdtemp(prefix="geoscout-bench-heads-", dir=args.dir))
    try:
        with stages.stage("build planted features (not heads)", "setup"):
            train = planted(n_train, dims, noise, split="train", seed=1)
            test = planted(n_test, dims, noise, split="test", seed=2)
        truth = SplitFeatures(split="test", sample_id=test.sample_id, features={}, masks={}, classes=test.classes,
                              class_id=test.class_id, latlon=test.latlon)
        if not args.in_memory:
            store = work / "store"
            with stages.stage("write store (ShardedWriter, not heads)", "setup"):
                write_store(store, {"train": train, "test": test})
            del train, test
            for split in ("train", "test"):
                for b in dims:
                    evict(features_path(store, split, b))
            with stages.stage("load: read_split train + test (cold)", "heads"):
                train = read_split(store, "train", list(dims))
                test = read_split(store, "test", list(dims))
            shutil.rmtree(store)
        assert not test.labelled or args.in_memory
        val_mask = make_validation_split(train.class_id, VAL_FRACTION, seed=0)
        train_rows = np.flatnonzero(~val_mask)
        heads_pred, heads_info = run_heads(stages, train, test, val_mask, work, args)
        probe_pred, probe_info = (None, None)
        if not args.no_probe:
            probe_pred, probe_info = run_probe(stages, train, test, train_rows, list(dims), args.probe_max_iter, args.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = {"geoscout ensemble": score(heads_pred, truth)}
    if probe_pred is not None:
        results["logistic probe (both, concat)"] = score(probe_pred, truth)
    heads_s, probe_s = stages.total("heads"), stages.total("probe")
    summary = {"heads_seconds": heads_s, "probe_seconds": probe_s, "heads_peak_rss_gb": max(
        (r["peak_rss_gb"] for r in stages.rows if r["group"] == "heads"), default=0.0)}
    if probe_pred is not None:
        h, q = results["geoscout ensemble"], results["logistic probe (both, concat)"]
        summary.update(time_ratio=heads_s / probe_s, score_delta=h["score"] - q["score"],
                       top1_delta=h["top1_accuracy"] - q["top1_accuracy"], mean_km_ratio=h["mean_km"] / q["mean_km"])
    info.update(stages=stages.rows, test_metrics=results, heads=heads_info["info"], probe=probe_info, summary=summary,
                peak_resettable=stages.resettable, load_at_end=loadavg(), wall_seconds=time.perf_counter() - started)

    print(f"\non the test split ({n_test:,} locations; load at end {loadavg()}):")
    keys = ("score", "classification_score", "top1_accuracy", "top5_accuracy", "mean_km", "median_km")
    print(f"{'':<40}" + "".join(f"{k:>22}" for k in keys))
    for name, m in results.items():
        print(f"{name:<40}" + "".join(f"{m[k]:>22.4f}" for k in keys))
    print(f"\ngeoscout heads, all stages: {heads_s:.1f} s (target <= 300 s on 2 CPU cores, <= 30 s on one H100); "
          f"peak RSS {summary['heads_peak_rss_gb']:.2f} GB")
    if probe_pred is not None:
        print(f"logistic probe: {probe_s:.1f} s ({probe_info['iterations']} lbfgs iterations of max {args.probe_max_iter}); "
              f"heads / probe time {summary['time_ratio']:.2f}x; score {summary['score_delta']:+.4f}, "
              f"top-1 {summary['top1_delta']:+.4f}, mean km x{summary['mean_km_ratio']:.3f}")
    out = args.json or (str(Path(os.environ["OUT"]) / "heads.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(info, indent=1, default=float) + "\n")
        print(f"wrote {out}")
    return info


if __name__ == "__main__":
    main()
