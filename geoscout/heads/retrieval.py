"""Retrieval refinement: the training locations that look most like a query, as candidate positions.

A location's search descriptor is the index layer's (index.py: mean of its embedded views, centred
on the gallery's mean, unit length), one per backbone, side by side and scaled so the inner product
is the mean of the backbones' cosines. Wide descriptors are projected on their top principal
directions (fitted on the gallery) before the exact search: at competition scale a full-width
search of every training row against every other is the slowest part of the heads, and the top
directions keep the neighbours. Every gallery location carries its geocell, so a decoder can keep
only neighbours inside the cells it believes in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from sklearn.utils.extmath import randomized_svd

from ..errors import ConfigError
from ..index import has_views, knn_search, unit_descriptors
from ..store.features import SplitFeatures
from .folds import Folds
from .inputs import views_of

PCA_SAMPLE = 8192  # gallery rows the principal directions are fitted on


class Neighbours(NamedTuple):
    similarity: np.ndarray  # (N, R) descending
    latlon: np.ndarray  # (N, R, 2) degrees
    cell: np.ndarray  # (N, R) geocell of each neighbour
    valid: np.ndarray  # (N, R) bool: False for every neighbour of a query without an embedded view


@dataclass
class SearchSpace:
    """How locations become search descriptors: per-backbone centres, then an optional projection."""

    backbones: list[str]
    centers: dict[str, np.ndarray]  # backbone -> (D,) mean descriptor of the gallery
    basis: np.ndarray | None  # (sum D, dim) orthonormal columns, or None for the full width

    def describe(self, features: SplitFeatures) -> np.ndarray:
        # Each backbone's view means are the split's (computed once, see inputs.views_of).
        parts = [unit_descriptors(views_of(features, (b,)).means, features.masks[b].any(axis=1), center=self.centers[b])
                 for b in self.backbones]
        if self.basis is None:
            full = np.concatenate(parts, axis=1)
            full /= math.sqrt(len(parts))  # inner products: the mean of the backbones' cosines
            return full
        # The projection of the side-by-side descriptor, backbone by backbone (no wide copy); the common
        # scale of the parts does not matter, as the projected rows are normalised again.
        projected = np.zeros((len(features), self.basis.shape[1]), dtype=np.float32)
        column = 0
        for part in parts:
            projected += part @ self.basis[column:column + part.shape[1]]
            column += part.shape[1]
        # rows without views stay zero (has_views reports them); the rest are unit length again
        return unit_descriptors(projected, has_views(projected))


def fit_space(features: SplitFeatures, *, rows: np.ndarray, backbones: list[str], dim: int, seed: int = 0) -> SearchSpace:
    """Centres (and, when the descriptors are wider than `dim`, the top `dim` principal directions) of
    the gallery rows `rows`. dim 0 keeps the full width."""
    missing = [b for b in backbones if b not in features.features]
    if missing:
        raise ConfigError(f"retrieval needs the features of {missing}")
    in_gallery = np.zeros(len(features), dtype=bool)
    in_gallery[rows] = True
    centers = {}
    for b in backbones:
        # the mean location descriptor of the gallery rows with a view (index.descriptor_center's)
        present = features.masks[b].any(axis=1) & in_gallery
        total = views_of(features, (b,)).means.sum(axis=0, where=present[:, None], dtype=np.float64)
        centers[b] = (total / max(int(present.sum()), 1)).astype(np.float32)
    space = SearchSpace(list(backbones), centers, None)
    width = sum(features.features[b].shape[2] for b in backbones)
    if dim and width > dim:
        full = space.describe(features)[rows]
        full = full[has_views(full)]
        pick = np.sort(np.random.default_rng(seed).permutation(len(full))[:PCA_SAMPLE])
        _, _, vt = randomized_svd(full[pick], n_components=dim, n_iter=2, random_state=seed)
        space.basis = np.ascontiguousarray(vt.T, dtype=np.float32)
    return space


@dataclass
class Gallery:
    descriptors: np.ndarray  # (M, d) float32
    latlon: np.ndarray  # (M, 2)
    cell: np.ndarray  # (M,)


def build_gallery(descriptors: np.ndarray, latlon: np.ndarray, cell: np.ndarray, rows: np.ndarray) -> Gallery:
    """The locations `rows` that have at least one embedded view, with their positions and cells."""
    rows = np.asarray(rows)
    keep = rows[has_views(descriptors[rows])]
    return Gallery(descriptors[keep], latlon[keep], cell[keep])


def search(gallery: Gallery, queries: np.ndarray, *, k: int) -> Neighbours:
    """The k most similar gallery locations of every query descriptor (exact inner-product search)."""
    similarity, rows = knn_search(database=gallery.descriptors, queries=queries, k=k)
    valid = np.broadcast_to(has_views(queries)[:, None], rows.shape)
    return Neighbours(similarity.astype(np.float64), gallery.latlon[rows], gallery.cell[rows], valid.copy())


def oof_neighbours(descriptors: np.ndarray, latlon: np.ndarray, cell: np.ndarray, folds: Folds, *, k: int) -> Neighbours:
    """Neighbours of every fit row among the fit rows of the other folds: what a row would see as a test
    location, never itself or its own fold. Every array here holds only the fit rows, in order."""
    folds = folds.local()
    parts = {}
    for f in range(folds.k):
        gallery = build_gallery(descriptors, latlon, cell, folds.train_rows(f))
        parts[f] = search(gallery, descriptors[folds.heldout_rows(f)], k=k)
    width = min(p.similarity.shape[1] for p in parts.values())
    out = [np.zeros((len(folds.fit_rows), width, *shape), dtype=dtype) for shape, dtype in
           (((), np.float64), ((2,), np.float64), ((), np.int64), ((), bool))]
    for f, part in parts.items():
        at = folds.fold == f
        for target, values in zip(out, part):
            target[at] = values[:, :width]
    return Neighbours(*out)
