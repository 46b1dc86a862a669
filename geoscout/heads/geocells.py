"""Geocells: each state split into cells of its own training locations; a classifier may predict cells.

Cells never cross a state border (every state is clustered on its own), so a state's probability is
the sum of its cells' probabilities and the top-5 states stay what the competition scores. With no
cells asked for, every state is one cell at its centroid: the plain state classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans

from ..geo import haversine_km, latlon_to_xyz, spherical_mean

ASSIGN_BLOCK = 8192
ROW_BLOCK = 4096  # rows per block of class_logits: a few MB of temporaries, reused instead of page-faulted in


@dataclass(frozen=True)
class Geocells:
    cell_class: np.ndarray  # (K,) int64: the class (state) id of each cell
    centroids: np.ndarray  # (K, 2) degrees: spherical mean of each cell's training locations
    num_classes: int

    def __post_init__(self) -> None:
        if len(self.cell_class) != len(self.centroids):
            raise ValueError(f"{len(self.cell_class)} cell classes for {len(self.centroids)} centroids")
        missing = sorted(set(range(self.num_classes)) - set(self.cell_class.tolist()))
        if missing:
            raise ValueError(f"class(es) {missing} have no cell")

    def __len__(self) -> int:
        return len(self.cell_class)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Geocells) and self.num_classes == other.num_classes
                and np.array_equal(self.cell_class, other.cell_class) and np.array_equal(self.centroids, other.centroids))

    def assign(self, class_id: np.ndarray, latlon: np.ndarray) -> np.ndarray:
        """(N,) the cell of each location: the nearest centroid among the cells of its own class."""
        class_id, latlon = np.asarray(class_id), np.asarray(latlon)
        out = np.empty(len(class_id), dtype=np.int64)
        for start in range(0, len(class_id), ASSIGN_BLOCK):  # bounded (block, K) distance matrices
            part = slice(start, start + ASSIGN_BLOCK)
            lat, lon = latlon[part, 0, None], latlon[part, 1, None]
            d = haversine_km(lat, lon, self.centroids[None, :, 0], self.centroids[None, :, 1])
            d[self.cell_class[None, :] != class_id[part, None]] = np.inf
            out[part] = d.argmin(axis=1)
        return out

    def class_logits(self, cell_logits: torch.Tensor) -> torch.Tensor:
        """(N, C) log of each class's summed cell probability, up to a per-row constant: a logsumexp over
        each class's cells, shifted by the row's maximum (one scatter-add; a class whose cells are all
        more than ~700 below the row's best underflows to the log of the smallest double, not -inf)."""
        if len(cell_logits) > ROW_BLOCK:  # row blocks: (N, K) temporaries cost more in page faults than in maths
            return torch.cat([self.class_logits(cell_logits[start:start + ROW_BLOCK])
                              for start in range(0, len(cell_logits), ROW_BLOCK)])
        index = torch.as_tensor(self.cell_class, device=cell_logits.device).expand_as(cell_logits)
        peak = cell_logits.max(dim=1, keepdim=True).values
        mass = torch.zeros((cell_logits.shape[0], self.num_classes), dtype=cell_logits.dtype, device=cell_logits.device)
        mass = mass.scatter_add(1, index, torch.exp(cell_logits - peak))
        return peak + torch.log(mass.clamp_min(torch.finfo(cell_logits.dtype).tiny))

    def anchor_cells(self, cell_logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(cell, its probability) per row: the most probable cell of the most probable class.

        Not the most probable cell overall: the coordinates then agree with the top-1 state.
        """
        top_class = self.class_logits(cell_logits).argmax(dim=1)
        inside = torch.as_tensor(self.cell_class, device=cell_logits.device)[None, :] == top_class[:, None]
        cell = cell_logits.masked_fill(~inside, -torch.inf).argmax(dim=1)
        probability = torch.softmax(cell_logits.float(), dim=1).gather(1, cell[:, None])[:, 0]
        return cell.cpu().numpy(), probability.cpu().numpy().astype(np.float32)


def cells_per_class(counts: np.ndarray, *, cells: int, min_rows: int) -> np.ndarray:
    """How many cells each class gets: proportional to its training rows, at least one, and never so
    many that a cell holds fewer than `min_rows` locations on average."""
    share = np.rint(cells * counts / max(counts.sum(), 1)).astype(np.int64)
    return np.maximum(1, np.minimum(share, counts // max(min_rows, 1)))


def make_geocells(class_id: np.ndarray, latlon: np.ndarray, num_classes: int, *, cells: int, min_rows: int,
                  seed: int = 0) -> Geocells:
    """k-means on the unit sphere, one class at a time, over training locations; `cells` in all (about).

    `cells` 0 gives one cell per class at its centroid. A class without rows gets one cell at the
    overall centroid. Deterministic for a seed, so every head of a run shares the same cells.
    """
    class_id, latlon = np.asarray(class_id), np.asarray(latlon, dtype=np.float64)
    counts = np.bincount(class_id, minlength=num_classes)
    per_class = cells_per_class(counts, cells=cells, min_rows=min_rows)
    overall = spherical_mean(latlon[:, 0], latlon[:, 1])
    cell_class, centroids = [], []
    for c in range(num_classes):
        points = latlon[class_id == c]
        k = min(int(per_class[c]), len(np.unique(points, axis=0)))
        if k <= 1:
            cell_class.append(c)
            centroids.append(spherical_mean(points[:, 0], points[:, 1]) if len(points) else overall)
            continue
        labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(latlon_to_xyz(points[:, 0], points[:, 1]))
        for j in range(k):
            cell_class.append(c)
            centroids.append(spherical_mean(points[labels == j, 0], points[labels == j, 1]))
    return Geocells(np.asarray(cell_class, dtype=np.int64), np.asarray(centroids, dtype=np.float64), num_classes)
