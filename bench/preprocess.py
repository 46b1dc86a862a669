"""Device-side resize: the exact Pillow reproduction against a single float pass, in time and in pixels.

For each output size, on 256x256 views (synthetic JPEGs plus hard black/white edges, where bicubic
overshoots most), measures:
  ms/view   best of --repeats, --views views per batch, on --device (CPU: --threads torch threads)
  max diff  the largest |pixel - PIL's pixel| in 1/255 steps, against PIL.Image.resize
for `exact` (geoscout.extract.preprocess: Pillow's fixed-point two-pass resampling) and `float`
(one antialiased F.interpolate pass, clamped: what the extractor did before).

    python bench/preprocess.py                    # CPU, 1 thread, sizes 64 224 336 384
    python bench/preprocess.py --device cuda      # the float64 path used on GPUs
    python bench/preprocess.py --smoke
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import Compose, Normalize, ToTensor

from geoscout.extract.preprocess import DevicePreprocess
from geoscout.synth import synthesize


def views(n: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(Path(tmp) / "data", n_train=max(1, n // 4), n_test=1, n_states=4, seed=0, progress=False)
        paths = sorted((Path(tmp) / "data" / "train_images").glob("*.jpg"))[:n]
        jpegs = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    edges = np.kron(np.random.default_rng(0).integers(0, 2, (16, 16, 3)) * 255, np.ones((16, 16, 1))).astype(np.uint8)
    return np.stack([*jpegs[: n - 1], edges])


def best_ms(fn, repeats: int, device: torch.device) -> float:
    fn()  # first-call costs (tables, kernels)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224, 336, 384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.views, args.sizes, args.repeats = 8, [64], 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = views(args.views)
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(device)
    pre = DevicePreprocess(Compose([ToTensor(), Normalize([0.5] * 3, [0.5] * 3)]), (256, 256)).to(device)
    rows = []
    for size in args.sizes:
        pil = np.stack([np.asarray(Image.fromarray(v).resize((size, size), Image.BICUBIC)) for v in batch]).astype(np.int64)

        def exact():
            return pre.resize(x, (size, size), "bicubic")

        def single_float():
            return F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True).clamp_(0, 255)

        row = {"size": size}
        for name, fn in (("exact", exact), ("float", single_float)):
            out = fn().permute(0, 2, 3, 1).cpu().numpy()
            row[f"{name}_ms_per_view"] = best_ms(fn, args.repeats, device) / len(batch)
            row[f"{name}_max_diff"] = float(np.abs(out - pil).max())
        rows.append(row)
        print(f"{size:>4}px  exact {row['exact_ms_per_view']:.3f} ms/view, max diff {row['exact_max_diff']:.1f}/255 | "
              f"float {row['float_ms_per_view']:.3f} ms/view, max diff {row['float_max_diff']:.1f}/255")
    print(json.dumps({"device": str(device), "threads": args.threads, "views": len(batch), "rows": rows}))


if __name__ == "__main__":
    main()
