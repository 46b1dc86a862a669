"""Haversine label smoothing (PIGEON): soft targets that spare the classes near the true position."""

from __future__ import annotations

import numpy as np

from ..geo import haversine_km


def haversine_soft_targets(
    latlon: np.ndarray, true_class: np.ndarray, centroids: np.ndarray, *, tau_km: float, group: np.ndarray | None = None,
) -> np.ndarray:
    """(N, C) float32 rows summing to 1: y_i proportional to exp(-(d(x, c_i) - d(x, c_true)) / tau).

    d is the great-circle distance from the location's true position x to class i's centroid. The
    excess over the true class is clipped at 0: a location near its state's border may lie closer to
    a neighbour's centroid, and its target must still not prefer the neighbour over the truth.
    `group` (C,): only classes of the true class's group get any mass (geocells of the true state).
    """
    if tau_km <= 0:
        raise ValueError(f"tau_km must be positive; got {tau_km}")
    d = haversine_km(latlon[:, None, 0], latlon[:, None, 1], centroids[None, :, 0], centroids[None, :, 1])
    excess = np.maximum(d - d[np.arange(len(d)), true_class][:, None], 0.0)
    weights = np.exp(-excess / tau_km)
    if group is not None:
        weights *= group[None, :] == group[true_class][:, None]
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
