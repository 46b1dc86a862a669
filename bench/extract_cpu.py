"""Extraction speed on the CPU: the whole `extract` pipeline against its two halves.

On synthetic 256x256 JPEGs, with the tiny random backbones, measured in one run:
  decode   the extractor's own DataLoader (ViewsDataset, ShardBatchSampler, collate_views), no model
  model    random uint8 batches of the same size straight into the embedders, no decoding
  pipeline `extract(...)` end to end (views/s as it reports them, and wall clock incl. the image
           check, backbone build and sealing)
for each tiny backbone alone and both together. overlap = pipeline / min(decode, model): 1.0 when
decoding fully hides behind the model or the other way round (target >= 0.8). Where decoding and
the model need the same cores, the ceiling is the shared-core bound 1 / (1/decode + 1/model),
also reported with the pipeline's fraction of it.

    python bench/extract_cpu.py                          # 500 synthetic locations in a temp folder
    python bench/extract_cpu.py --data /tmp/synth500     # reuse (or create) a data folder
    python bench/extract_cpu.py --smoke                  # a few seconds
    py-spy record --subprocesses -o prof.svg -- python bench/extract_cpu.py --only pipeline --configs both
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from benchlib import decode_only, default_workers, ensure_data

from geoscout.competition import VIEWS
from geoscout.data import load_competition
from geoscout.extract.backbones import load_backbone
from geoscout.extract.dataset import DECODE_SIZE
from geoscout.extract.runner import extract

CONFIGS = {
    "clip": ["tiny-clip-random"],
    "convnext": ["tiny-convnext-random"],
    "both": ["tiny-clip-random", "tiny-convnext-random"],
}
PHASES = ("decode", "model", "pipeline")


def model_only(backbones: list[str], n_views: int, batch_size: int):
    embedders = [load_backbone(name, None, "cpu").embedder for name in backbones]
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (batch_size, 3, DECODE_SIZE, DECODE_SIZE), dtype=torch.uint8, generator=generator)
    for embedder in embedders:  # first-call costs (allocator, kernels) are not throughput
        embedder(batch)
    start, views = time.perf_counter(), 0
    while views < n_views:
        for embedder in embedders:
            embedder(batch)
        views += batch_size
    return views, time.perf_counter() - start


def pipeline(data_dir: Path, backbones: list[str], batch_size: int, workers: int, scratch: Path):
    store = Path(tempfile.mkdtemp(prefix="store-", dir=scratch))
    try:
        start = time.perf_counter()
        result = extract(data_dir, store, backbones=backbones, splits=("train",), device="cpu",
                         batch_size=batch_size, workers=workers, progress=False)
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(store)
    return result.views_per_second, wall


def measure(data_dir: Path, scratch: Path, args: argparse.Namespace) -> dict:
    n_views = len(load_competition(data_dir).split("train")) * len(VIEWS)
    rates = defaultdict(list)  # figure -> views/s of each round
    # Rounds of every figure, not each figure's runs back to back: on a shared machine every
    # figure then sees the same share of the other load, and the best round of each is compared.
    for _ in range(args.repeats):
        if "decode" in args.only:
            views, seconds = decode_only(data_dir, args.batch_size, args.workers)
            rates["decode"].append(views / seconds)
        for config in args.configs:
            backbones = CONFIGS[config]
            if "model" in args.only:
                views, seconds = model_only(backbones, n_views, args.batch_size)
                rates[config, "model"].append(views / seconds)
            if "pipeline" in args.only:
                reported, wall = pipeline(data_dir, backbones, args.batch_size, args.workers, scratch)
                rates[config, "pipeline"].append(reported)
                rates[config, "pipeline_wall"].append(n_views / wall)
    results: dict = {"views": n_views, "workers": args.workers, "batch_size": args.batch_size,
                     "torch_threads": torch.get_num_threads(), "configs": {}}
    if "decode" in args.only:
        results["decode"] = max(rates["decode"])
    for config in args.configs:
        r = results["configs"][config] = {
            key: max(rates[config, key]) for key in ("model", "pipeline", "pipeline_wall") if (config, key) in rates
        }
        if set(PHASES) <= set(args.only):
            r["overlap"] = r["pipeline"] / min(results["decode"], r["model"])
            r["shared_cores_bound"] = 1 / (1 / results["decode"] + 1 / r["model"])
            r["of_shared_cores_bound"] = r["pipeline"] / r["shared_cores_bound"]
    return results


def report(results: dict, args: argparse.Namespace) -> None:
    print(f"\n{results['views']} views, batch {results['batch_size']} views, {results['workers']} workers, "
          f"{results['torch_threads']} torch threads, best of {args.repeats} (views/s)")
    if "decode" in results:
        print(f"  decode only                      {results['decode']:8.0f}")
    for config, r in results["configs"].items():
        print(f"  [{config}]")
        for key, label in (("model", "model only"), ("pipeline", "extract (its views/s)"),
                           ("pipeline_wall", "extract wall clock (all of it)")):
            if key in r:
                print(f"    {label:30s} {r[key]:8.0f}")
        if "overlap" in r:
            met = "met" if r["overlap"] >= 0.8 else "NOT met"
            print(f"    overlap = pipeline / min(decode, model) = {r['overlap']:.2f} (target >= 0.8: {met})")
            print(f"    shared-core bound {r['shared_cores_bound']:.0f} views/s; pipeline reaches "
                  f"{r['of_shared_cores_bound']:.2f} of it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="competition-layout folder to use; synthesized there if it has no train CSV")
    parser.add_argument("--locations", type=int, default=500, help="locations to synthesize (4 views each)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="DataLoader workers (default: extract's)")
    parser.add_argument("--batch-size", type=int, default=64, help="views per batch (default: extract's on CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of runs; each figure's best is reported")
    parser.add_argument("--threads", type=int, help="torch threads of the main process (default: torch's)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="backbone sets")
    parser.add_argument("--only", nargs="+", choices=PHASES, default=list(PHASES), help="phases to run (for profiling)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run on 16 locations")
    args = parser.parse_args()
    if args.smoke:
        args.locations, args.repeats = 16, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="geoscout-bench-extract-"))
    try:
        data_dir = ensure_data(Path(args.data) if args.data else scratch / "data", args.locations)
        results = measure(data_dir, scratch, args)
    finally:
        shutil.rmtree(scratch)
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
