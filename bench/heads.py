"""The heads' benchmarks: accuracy across regimes of synthetic data, and time at competition scale.

    python bench/heads.py regimes                    # default vs seed vs a tuned logistic probe, 5 regimes x 2 sizes x 3 seeds
    python bench/heads.py regimes --regimes noisy --sizes small --seeds 0
    python bench/heads.py variants --sizes small --seeds 100,101   # changes to the default on tuning draws, vs the default
    python bench/heads.py margins --cache DIR        # the regime table's margins: paired bootstrap over test rows
    python bench/heads.py scale                      # every head at 65,980 + 16,495 locations, timed (see heads_scale.py)
    python bench/heads.py scale --smoke

`regimes` caches data sets and results under --cache, keyed by each recipe's resolved config: a rerun
only computes what changed. It prints a Markdown table of mean ± std over the seeds on the test split.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def regimes_main(argv: list[str]) -> None:
    import heads_regimes as hr

    p = argparse.ArgumentParser(prog="bench/heads.py regimes", description=hr.__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="/tmp/geoscout-bench-regimes", help="data sets, stores, heads and results.jsonl")
    p.add_argument("--regimes", default=",".join(hr.REGIMES), help=f"comma-separated: {', '.join(hr.REGIMES)}")
    p.add_argument("--sizes", default="small,large", help="small (1,500 / 500) and/or large (6,000 / 1,000); "
                   "xlarge (24,000 / 1,000) for ceiling checks outside the table")
    p.add_argument("--seeds", default="0,1,2", help="data and training seeds")
    p.add_argument("--presets", default="default,seed")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a shared machine's timings steady)")
    p.add_argument("--fresh", action="store_true", help="ignore cached results (data sets stay cached)")
    p.add_argument("--split", default="test", help="the table's split: test (never chose anything) or validation")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    presets = [x for x in args.presets.split(",") if x]
    started = time.perf_counter()
    print(f"heads across regimes: {args.regimes} x {args.sizes} x seeds {args.seeds}; presets {presets}; "
          f"torch threads {torch.get_num_threads()}; cache {cache}", flush=True)
    rows = hr.run(cache, regimes=args.regimes.split(","), sizes=args.sizes.split(","),
                  seeds=[int(s) for s in args.seeds.split(",")], presets=presets, fresh=args.fresh,
                  log=lambda s: print(s, flush=True))
    print(f"\n{args.split} split, mean ± std over seeds ({time.perf_counter() - started:.0f} s):\n")
    print(hr.table(rows, presets, args.split))


def variants_main(argv: list[str]) -> None:
    import heads_regimes as hr
    import heads_variants as hv

    p = argparse.ArgumentParser(prog="bench/heads.py variants", description=hv.__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="/tmp/geoscout-bench-tuning", help="tuning draws, member pools and variants.jsonl")
    p.add_argument("--regimes", default=",".join(hr.REGIMES), help=f"comma-separated: {', '.join(hr.REGIMES)}")
    p.add_argument("--sizes", default="small,large")
    p.add_argument("--seeds", default="100,101", help="tuning draws: never the seeds the regime table reports (0, 1, 2)")
    p.add_argument("--variants", default=",".join(hv.VARIANTS), help=f"comma-separated: {', '.join(hv.VARIANTS)}")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    if set(seeds) & {0, 1, 2}:
        raise SystemExit("seeds 0, 1 and 2 are the regime table's held-out draws: tune on others (e.g. 100,101)")
    cache = Path(args.cache).resolve()  # members are linked by absolute path
    cache.mkdir(parents=True, exist_ok=True)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        hv.variant(v)  # an unknown name fails before any data set is built
    started = time.perf_counter()
    rows = hv.run(cache, regimes=args.regimes.split(","), sizes=args.sizes.split(","), seeds=seeds, variants=variants,
                  log=lambda s: print(s, flush=True))
    print(f"\ntest split of the tuning draws, each variant minus the default ({time.perf_counter() - started:.0f} s):\n")
    print(hv.table(rows, variants))


def margins_main(argv: list[str]) -> None:
    import heads_margins as hm

    p = argparse.ArgumentParser(prog="bench/heads.py margins", description=hm.__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="/tmp/geoscout-bench-regimes", help="the cache `regimes` filled (it retrains nothing)")
    p.add_argument("--regimes", default="", help="comma-separated; default: every regime in the cache")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    regimes = [r for r in args.regimes.split(",") if r] or None
    # torch's threads only: the probe must be refitted as `regimes` fitted it (BLAS on every core), or its
    # answers can differ in the last digits and on a row or two
    text = hm.main(Path(args.cache).resolve(), regimes, log=lambda s: print(s, flush=True))
    print(f"\ntest split, paired bootstrap over test rows ({hm.DRAWS} draws, {time.perf_counter() - started:.0f} s):\n")
    print(text)


def main() -> None:
    modes = {"regimes": regimes_main, "variants": variants_main, "margins": margins_main}
    if len(sys.argv) < 2 or sys.argv[1] not in (*modes, "scale"):
        raise SystemExit(__doc__)
    mode, argv = sys.argv[1], sys.argv[2:]
    if mode in modes:
        modes[mode](argv)
    else:
        import heads_scale

        heads_scale.main(argv)


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
