"""Extraction speed on one GPU: the real architectures at real sizes, through the real `extract`.

Speed does not depend on the weights, so StreetCLIP (open_clip ViT-L/14-336 QuickGELU) and
ConvNeXt V2-L@384 are built with random weights (see benchlib.randomly_initialised) and run in
bf16 over synthetic 256x256 JPEGs. Measured, in this order:
  decode    extract's DataLoader alone (pinned memory, same workers), no model
  model     random uint8 batches already on the GPU straight into each embedder (steady state)
  extract   `extract(...)` for each backbone alone and both together: views/s as it reports them,
            wall clock, achieved TFLOP/s and fraction of the bf16 dense peak, peak GPU memory
and the projected time for the whole competition (329,900 views, both backbones).
Fits in 5 minutes on one H100 with the defaults (see bench/README.md for running it there).

    python bench/extract_gpu.py                 # on a GPU box; JSON to $OUT/extract_gpu.json if OUT is set
    python bench/extract_gpu.py --compile       # the same with torch.compile (adds compile time)
    python bench/extract_gpu.py --smoke         # seconds, on the CPU, tiny backbones: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from benchlib import decode_only, default_workers, ensure_data, randomly_initialised
from torch.utils.flop_counter import FlopCounterMode

from geoscout.competition import VIEWS
from geoscout.data import load_competition
from geoscout.extract.backbones import load_backbone
from geoscout.extract.dataset import DECODE_SIZE
from geoscout.extract.runner import extract

COMPETITION_VIEWS = 329_900  # 65,980 train + 16,495 test locations, 4 views each
REAL = ("streetclip", "convnextv2-large")
TINY = ("tiny-clip-random", "tiny-convnext-random")
# 2 x multiply-accumulates of one view at the model's input size (FlopCounterMode misses the
# QKV projections of nn.MultiheadAttention's fused inference path, so the ViT is counted by hand).
GFLOP_PER_VIEW = {"streetclip": 382.0, "convnextv2-large": 202.0}
TARGET_VIEWS_PER_S = {"streetclip": 1000, "convnextv2-large": 1200}
TARGET_COMPETITION_S = 8 * 60
H100_SXM_BF16_DENSE_TFLOPS = 989.0


def gflop_per_view(name: str, embedder) -> float:
    """The published count for the real backbones; FlopCounterMode's (a lower bound) for the others."""
    if name in GFLOP_PER_VIEW:
        return GFLOP_PER_VIEW[name]
    view = torch.zeros(1, 3, DECODE_SIZE, DECODE_SIZE, dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter:
        embedder(view)
    return counter.get_total_flops() / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(name: str, device: torch.device, batch_size: int, batches: int, compile: bool) -> dict:
    """Steady-state views/s of one embedder on uint8 batches already on the device, and its GFLOP/view."""
    embedder = load_backbone(randomly_initialised(name), None, device).embedder
    gflop = gflop_per_view(name, embedder)
    run = torch.compile(embedder) if compile else embedder
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, DECODE_SIZE, DECODE_SIZE), dtype=torch.uint8, generator=generator)
    images = images.to(device)
    for _ in range(3):  # kernel selection, allocator growth, compilation
        run(images)
    sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        run(images)
    sync(device)
    views_per_s = batches * batch_size / (time.perf_counter() - start)
    del run, embedder
    free(device)
    return {"views_per_s": views_per_s, "gflop_per_view": gflop}


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_extract(data_dir: Path, names: list[str], device: torch.device, args: argparse.Namespace) -> dict:
    store = Path(tempfile.mkdtemp(prefix="geoscout-bench-store-"))
    free(device)
    try:
        start = time.perf_counter()
        result = extract(
            data_dir, store, backbones=[randomly_initialised(n) for n in names], splits=("train",),
            device=str(device), batch_size=args.batch_size, workers=args.workers, compile=args.compile,
            progress=False,
        )
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(store)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"views_per_s": result.views_per_second, "wall_s": wall, "max_memory_allocated_gib": peak / 2**30}


def measure(data_dir: Path, device: torch.device, names: tuple[str, ...], args: argparse.Namespace) -> dict:
    n_views = len(load_competition(data_dir).split("train")) * len(VIEWS)
    results: dict = {"views": n_views, "model": {}, "extract": {}}
    views, seconds = decode_only(data_dir, args.batch_size, args.workers, pin_memory=device.type == "cuda")
    results["decode_views_per_s"] = views / seconds
    print(f"decode only: {views / seconds:.0f} views/s", flush=True)
    for name in names:
        results["model"][name] = model_only(name, device, args.batch_size, args.model_batches, args.compile)
        print(f"model only [{name}]: {results['model'][name]['views_per_s']:.0f} views/s", flush=True)
    for config in [[n] for n in names] + [list(names)]:
        key = "+".join(config)
        r = results["extract"][key] = run_extract(data_dir, config, device, args)
        gflop = sum(results["model"][n]["gflop_per_view"] for n in config)
        r["tflops"] = r["views_per_s"] * gflop / 1e3
        r["fraction_of_peak"] = r["tflops"] / args.peak_tflops
        model_bound = 1 / sum(1 / results["model"][n]["views_per_s"] for n in config)
        r["overlap"] = r["views_per_s"] / min(results["decode_views_per_s"], model_bound)
        print(f"extract [{key}]: {r['views_per_s']:.0f} views/s, {r['tflops']:.0f} TFLOP/s", flush=True)
    both = results["extract"]["+".join(names)]["views_per_s"]
    results["competition_s_together"] = COMPETITION_VIEWS / both
    results["competition_s_one_by_one"] = sum(COMPETITION_VIEWS / results["extract"][n]["views_per_s"] for n in names)
    return results


def report(results: dict, names: tuple[str, ...], args: argparse.Namespace) -> None:
    print(f"\n{results['device']}, torch {results['torch']}, {results['views']} views, batch {args.batch_size} views, "
          f"{args.workers} workers, compile={args.compile}")
    print(f"  decode only                      {results['decode_views_per_s']:8.0f} views/s")
    for name, m in results["model"].items():
        print(f"  model only {name:26s} {m['views_per_s']:8.0f} views/s  ({m['gflop_per_view']:.3g} GFLOP/view)")
    for key, r in results["extract"].items():
        target = None if args.smoke else TARGET_VIEWS_PER_S.get(key)
        verdict = "" if target is None else f"  target >= {target}: {'met' if r['views_per_s'] >= target else 'NOT met'}"
        print(f"  extract {key:34s} {r['views_per_s']:8.0f} views/s, {r['tflops']:7.1f} TFLOP/s = "
              f"{100 * r['fraction_of_peak']:.1f}% of {args.peak_tflops:.0f}, overlap {r['overlap']:.2f}, "
              f"peak {r['max_memory_allocated_gib']:.1f} GiB, wall {r['wall_s']:.1f} s{verdict}")
    t, s = results["competition_s_together"], results["competition_s_one_by_one"]
    print(f"  whole competition ({COMPETITION_VIEWS} views, {' + '.join(names)}): {t / 60:.1f} min together, "
          f"{s / 60:.1f} min one backbone at a time (target <= {TARGET_COMPETITION_S / 60:.0f} min: "
          f"{'met' if min(t, s) <= TARGET_COMPETITION_S else 'NOT met'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="competition-layout folder; synthesized there if it has no train CSV "
                        "(default: a temporary folder)")
    parser.add_argument("--locations", type=int, default=5_000, help="locations to synthesize (4 views each)")
    parser.add_argument("--batch-size", type=int, default=256, help="views per batch (extract's GPU default)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="DataLoader workers (default: extract's)")
    parser.add_argument("--model-batches", type=int, default=20, help="timed batches of the model-only figure")
    parser.add_argument("--compile", action="store_true", help="torch.compile the embedders")
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS,
                        help="dense bf16 peak to compare with (default: H100 SXM)")
    default_out = Path(os.environ["OUT"]) / "extract_gpu.json" if os.environ.get("OUT") else None
    parser.add_argument("--out", type=Path, default=default_out, help="JSON results (default: $OUT/extract_gpu.json)")
    parser.add_argument("--smoke", action="store_true", help="seconds on the CPU with the tiny backbones")
    args = parser.parse_args()
    if args.smoke:
        args.locations, args.batch_size, args.model_batches = 16, 16, 2
        device, names = torch.device("cpu"), TINY
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark needs a GPU (use --smoke to check the script on the CPU)")
    else:
        device, names = torch.device("cuda"), REAL
    scratch = Path(tempfile.mkdtemp(prefix="geoscout-bench-gpu-"))
    try:
        data_dir = ensure_data(Path(args.data) if args.data else scratch / "data", args.locations)
        results = measure(data_dir, device, names, args)
    finally:
        shutil.rmtree(scratch)
    results.update(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, cpu_count=os.cpu_count(), args={k: str(v) for k, v in vars(args).items()},
    )
    report(results, names, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"results: {args.out}")


if __name__ == "__main__":
    main()
