"""Great-circle maths shared by the metric, the heads and the diagnostics."""

from __future__ import annotations

import numpy as np
import torch

# Mean Earth radius (IUGG); the competition's metric does not name one, this is the usual choice.
EARTH_RADIUS_KM = 6371.0


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in km between points given in degrees (numpy, broadcasting)."""
    lat1, lon1, lat2, lon2 = (np.radians(np.asarray(v, dtype=np.float64)) for v in (lat1, lon1, lat2, lon2))
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    a = np.clip(a, 0.0, 1.0)
    return 2 * EARTH_RADIUS_KM * np.arctan2(np.sqrt(a), np.sqrt(1 - a))


def _safe_sqrt(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    # sqrt'(0) is infinite; gradient 0 there is the right subgradient of a distance at its minimum.
    positive = x > eps
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def haversine_km_torch(lat1: torch.Tensor, lon1: torch.Tensor, lat2: torch.Tensor, lon2: torch.Tensor) -> torch.Tensor:
    """Differentiable great-circle distance in km (degrees in); finite gradients at 0 km and at antipodes."""
    lat1, lon1, lat2, lon2 = (torch.deg2rad(v) for v in (lat1, lon1, lat2, lon2))
    a = torch.sin((lat2 - lat1) / 2) ** 2 + torch.cos(lat1) * torch.cos(lat2) * torch.sin((lon2 - lon1) / 2) ** 2
    a = a.clamp(0.0, 1.0)
    # atan2 form: asin'(1) is infinite at antipodes, atan2 stays finite.
    return 2 * EARTH_RADIUS_KM * torch.atan2(_safe_sqrt(a), _safe_sqrt(1 - a))


def latlon_to_xyz(lat, lon) -> np.ndarray:
    """Unit vectors (..., 3) for points in degrees."""
    lat, lon = np.radians(np.asarray(lat, dtype=np.float64)), np.radians(np.asarray(lon, dtype=np.float64))
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def xyz_to_latlon(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xyz = np.asarray(xyz, dtype=np.float64)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    return np.degrees(np.arctan2(z, np.hypot(x, y))), np.degrees(np.arctan2(y, x))


def spherical_mean(lat, lon, weights=None) -> tuple[float, float]:
    """Mean position on the sphere (normalised mean of unit vectors): a state's centroid."""
    xyz = latlon_to_xyz(lat, lon)
    w = np.ones(len(xyz)) if weights is None else np.asarray(weights, dtype=np.float64)
    mean = (xyz * w[:, None]).sum(axis=0)
    norm = np.linalg.norm(mean)
    if norm == 0:
        raise ValueError("points are spread evenly over the sphere: their mean is undefined")
    lat_c, lon_c = xyz_to_latlon(mean / norm)
    return float(lat_c), float(lon_c)


def circle_latlon(lat: float, lon: float, radius_km: float, points: int = 180) -> tuple[np.ndarray, np.ndarray]:
    """(lats, lons) in degrees of the closed great-circle ring of `radius_km` around a point (for maps)."""
    bearing = np.linspace(0.0, 2 * np.pi, points + 1)
    lat0, lon0, angle = np.radians(lat), np.radians(lon), radius_km / EARTH_RADIUS_KM
    lat1 = np.arcsin(np.sin(lat0) * np.cos(angle) + np.cos(lat0) * np.sin(angle) * np.cos(bearing))
    lon1 = lon0 + np.arctan2(np.sin(bearing) * np.sin(angle) * np.cos(lat0), np.cos(angle) - np.sin(lat0) * np.sin(lat1))
    return np.degrees(lat1), np.degrees(lon1)
