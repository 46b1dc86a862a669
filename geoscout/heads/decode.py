"""From cell logits to the answer: top-5 states, and the point that minimises the expected distance.

The GPS part of the metric is the MEAN km, so the right point is not the top-1 cell's but the
weighted geometric median of the model's belief: candidate positions (centroid + regressed offset of
each of the most probable cells, and retrieved neighbours inside those cells) weighted by probability.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..geo import latlon_to_xyz, xyz_to_latlon
from ..host import usable_cpus
from .geocells import Geocells
from .retrieval import Neighbours
from .training import Prediction, top5_from_logits

MEDIAN_ITERATIONS = 100
# Weiszfeld divides by the distance to each candidate; this floor (radians, about 6 mm) keeps it finite
# when the estimate sits on a candidate, which it then keeps (the median is at that candidate).
MIN_ANGLE = 1e-9
ROW_BLOCK = 4096  # rows per block: 1.7x faster than all 59,000 rows at once, on one core
CONVERGED = 1e-8  # radians (about 6 cm): a row whose estimate moves less has settled

# (cells (N, k), their probabilities (N, k)) -> (N, k, 2) candidate positions in degrees
PointsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class DecodeConfig:
    """How the position is read from the ensemble's belief. Where a field lists several values, the one
    with the best out-of-fold score is used (ties go to the first, the simpler)."""

    # The most probable cells whose positions form the belief; 1: the most probable cell of the top-1
    # state alone (the seed's answer). More: expected-distance decoding, the geometric median of the
    # candidates' points weighted by probability.
    candidates: tuple[int, ...] = (1,)
    retrieval_k: int = 0  # training locations searched per query; 0: no retrieval
    # The share of a cell's probability handed to its retrieved neighbours (those inside it); the rest
    # stays on the cell's own point.
    retrieval_weights: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    similarity_temperature: float = 0.05  # neighbours inside one cell are weighted softmax(cosine / this)
    retrieval_dim: int = 256  # wider search descriptors are projected on this many principal directions; 0: never


def geometric_median(points: np.ndarray, weights: np.ndarray, *, iterations: int = MEDIAN_ITERATIONS) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) per row minimising sum_i w_i * great-circle(x, p_i): Weiszfeld on the sphere.

    points (N, M, 2) degrees, weights (N, M) >= 0 (zero-weight points are ignored). The update
    x <- normalise(sum_i w_i p_i / sin(angle(x, p_i))) has the stationary points of the arc-length
    objective as its fixed points (the tangent toward p_i is (p_i - cos * x) / sin), so it converges
    to the spherical median for candidates within a hemisphere, as a state's are.
    """
    if len(points) > ROW_BLOCK:
        # Row blocks (large temporaries cost more in page faults than in maths), on every usable core at
        # once: numpy releases the GIL in the arithmetic (1.75x on two cores).
        starts = range(0, len(points), ROW_BLOCK)
        with ThreadPoolExecutor(max_workers=min(usable_cpus(), len(starts))) as pool:
            parts = list(pool.map(lambda start: geometric_median(points[start:start + ROW_BLOCK],
                                                                 weights[start:start + ROW_BLOCK], iterations=iterations),
                                  starts))
        return np.concatenate([lat for lat, _ in parts]), np.concatenate([lon for _, lon in parts])
    xyz = latlon_to_xyz(points[..., 0], points[..., 1])
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum(axis=1, keepdims=True)
    x = _unit((w[..., None] * xyz).sum(axis=1), fallback=xyz[np.arange(len(w)), w.argmax(axis=1)])
    # Where the median is the heaviest candidate itself (it is whenever that one holds half the weight),
    # Weiszfeld only creeps toward it; the optimality test settles those rows exactly, at once.
    settled, heaviest = _at_heaviest(xyz, w)
    x[settled] = heaviest[settled]
    # Only the rows still moving iterate: Weiszfeld converges slowly near a candidate, so after 100
    # iterations about a tenth of the rows still move while the rest settled long before (5x faster
    # than iterating every row until the slowest settles; bench/decode.py).
    active = np.flatnonzero(~settled)
    p, wa, xa = xyz[active], w[active], x[active]
    for _ in range(iterations):
        if not len(active):
            break
        # sin of the angle from the chord c = |p - x| = 2 sin(angle / 2): exact for small angles too, and a
        # third of the work of a cross product per candidate
        d = p - xa[:, None, :]
        chord2 = np.einsum("nmk,nmk->nm", d, d)
        sin = np.sqrt(np.maximum(chord2 * (1.0 - chord2 / 4.0), 0.0))
        pull = wa / np.maximum(sin, MIN_ANGLE)
        moved = _unit(np.einsum("nm,nmk->nk", pull, p), fallback=xa)
        moving = np.abs(moved - xa).max(axis=1) >= CONVERGED
        x[active] = moved
        active, p, wa, xa = active[moving], p[moving], wa[moving], moved[moving]
    return xyz_to_latlon(x)


def _at_heaviest(xyz: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows whose median is their heaviest candidate, that candidate (N, 3)). The optimality condition of
    a point that is itself a candidate j: the pull of the others, |sum_i w_i t_ij| with t_ij the unit
    tangent at p_j toward p_i, is at most w_j (plus the weight of candidates at the same place)."""
    heaviest = xyz[np.arange(len(w)), w.argmax(axis=1)]
    cos = np.einsum("nmk,nk->nm", xyz, heaviest)
    tangent = xyz - cos[..., None] * heaviest[:, None, :]
    length = np.linalg.norm(tangent, axis=2)
    apart = length > MIN_ANGLE
    pull = np.einsum("nm,nmk->nk", np.where(apart, w / np.where(apart, length, 1.0), 0.0), tangent)
    return np.linalg.norm(pull, axis=1) <= np.where(apart, 0.0, w).sum(axis=1), heaviest


def _unit(v: np.ndarray, *, fallback: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return np.where(norm > 1e-12, v / np.maximum(norm, 1e-300), fallback)


def spread_to_neighbours(
    points: np.ndarray, weights: np.ndarray, cells: np.ndarray, neighbours: Neighbours, *, share: float, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """Add retrieved neighbours to a belief over cells: each candidate cell hands `share` of its
    weight to the neighbours inside it, split by softmax(similarity / temperature); neighbours outside
    every candidate cell get nothing, and a cell without neighbours keeps all of its weight."""
    inside = (neighbours.cell[:, :, None] == cells[:, None, :]) & neighbours.valid[:, :, None]  # (N, R, k)
    in_candidate = inside.any(axis=2)
    which = inside.argmax(axis=2)  # the candidate cell a neighbour lies in (meaningful where in_candidate)
    logits = np.where(in_candidate, neighbours.similarity / temperature, -np.inf)
    peak = logits.max(axis=1, keepdims=True)
    e = np.where(in_candidate, np.exp(logits - np.where(np.isfinite(peak), peak, 0.0)), 0.0)
    per_cell = (e[:, :, None] * inside).sum(axis=1)  # (N, k)
    rows = np.arange(len(e))[:, None]
    neighbour_weights = np.where(
        in_candidate, share * weights[rows, which] * e / np.where(per_cell > 0, per_cell, 1.0)[rows, which], 0.0
    )
    cell_weights = weights * (1.0 - share * (per_cell > 0))
    return np.concatenate([points, neighbours.latlon], axis=1), np.concatenate([cell_weights, neighbour_weights], axis=1)


def candidate_cells(cell_logits: torch.Tensor, geocells: Geocells, candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """(cells (N, k), normalised weights (N, k)): the anchor cell alone, or the k most probable cells."""
    if candidates == 1:
        cell, _ = geocells.anchor_cells(cell_logits)
        return cell[:, None], np.ones((len(cell), 1))
    probability = torch.softmax(cell_logits.double(), dim=1)
    top = probability.topk(min(candidates, probability.shape[1]), dim=1)
    weights = top.values.numpy()
    return top.indices.numpy(), weights / weights.sum(axis=1, keepdims=True)


def decode(
    cell_logits: np.ndarray, geocells: Geocells, *, candidates: int = 1, points: PointsFn | None = None,
    neighbours: Neighbours | None = None, retrieval_weight: float = 0.0, similarity_temperature: float = 0.05,
) -> Prediction:
    """Top-5 states from the summed cell probabilities; the position from the belief (see module doc).

    `points` gives each candidate cell's position (centroid + offset); without it, the centroids.
    """
    z = torch.from_numpy(np.asarray(cell_logits))
    top5 = top5_from_logits(geocells.class_logits(z))
    cells, weights = candidate_cells(z, geocells, candidates)
    positions = geocells.centroids[cells] if points is None else points(cells, _probabilities(z, cells))
    if neighbours is not None and retrieval_weight > 0:
        positions, weights = spread_to_neighbours(positions, weights, cells, neighbours, share=retrieval_weight,
                                                  temperature=similarity_temperature)
    if positions.shape[1] == 1:
        return Prediction(top5, positions[:, 0, 0], positions[:, 0, 1])
    lat, lon = geometric_median(positions, weights)
    return Prediction(top5, lat, lon)


def _probabilities(cell_logits: torch.Tensor, cells: np.ndarray) -> np.ndarray:
    probability = torch.softmax(cell_logits.float(), dim=1)
    return probability.gather(1, torch.from_numpy(cells)).numpy()
