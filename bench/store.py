"""Feature-store read speed: geoscout's reader against the raw bytes of the same file.

Builds one competition-scale store file with the real ShardedWriter (65,980 x 4 x 1024 fp16,
about 540 MB, contiguous), then times
  - a whole-split read: `read_split` against `np.fromfile` / `np.memmap` of the dataset's bytes
    (found with `ds.id.get_offset()`), from a cold page cache (the file is evicted with
    posix_fadvise(DONTNEED) before each run) and from a warm one;
  - random mini-batches (sorted row indices) from h5py against the memmap;
  - the same reads from chunked + compressed copies of the file, to show what contiguous buys.
Everything lives in one temporary folder that is removed at the end.

    python bench/store.py            # the full run (about 2 GB of temporary disk)
    python bench/store.py --smoke    # a few seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import polars as pl
from benchlib import evict

from geoscout.atomic import atomic_write_text
from geoscout.store.layout import MANIFEST, SCHEMA_VERSION, samples_path
from geoscout.store.reader import read_features, read_split
from geoscout.store.writer import ShardedWriter, StoreIdentity

SPLIT = "train"
BACKBONE = "bench"
N_CLASSES = 33
COMPRESSED = {  # name -> h5py create_dataset options; chunks of 64 locations (256 KB raw)
    "gzip4+shuffle": dict(compression="gzip", compression_opts=4, shuffle=True),
    "lzf+shuffle": dict(compression="lzf", shuffle=True),
}
CHUNK_ROWS = 64


def build_store(store_dir: Path, rows: int, dim: int, shard_size: int, seed: int) -> Path:
    """A store folder (manifest, sample table, one sealed features file) made by the real writer."""
    store_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    classes = list(range(N_CLASSES))
    atomic_write_text(store_dir / MANIFEST, json.dumps(
        {"schema_version": SCHEMA_VERSION, "dataset_fingerprint": "bench", "classes": classes}))
    class_id = rng.integers(0, N_CLASSES, rows)
    pl.DataFrame({
        "sample_id": np.arange(rows), "state_idx": class_id, "class_id": class_id,
        "latitude": rng.uniform(25, 49, rows), "longitude": rng.uniform(-124, -67, rows),
    }).write_csv(samples_path(store_dir, SPLIT))
    identity = StoreIdentity(
        split=SPLIT, backbone=BACKBONE, n_rows=rows, split_fingerprint="bench", dataset_fingerprint="bench",
        backbone_fingerprint="bench", spec={}, weights_identity={}, preprocessing={}, classes=classes,
        dims={"features": dim}, shard_size=shard_size, precision="fp32",
    )
    writer = ShardedWriter(store_dir, identity)
    writer.prepare()
    for shard in range(writer.n_shards):
        n = len(writer.shard_rows(shard))
        feats = rng.standard_normal((n, 4, dim), dtype=np.float32).astype(np.float16)
        writer.write_shard(shard, {"features": feats}, np.ones((n, 4), dtype=bool), [])
    return writer.seal(np.arange(rows))


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def best_seconds(fn, repeats: int, before=None) -> float:
    best = float("inf")
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def layout(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    with h5py.File(path, "r") as f:
        ds = f["features"]
        offset = ds.id.get_offset()
        if offset is None:
            raise RuntimeError(f"{path}: features are not stored contiguously")
        return offset, ds.shape, ds.dtype


def whole_split_readers(store_dir: Path, path: Path) -> dict:
    offset, shape, dtype = layout(path)
    count = int(np.prod(shape))

    def geoscout_read_split():
        return read_split(store_dir, SPLIT, [BACKBONE]).features[BACKBONE]

    def geoscout_read_features():
        return read_features(path)[2]

    def numpy_fromfile():
        with open(path, "rb") as f:
            f.seek(offset)
            return np.fromfile(f, dtype=dtype, count=count).reshape(shape)

    def numpy_memmap_copy():
        return np.array(np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape))

    return {
        "geoscout read_split": geoscout_read_split,  # the heads' entry point: + sample CSV, mask, checks
        "geoscout read_features": geoscout_read_features,  # the one h5 file: features, mask, sample_id
        "np.fromfile": numpy_fromfile,
        "np.memmap copy": numpy_memmap_copy,
    }


def h5_whole_read(path: Path):
    def read():
        with h5py.File(path, "r") as f:
            ds = f["features"]
            out = np.empty(ds.shape, dtype=ds.dtype)
            ds.read_direct(out)
            return out
    return read


def random_batches(rows: int, batch: int, n_batches: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(rows, size=batch, replace=False)) for _ in range(n_batches)]


def batches_per_second_h5(path: Path, batches: list[np.ndarray], repeats: int) -> float:
    with h5py.File(path, "r") as f:
        ds = f["features"]
        seconds = best_seconds(lambda: [ds[idx] for idx in batches], repeats)
    return len(batches) / seconds


def batches_per_second_memmap(path: Path, batches: list[np.ndarray], repeats: int) -> float:
    offset, shape, dtype = layout(path)
    mm = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    return len(batches) / best_seconds(lambda: [np.asarray(mm[idx]) for idx in batches], repeats)


def write_compressed(src: np.ndarray, path: Path, options: dict) -> float:
    start = time.perf_counter()
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=src, chunks=(CHUNK_ROWS, *src.shape[1:]), **options)
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    parent = Path(args.dir) if args.dir else None
    tmp = Path(tempfile.mkdtemp(prefix="geoscout-bench-store-", dir=parent))
    try:
        return measure(tmp, args)
    finally:
        shutil.rmtree(tmp)


def measure(tmp: Path, args: argparse.Namespace) -> dict:
    store_dir = tmp / "store"
    start = time.perf_counter()
    path = build_store(store_dir, args.rows, args.dim, args.shard_size, args.seed)
    build_s = time.perf_counter() - start
    nbytes = args.rows * 4 * args.dim * 2
    gb = nbytes / 1e9
    print(f"store: {path.name}, {args.rows} x 4 x {args.dim} fp16 = {gb:.3f} GB "
          f"(file {path.stat().st_size / 1e9:.3f} GB), built by ShardedWriter in {build_s:.1f} s")
    results: dict = {"rows": args.rows, "dim": args.dim, "gb": gb, "build_s": build_s, "whole_split": {}, "batches": {}}

    readers = whole_split_readers(store_dir, path)
    reference = readers["np.fromfile"]()
    if not np.array_equal(readers["geoscout read_split"](), reference):
        raise RuntimeError("read_split and np.fromfile disagree: the offset or layout is wrong")
    for cache in ("cold", "warm"):
        before = partial(evict if cache == "cold" else warm, path)
        # rounds of every reader, not each reader's runs back to back: on a shared machine every
        # reader then sees the same share of the other load
        best = {name: float("inf") for name in readers}
        for _ in range(args.repeats):
            for name, fn in readers.items():
                best[name] = min(best[name], best_seconds(fn, 1, before))
        for name, seconds in best.items():
            results["whole_split"][f"{name} ({cache})"] = {"seconds": seconds, "gb_per_s": gb / seconds}
    results["ratios"] = {}
    for cache in ("cold", "warm"):
        raw = max(results["whole_split"][f"{n} ({cache})"]["gb_per_s"] for n in ("np.fromfile", "np.memmap copy"))
        for reader in ("read_split", "read_features"):
            results["ratios"][f"{reader} ({cache})"] = results["whole_split"][f"geoscout {reader} ({cache})"]["gb_per_s"] / raw

    batches = random_batches(args.rows, args.batch, args.batches, args.seed)
    warm(path)
    results["batches"]["h5py contiguous"] = batches_per_second_h5(path, batches, args.repeats)
    results["batches"]["np.memmap"] = batches_per_second_memmap(path, batches, args.repeats)

    results["compressed"] = {}
    for name, options in COMPRESSED.items():
        cpath = tmp / f"{name}.h5"
        write_s = write_compressed(reference, cpath, options)
        read = h5_whole_read(cpath)
        cold_s = best_seconds(read, 1, partial(evict, cpath))
        warm_s = best_seconds(read, 1, partial(warm, cpath))
        results["compressed"][name] = {
            "size_ratio": cpath.stat().st_size / nbytes, "write_s": write_s,
            "cold_gb_per_s": gb / cold_s, "warm_gb_per_s": gb / warm_s,
            "batches_per_s": batches_per_second_h5(cpath, batches, 1),
        }
        cpath.unlink()
    return results


def report(results: dict, args: argparse.Namespace) -> None:
    print(f"\nwhole split ({results['gb']:.3f} GB), best of {args.repeats}:")
    for name, r in results["whole_split"].items():
        print(f"  {name:30s} {r['gb_per_s']:6.2f} GB/s  ({r['seconds']:.3f} s)")
    for name, ratio in results["ratios"].items():
        print(f"  {name} / best raw: {ratio:.2f} (target >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'})")
    print(f"\nrandom mini-batches of {args.batch} sorted rows (warm cache), best of {args.repeats}:")
    for name, rate in results["batches"].items():
        print(f"  {name:30s} {rate:8.1f} batches/s")
    print(f"\nchunked ({CHUNK_ROWS} rows/chunk) + compressed, one run each:")
    for name, r in results["compressed"].items():
        print(f"  {name:14s} size {r['size_ratio']:.2f}x, write {r['write_s']:.1f} s, whole read "
              f"{r['cold_gb_per_s']:.2f} GB/s cold / {r['warm_gb_per_s']:.2f} warm, {r['batches_per_s']:.1f} batches/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=65_980, help="locations in the split (default: the competition's train)")
    parser.add_argument("--dim", type=int, default=1024, help="feature size (default 1024, StreetCLIP's)")
    parser.add_argument("--shard-size", type=int, default=1024, help="writer shard size, as extract uses")
    parser.add_argument("--batch", type=int, default=256, help="rows per random mini-batch")
    parser.add_argument("--batches", type=int, default=200, help="random mini-batches per timing")
    parser.add_argument("--repeats", type=int, default=5, help="timings per figure; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", help="where the temporary store goes (default: the system temp folder)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run on a small store")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.batches, args.repeats = 2_000, 20, 1
    results = run(args)
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
