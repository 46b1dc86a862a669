"""Extraction on one GPU: the real architectures at real sizes, through the real `extract`, in one call.

Speed does not depend on the weights, so StreetCLIP (open_clip ViT-L/14-336 QuickGELU) and
ConvNeXt V2-L@384 are built with random weights (see benchlib.randomly_initialised) and run
over synthetic 256x256 JPEGs. Measured, in this order:
  decode     extract's DataLoader alone (pinned memory, same workers), no model
  precision  one batch of real decoded views through each backbone in fp32, bf16 and fp16: cosine
             of each view's features against fp32 (min, mean) and the largest |value| (fp16 and the
             float16 store hold up to 65,504). Random weights: trained ones may differ
  model      uint8 batches already on the GPU straight into each embedder, eager and compiled
             (steady state; compile time apart), and compiled-vs-eager cosine on one batch
  extract    `extract(...)` with both backbones together (each view decoded once for both), at
             extract's defaults (precision auto, compile on with CUDA): views/s as it reports
             them, wall clock, achieved TFLOP/s and fraction of the dense peak, peak GPU memory;
             `--each` adds each backbone alone
and the projected time for the whole competition (329,900 views, both backbones).
Fits one device call of 10 minutes on an H100/H200 with the defaults (see bench/README.md).

    python bench/extract_gpu.py                 # on a GPU box; JSON to $OUT/extract_gpu.json if OUT is set
    python bench/extract_gpu.py --no-compile    # extract eager (model-only still times both)
    python bench/extract_gpu.py --smoke         # the tiny backbones on the CPU: checks the script end to end
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
from geoscout.device import resolve_precision
from geoscout.extract.backbones import load_backbone
from geoscout.extract.dataset import DECODE_SIZE, ViewsDataset
from geoscout.extract.runner import extract

COMPETITION_VIEWS = 329_900  # 65,980 train + 16,495 test locations, 4 views each
REAL = ("streetclip", "convnextv2-large")
TINY = ("tiny-clip-random", "tiny-convnext-random")
# 2 x multiply-accumulates of one view at the model's input size (FlopCounterMode misses the
# QKV projections of nn.MultiheadAttention's fused inference path, so the ViT is counted by hand).
GFLOP_PER_VIEW = {"streetclip": 382.0, "convnextv2-large": 202.0}
TARGET_COMPETITION_S = 6 * 60  # both backbones, one H100
H100_SXM_BF16_DENSE_TFLOPS = 989.0
FP16_MAX = 65_504.0


def gflop_per_view(name: str, embedder) -> float:
    """The published count for the real backbones; FlopCounterMode's (a lower bound) for the others."""
    if name in GFLOP_PER_VIEW:
        return GFLOP_PER_VIEW[name]
    view = torch.zeros(1, 3, DECODE_SIZE, DECODE_SIZE, dtype=torch.uint8, device=embedder.device)
    with FlopCounterMode(display=False) as counter:
        embedder(view)
    return counter.get_total_flops() / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def real_batch(data_dir: Path, n_views: int) -> torch.Tensor:
    """(n_views, 3, 256, 256) uint8: decoded views of the first training locations."""
    dataset = ViewsDataset(load_competition(data_dir).split("train"), bad_images="fail")
    locations = -(-n_views // len(VIEWS))
    return torch.cat([dataset[i][1] for i in range(locations)])[:n_views]


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def precision_agreement(name: str, device: torch.device, batch: torch.Tensor) -> dict:
    """Per-view cosine of bf16 and fp16 features against fp32 on one batch, and the largest |value|."""
    embedder = load_backbone(randomly_initialised(name), None, device, precision="fp32").embedder
    images = batch.to(device)
    reference = embedder(images)
    out = {"max_abs_fp32": float(max(v.abs().max() for v in reference.values()))}
    for precision in ("bf16", "fp16"):
        embedder.precision = precision  # the same weights, another autocast dtype
        result = embedder(images)
        cos = torch.cat([cosines(result[k], reference[k]) for k in reference])
        finite = all(bool(torch.isfinite(v).all()) for v in result.values())
        out[precision] = {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "finite": finite,
                          "max_abs": float(max(v.abs().max() for v in result.values()))}
    del embedder
    free(device)
    return out


def steady_views_per_s(run, images: torch.Tensor, device: torch.device, batches: int) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        run(images)
    sync(device)
    return batches * images.shape[0] / (time.perf_counter() - start)


def model_only(name: str, device: torch.device, batch_size: int, batches: int, compile: bool) -> dict:
    """Eager (and compiled) views/s of one embedder on uint8 batches already on the device."""
    embedder = load_backbone(randomly_initialised(name), None, device).embedder
    gflop = gflop_per_view(name, embedder)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, DECODE_SIZE, DECODE_SIZE), dtype=torch.uint8, generator=generator)
    images = images.to(device)
    for _ in range(3):  # kernel selection, allocator growth
        eager_out = embedder(images)
    result = {"gflop_per_view": gflop, "eager_views_per_s": steady_views_per_s(embedder, images, device, batches)}
    if compile:
        compiled = torch.compile(embedder, dynamic=False)  # as extract compiles it
        start = time.perf_counter()
        compiled_out = compiled(images)
        sync(device)
        result["compile_s"] = time.perf_counter() - start
        for _ in range(2):
            compiled(images)
        result["compiled_views_per_s"] = steady_views_per_s(compiled, images, device, batches)
        cos = torch.cat([cosines(compiled_out[k], eager_out[k]) for k in eager_out])
        result["compiled_vs_eager_cos_min"] = float(cos.min())
        del compiled
    del embedder
    free(device)
    return result


def run_extract(data_dir: Path, names: list[str], device: torch.device, args: argparse.Namespace) -> dict:
    store = Path(tempfile.mkdtemp(prefix="geoscout-bench-store-"))
    free(device)
    try:
        start = time.perf_counter()
        result = extract(
            data_dir, store, backbones=[randomly_initialised(n) for n in names], splits=("train",),
            device=str(device), batch_size=args.batch_size, workers=args.workers, compile=args.compile,
            check_images=False, progress=False,
        )
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(store)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"views_per_s": result.views_per_second, "wall_s": wall, "max_memory_allocated_gib": peak / 2**30,
            "precision": result.precision, "compiled": result.compiled}


def measure(data_dir: Path, device: torch.device, names: tuple[str, ...], args: argparse.Namespace) -> dict:
    n_views = len(load_competition(data_dir).split("train")) * len(VIEWS)
    results: dict = {"views": n_views, "precision": {}, "model": {}, "extract": {}}
    views, seconds = decode_only(data_dir, args.batch_size, args.workers, pin_memory=device.type == "cuda")
    results["decode_views_per_s"] = views / seconds
    print(f"decode only: {views / seconds:.0f} views/s", flush=True)
    batch = real_batch(data_dir, args.batch_size)
    for name in names:
        p = results["precision"][name] = precision_agreement(name, device, batch)
        print(f"precision [{name}]: bf16 cos min {p['bf16']['cos_min']:.5f}, fp16 cos min {p['fp16']['cos_min']:.5f}", flush=True)
    for name in names:
        m = results["model"][name] = model_only(name, device, args.batch_size, args.model_batches, compile=True)
        print(f"model only [{name}]: eager {m['eager_views_per_s']:.0f}, compiled {m['compiled_views_per_s']:.0f} views/s "
              f"(compile {m['compile_s']:.0f} s)", flush=True)
    for config in ([[n] for n in names] if args.each else []) + [list(names)]:
        key = "+".join(config)
        r = results["extract"][key] = run_extract(data_dir, config, device, args)
        gflop = sum(results["model"][n]["gflop_per_view"] for n in config)
        r["tflops"] = r["views_per_s"] * gflop / 1e3
        r["fraction_of_peak"] = r["tflops"] / args.peak_tflops
        rate = "compiled_views_per_s" if r["compiled"] else "eager_views_per_s"
        model_bound = 1 / sum(1 / results["model"][n][rate] for n in config)
        r["overlap"] = r["views_per_s"] / min(results["decode_views_per_s"], model_bound)
        print(f"extract [{key}]: {r['views_per_s']:.0f} views/s, {r['tflops']:.0f} TFLOP/s", flush=True)
    both = results["extract"]["+".join(names)]["views_per_s"]
    results["competition_s_together"] = COMPETITION_VIEWS / both
    return results


def report(results: dict, names: tuple[str, ...], args: argparse.Namespace) -> None:
    print(f"\n{results['device']}, torch {results['torch']}, {results['views']} views, batch {args.batch_size} views, "
          f"{args.workers} workers")
    print(f"  decode only                      {results['decode_views_per_s']:8.0f} views/s")
    for name, p in results["precision"].items():
        print(f"  precision {name:23s} vs fp32 per-view cosine: bf16 min {p['bf16']['cos_min']:.5f} mean "
              f"{p['bf16']['cos_mean']:.5f}; fp16 min {p['fp16']['cos_min']:.5f} (finite: {p['fp16']['finite']}); "
              f"max |value| {p['max_abs_fp32']:.1f} (fp16 holds {FP16_MAX:.0f})")
    for name, m in results["model"].items():
        print(f"  model only {name:22s} eager {m['eager_views_per_s']:7.0f}, compiled {m['compiled_views_per_s']:7.0f} "
              f"views/s (compile {m['compile_s']:.0f} s, cosine vs eager >= {m['compiled_vs_eager_cos_min']:.5f}; "
              f"{m['gflop_per_view']:.3g} GFLOP/view)")
    for key, r in results["extract"].items():
        print(f"  extract {key:34s} {r['views_per_s']:8.0f} views/s ({r['precision']}, compile "
              f"{'on' if r['compiled'] else 'off'}), {r['tflops']:7.1f} TFLOP/s = {100 * r['fraction_of_peak']:.1f}% "
              f"of {args.peak_tflops:.0f}, overlap {r['overlap']:.2f}, peak {r['max_memory_allocated_gib']:.1f} GiB, "
              f"wall {r['wall_s']:.1f} s")
    t = results["competition_s_together"]
    verdict = "" if args.smoke else f" (target <= {TARGET_COMPETITION_S / 60:.0f} min: {'met' if t <= TARGET_COMPETITION_S else 'NOT met'})"
    print(f"  whole competition ({COMPETITION_VIEWS} views, {' + '.join(names)} together): {t / 60:.1f} min{verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="competition-layout folder; synthesized there if it has no train CSV "
                        "(default: a temporary folder)")
    parser.add_argument("--locations", type=int, default=5_000, help="locations to synthesize (4 views each)")
    parser.add_argument("--batch-size", type=int, default=256, help="views per batch (extract's GPU default)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="DataLoader workers (default: extract's)")
    parser.add_argument("--model-batches", type=int, default=20, help="timed batches of the model-only figures")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile in extract (default: extract's, on with CUDA)")
    parser.add_argument("--each", action="store_true", help="also extract with each backbone alone")
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS,
                        help="dense bf16 peak to compare with (default: H100 SXM; an H200 has the same)")
    default_out = Path(os.environ["OUT"]) / "extract_gpu.json" if os.environ.get("OUT") else None
    parser.add_argument("--out", type=Path, default=default_out, help="JSON results (default: $OUT/extract_gpu.json)")
    parser.add_argument("--smoke", action="store_true", help="the tiny backbones on the CPU (compile included)")
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
        auto_precision=resolve_precision("auto", device), torch=torch.__version__, cpu_count=os.cpu_count(),
        args={k: str(v) for k, v in vars(args).items()},
    )
    report(results, names, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"results: {args.out}")


if __name__ == "__main__":
    main()
