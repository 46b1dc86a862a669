"""Location descriptors and exact neighbour search: the index layer under the heads and the kNN diagnostic.

A location's descriptor is the mean of its embedded views minus a centre (the training mean),
L2-normalised, so an inner product is a cosine. Backbone embeddings share a large common direction
(CLIP's cosine between unrelated images is often 0.5+, a random network's near 1), which makes raw
cosines useless; subtracting the mean spreads them out while exact copies stay at 1.

Search is faiss's brute-force `knn` / `knn_gpu` (exact, blocked inside faiss); the range search for
near-duplicate pairs runs on the CPU, block by block, because GPU flat indexes have none.
"""

from __future__ import annotations

from typing import Literal

import h5py
import numpy as np

from .competition import NUM_VIEWS
from .errors import ConfigError

try:
    import faiss
except ModuleNotFoundError as err:  # FAISS comes from an extra, so that CPU and GPU builds never both install
    raise ModuleNotFoundError(
        "faiss is not installed: pip install 'geoscout[cpu]', or 'geoscout[gpu]' on a CUDA 12 machine (one of the two)"
    ) from err

DEFAULT_BLOCK_SIZE = 16384
GPU_MAX_K = 2048  # faiss GPU brute-force search selects at most this many neighbours

UseGpu = bool | Literal["auto"]


def masked_view_mean(features, mask, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """((rows, D) float32 mean of the embedded views of rows start..stop, (rows,) how many there were).

    One view is converted at a time, so no float32 copy of (rows, 4, D) is made; masked views are
    skipped (their values, even NaN, never matter); a row without views gets zeros.
    """
    stop = features.shape[0] if stop is None else stop
    block = np.asarray(features[start:stop])
    block_mask = np.asarray(mask[start:stop], dtype=bool)
    acc = np.zeros((stop - start, block.shape[2]), dtype=np.float32)
    for v in range(block.shape[1]):
        np.add(acc, block[:, v], out=acc, where=block_mask[:, v, None])
    count = block_mask.sum(axis=1)
    acc[count > 0] /= count[count > 0, None]
    return acc, count


def descriptor_center(features: np.ndarray | h5py.Dataset, mask: np.ndarray | h5py.Dataset, *,
                      block_size: int = DEFAULT_BLOCK_SIZE) -> np.ndarray:
    """(D,) mean location descriptor over the rows with a view, read `block_size` rows at a time."""
    total, rows = np.zeros(features.shape[2], dtype=np.float64), 0
    for start in range(0, features.shape[0], block_size):
        acc, count = masked_view_mean(features, mask, start, min(start + block_size, features.shape[0]))
        total += acc[count > 0].sum(axis=0, dtype=np.float64)
        rows += int((count > 0).sum())
    return (total / max(rows, 1)).astype(np.float32)


def location_descriptors(
    features: np.ndarray | h5py.Dataset, mask: np.ndarray | h5py.Dataset, *,
    center: np.ndarray | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
) -> np.ndarray:
    """(N, D) float32 unit vectors: each location's mean embedded view, minus `center`, L2-normalised.

    `features` (N, 4, D) and `mask` (N, 4) may be arrays, memmaps or h5py datasets, read in blocks.
    Rows with no embedded view come out as zero vectors, which `has_views` reports.
    """
    n, views, dim = features.shape
    if views != NUM_VIEWS or mask.shape != (n, views):
        raise ValueError(f"features {features.shape} and mask {mask.shape} do not describe (N, 4, D) views")
    out = np.zeros((n, dim), dtype=np.float32)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        acc, count = masked_view_mean(features, mask, start, stop)
        out[start:stop] = unit_descriptors(acc, count > 0, center=center)
    return out


def unit_descriptors(means: np.ndarray, present: np.ndarray, *, center: np.ndarray | None = None,
                     block_size: int = 4096) -> np.ndarray:
    """(N, D) float32 descriptors from view means (N, D): minus `center`, L2-normalised; zero for rows
    without a view (`present` False) or whose mean is the centre. In row blocks: whole-array
    temporaries cost more in page faults than the arithmetic."""
    out = np.empty(means.shape, dtype=np.float32)
    for start in range(0, len(means), block_size):
        block = out[start:start + block_size]
        block[...] = means[start:start + block_size]
        if center is not None:
            block -= center
        block[~present[start:start + block_size]] = 0.0
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        block /= np.where(norms > 0, norms, 1.0)
    return out


def has_views(descriptors: np.ndarray) -> np.ndarray:
    """(N,) bool: False for rows whose descriptor is zero (no embedded view)."""
    return np.any(descriptors != 0, axis=1)


def resolve_gpu(use_gpu: UseGpu) -> bool:
    """"auto" searches on a GPU when this faiss build has one; True insists on it."""
    available = faiss.get_num_gpus() > 0
    if use_gpu == "auto":
        return available
    if use_gpu and not available:
        raise ConfigError("a GPU search was asked for, but this faiss build sees no GPU (install faiss-gpu: README, GPU section)")
    return bool(use_gpu)


def index_name(use_gpu: UseGpu) -> str:
    """What a search with this setting runs on, in words, for reports and logs."""
    return "exact inner product, faiss knn_gpu" if resolve_gpu(use_gpu) else "exact inner product, faiss knn (CPU)"


def knn_search(*, database: np.ndarray, queries: np.ndarray, k: int, use_gpu: UseGpu = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products: (similarities (Q, k') descending, database rows (Q, k')), k' = min(k, len(database))."""
    if len(database) == 0:
        raise ValueError("the database is empty")
    k = min(k, len(database))
    xq, xb = (np.ascontiguousarray(a, dtype=np.float32) for a in (queries, database))
    if resolve_gpu(use_gpu):
        if k > GPU_MAX_K:
            raise ConfigError(f"k={k}: faiss GPU search returns at most {GPU_MAX_K} neighbours")
        return faiss.knn_gpu(faiss.StandardGpuResources(), xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    return faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)


def pairs_above(*, a: np.ndarray, b: np.ndarray, threshold: float, same: bool,
                block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows of a, rows of b, similarity) of every pair with inner product >= threshold (CPU range search).

    With `same`, a and b are one set: each pair (i, j > i) once, no self pairs.
    """
    limit = np.float32(threshold)
    radius = float(np.nextafter(limit, np.float32(-np.inf)))  # faiss keeps similarity > radius
    found_a, found_b, found_sim = [], [], []
    for b0 in range(0, len(b), block_size):
        index = faiss.IndexFlatIP(b.shape[1])
        index.add(np.ascontiguousarray(b[b0:b0 + block_size], dtype=np.float32))
        b_last = b0 + index.ntotal - 1
        for a0 in range(0, len(a), block_size):
            if same and b_last <= a0:  # within one set only pairs (i, j > i) count: none here
                continue
            q = np.ascontiguousarray(a[a0:a0 + block_size], dtype=np.float32)
            lims, sims, rows = index.range_search(q, radius)
            rows_a = np.repeat(np.arange(a0, a0 + len(q)), np.diff(lims.astype(np.int64)))
            rows_b = rows + b0
            keep = sims >= limit
            if same:
                keep &= rows_b > rows_a
            found_a.append(rows_a[keep])
            found_b.append(rows_b[keep])
            found_sim.append(sims[keep])
    if not found_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_sim)
