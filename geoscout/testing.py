"""Test data for the heads: synthetic features with a planted answer (class and position are recoverable).

Used by the tests and by bench/heads.py, never by the library itself; it lives in the package so that
both can import it. Each class has a centre (inside a USA-like
box) and, per backbone, a prototype embedding; a location's position inside its class moves its
embedding along two fixed directions. Every view is the same signal plus its own noise; some views are
missing (their slots hold large garbage a head must ignore), and a few locations miss every view.
"""

from __future__ import annotations

import numpy as np

from .geo import haversine_km
from .store.features import SplitFeatures

PLANTED_BACKBONES = {"tiny-clip": 32, "tiny-convnext": 48}
PLANTED_NOISE = {"tiny-clip": 2.0, "tiny-convnext": 2.3}


def _class_centres(rng: np.random.Generator, num_classes: int, min_km: float) -> np.ndarray:
    centres: list[tuple[float, float]] = []
    while len(centres) < num_classes:
        lat, lon = rng.uniform(30.0, 47.0), rng.uniform(-120.0, -75.0)
        if all(haversine_km(lat, lon, a, b) > min_km for a, b in centres):
            centres.append((lat, lon))
    return np.array(centres)


def make_planted_features(
    *,
    n: int = 600,
    num_classes: int = 6,
    dims: dict[str, int] | None = None,
    noise: dict[str, float] | None = None,
    position_signal: float = 1.5,
    radius_deg: float = 3.0,
    missing_fraction: float = 0.15,
    all_missing_fraction: float = 0.01,
    world_seed: int = 0,
    seed: int = 0,
    labelled: bool = True,
    split: str = "train",
    dataset_fingerprint: str = "planted",
) -> SplitFeatures:
    """`world_seed` fixes classes, centres and prototypes (share it between a train and a test split);
    `seed` draws the locations. Noise is the per-dimension std of each view's noise."""
    dims = dict(PLANTED_BACKBONES if dims is None else dims)
    noise = {name: (PLANTED_NOISE.get(name, 3.0) if noise is None else noise[name]) for name in dims}
    world = np.random.default_rng(world_seed)
    classes = np.sort(world.choice(50, size=num_classes, replace=False)).astype(np.int64)
    centres = _class_centres(world, num_classes, min_km=2.5 * radius_deg * 111.0)
    frequency = 1.0 / (1.0 + 0.3 * np.arange(num_classes))  # mildly imbalanced, like the real states
    prototypes = {name: world.normal(size=(num_classes, d)) for name, d in dims.items()}
    directions = {name: world.normal(size=(2, d)) for name, d in dims.items()}

    rng = np.random.default_rng(seed)
    class_id = rng.choice(num_classes, size=n, p=frequency / frequency.sum()).astype(np.int64)
    position = rng.uniform(-1.0, 1.0, size=(n, 2))
    latlon = centres[class_id] + radius_deg * position
    masks, features = {}, {}
    for name, d in dims.items():
        signal = (prototypes[name][class_id] + position_signal * position @ directions[name]).astype(np.float32)
        # float32 draws: benchmarks ask for competition-sized splits (66k x 4 x 1536).
        views = signal[:, None, :] + np.float32(noise[name]) * rng.standard_normal((n, 4, d), dtype=np.float32)
        mask = rng.random((n, 4)) >= missing_fraction
        mask[rng.random(n) < all_missing_fraction] = False
        views[~mask] = 50.0 * rng.standard_normal((int((~mask).sum()), d), dtype=np.float32)
        features[name], masks[name] = views.astype(np.float16), mask
    return SplitFeatures(
        split=split,
        sample_id=np.arange(n, dtype=np.int64) + (0 if split == "train" else 1_000_000),
        features=features,
        masks=masks,
        classes=classes,
        class_id=class_id if labelled else None,
        latlon=latlon if labelled else None,
        dataset_fingerprint=dataset_fingerprint,
        backbone_fingerprints={name: f"planted-{name}-{world_seed}" for name in dims},
    )
