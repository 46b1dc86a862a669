"""The spherical geometric median at competition scale: geoscout's (rows settled at their heaviest
candidate by its optimality test, only the rows still moving iterating, row blocks on every core)
against plain Weiszfeld iterating every row until the slowest settles (the first implementation,
reproduced here).

The belief of each row is what the default decoding hands `geometric_median`: one cell's point with
most of the weight and retrieved neighbours around it (about 0.8 degrees apart, some weights zero).
Prints seconds (best of --repeats) and each answer's distance from a converged reference (geoscout's
with 10,000 iterations allowed and no convergence threshold).

    python bench/decode.py                 # 59,000 rows x 33 candidates (the out-of-fold decode)
    python bench/decode.py --smoke
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from geoscout.geo import haversine_km, latlon_to_xyz, xyz_to_latlon
from geoscout.heads import decode
from geoscout.heads.decode import CONVERGED, MEDIAN_ITERATIONS, MIN_ANGLE, _unit, geometric_median


def every_row_median(points: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xyz = latlon_to_xyz(points[..., 0], points[..., 1])
    w = weights / weights.sum(axis=1, keepdims=True)
    x = _unit((w[..., None] * xyz).sum(axis=1), fallback=xyz[np.arange(len(w)), w.argmax(axis=1)])
    for _ in range(MEDIAN_ITERATIONS):
        chord2 = np.square(xyz - x[:, None, :]).sum(axis=-1)
        sin = np.sqrt(np.maximum(chord2 * (1.0 - chord2 / 4.0), 0.0))
        moved = _unit(((w / np.maximum(sin, MIN_ANGLE))[..., None] * xyz).sum(axis=1), fallback=x)
        step = np.abs(moved - x).max()
        x = moved
        if step < CONVERGED:
            break
    return xyz_to_latlon(x)


def belief(rows: int, candidates: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centre = np.stack([rng.uniform(30, 45, rows), rng.uniform(-120, -75, rows)], axis=1)
    points = centre[:, None, :] + rng.normal(0, 0.8, (rows, candidates, 2))
    neighbours = rng.dirichlet(np.full(candidates - 1, 0.3), rows) * rng.uniform(0, 1, (rows, 1))
    weights = np.concatenate([rng.uniform(0.2, 1, (rows, 1)), neighbours], axis=1)
    weights[rng.random(weights.shape) < 0.3] = 0.0
    weights[:, 0] = np.maximum(weights[:, 0], 0.05)
    return points, weights


def best_of(repeats: int, fn, *args):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=59_000)
    parser.add_argument("--candidates", type=int, default=33, help="the cell's point + retrieval_k neighbours")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="2,000 rows, one repeat")
    args = parser.parse_args()
    rows, repeats = (2_000, 1) if args.smoke else (args.rows, args.repeats)
    points, weights = belief(rows, args.candidates)
    # The reference: geoscout's median with 10,000 iterations allowed and no convergence threshold.
    threshold, decode.CONVERGED = decode.CONVERGED, 0.0
    reference = geometric_median(points, weights, iterations=10_000)
    decode.CONVERGED = threshold
    old, (lat0, lon0) = best_of(repeats, every_row_median, points, weights)
    new, (lat1, lon1) = best_of(repeats, geometric_median, points, weights)
    print(f"{rows:,} rows x {args.candidates} candidates, best of {repeats}; distance from the converged answer")
    for name, seconds, (lat, lon) in (("plain Weiszfeld, every row until the slowest settles", old, (lat0, lon0)),
                                      ("geoscout", new, (lat1, lon1))):
        km = haversine_km(lat, lon, *reference)
        print(f"  {name:<54} {seconds:7.2f} s   mean {km.mean() * 1e3:7.1f} m, max {km.max() * 1e3:8.0f} m")
    print(f"  speed-up {old / new:.1f}x")

if __name__ == "__main__":
    main()
