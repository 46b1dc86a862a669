"""Retrieval refinement: the training locations that look most like a query, as candidate positions.

A location's search descriptor is the index layer's (the mean of its embedded views, centred on the gallery's
mean, unit length), one per backbone, concatenated and scaled so the inner product is the mean of
the backbones' cosines. The gallery is a labelled split (its validation rows left out when the
queries are those rows); every gallery location carries its geocell, so a decoder can keep only
neighbours inside the cells it believes in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..index import descriptor_center, has_views, knn_search, location_descriptors
from ..store.features import SplitFeatures
from .geocells import Geocells


class Neighbours(NamedTuple):
    similarity: np.ndarray  # (N, R) descending
    latlon: np.ndarray  # (N, R, 2) degrees
    cell: np.ndarray  # (N, R) geocell of each neighbour
    valid: np.ndarray  # (N, R) bool: False for every neighbour of a query without an embedded view


@dataclass
class Gallery:
    backbones: list[str]
    centers: dict[str, np.ndarray]  # backbone -> (D,) mean descriptor of the gallery, subtracted from queries too
    descriptors: np.ndarray  # (M, sum D) float32
    latlon: np.ndarray  # (M, 2)
    cell: np.ndarray  # (M,)


def _describe(features: SplitFeatures, backbones: list[str], centers: dict[str, np.ndarray]) -> np.ndarray:
    parts = [location_descriptors(features.features[b], features.masks[b], center=centers[b]) for b in backbones]
    return np.concatenate(parts, axis=1) / np.sqrt(len(parts))


def build_gallery(features: SplitFeatures, *, rows: np.ndarray, backbones: list[str], geocells: Geocells) -> Gallery:
    """The locations `rows` of a labelled split that have at least one embedded view.

    Descriptors are centred on the gallery's own mean (index.py). The other rows are masked
    out rather than cut out, so a gallery of some rows needs no copy of their features.
    """
    if not features.labelled:
        raise ValueError(f"a retrieval gallery needs labelled locations; split {features.split!r} has none")
    in_gallery = np.zeros(len(features), dtype=bool)
    in_gallery[rows] = True
    centers = {b: descriptor_center(features.features[b], features.masks[b] & in_gallery[:, None]) for b in backbones}
    descriptors = _describe(features, backbones, centers)[rows]
    ok = has_views(descriptors)
    keep = np.asarray(rows)[ok]
    return Gallery(list(backbones), centers, descriptors[ok], features.latlon[keep],
                   geocells.assign(features.class_id[keep], features.latlon[keep]))


def search(gallery: Gallery, queries: SplitFeatures, *, k: int) -> Neighbours:
    """The k most similar gallery locations of every query (exact inner-product search, index.py)."""
    descriptors = _describe(queries, gallery.backbones, gallery.centers)
    similarity, rows = knn_search(database=gallery.descriptors, queries=descriptors, k=k)
    valid = np.broadcast_to(has_views(descriptors)[:, None], rows.shape)
    return Neighbours(similarity.astype(np.float64), gallery.latlon[rows], gallery.cell[rows], valid.copy())
