import math

import numpy as np
import pytest
import torch
from haversine import Unit, haversine

from geoscout.geo import EARTH_RADIUS_KM, haversine_km, haversine_km_torch, spherical_mean

RADIUS_RATIO = EARTH_RADIUS_KM / 6371.0088  # the haversine package uses the IUGG mean radius


def test_hand_computed_cases():
    quarter = math.pi / 2 * EARTH_RADIUS_KM
    assert haversine_km(0, 0, 0, 90) == pytest.approx(quarter)
    assert haversine_km(0, 0, 90, 0) == pytest.approx(quarter)
    assert haversine_km(10, 20, 10, 20) == 0.0
    assert haversine_km(0, 0, 0, 180) == pytest.approx(math.pi * EARTH_RADIUS_KM)
    assert haversine_km(0, 179.5, 0, -179.5) == pytest.approx(math.radians(1) * EARTH_RADIUS_KM)


def test_matches_the_haversine_package():
    rng = np.random.default_rng(0)
    pts = np.column_stack([rng.uniform(-90, 90, 500), rng.uniform(-180, 180, 500),
                           rng.uniform(-90, 90, 500), rng.uniform(-180, 180, 500)])
    ours = haversine_km(*pts.T)
    ref = np.array([haversine((a, b), (c, d), unit=Unit.KILOMETERS) for a, b, c, d in pts]) * RADIUS_RATIO
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-6)


def test_torch_matches_numpy_and_has_finite_gradients_at_zero_and_antipodes():
    lat1 = torch.tensor([40.0, 0.0, 12.3, 45.0], dtype=torch.float64, requires_grad=True)
    lon1 = torch.tensor([-75.0, 0.0, 45.6, -100.0], dtype=torch.float64, requires_grad=True)
    lat2 = torch.tensor([34.0, 0.0, 12.3, -45.0], dtype=torch.float64)
    lon2 = torch.tensor([-118.0, 180.0, 45.6, 80.0], dtype=torch.float64)
    d = haversine_km_torch(lat1, lon1, lat2, lon2)
    np.testing.assert_allclose(d.detach().numpy(), haversine_km(lat1.detach(), lon1.detach(), lat2, lon2), rtol=1e-12)
    d.sum().backward()
    assert torch.isfinite(lat1.grad).all() and torch.isfinite(lon1.grad).all()
    # at 0 km the gradient is the zero subgradient, not NaN
    assert lat1.grad[2] == 0 and lon1.grad[2] == 0


def test_torch_gradient_points_towards_the_target():
    lat = torch.tensor([40.0], requires_grad=True)
    lon = torch.tensor([-100.0], requires_grad=True)
    haversine_km_torch(lat, lon, torch.tensor([41.0]), torch.tensor([-100.0])).sum().backward()
    assert lat.grad.item() < 0 and abs(lon.grad.item()) < 1e-6


def test_spherical_mean_across_the_dateline():
    lat, lon = spherical_mean([0.0, 0.0], [179.0, -179.0])
    assert lat == pytest.approx(0.0, abs=1e-9) and abs(lon) == pytest.approx(180.0)
