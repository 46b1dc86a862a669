"""Features of one split, loaded into memory for the heads: what every head trains and predicts from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..competition import VIEWS


@dataclass
class SplitFeatures:
    split: str
    sample_id: np.ndarray  # (N,) int64, the CSV's sample_id in store order
    features: dict[str, np.ndarray]  # backbone name -> (N, 4, D) float16, views in N/E/S/W order
    masks: dict[str, np.ndarray]  # backbone name -> (N, 4) bool, True where the view was embedded
    classes: np.ndarray  # (C,) int64: state_idx of each class id (shared by train and test)
    class_id: np.ndarray | None = None  # (N,) int64, None for an unlabelled split
    latlon: np.ndarray | None = None  # (N, 2) float64 degrees, None for an unlabelled split
    # What a head checkpoint is checked against: the competition data (both splits) and each
    # backbone's identity (spec + weights + preprocessing). Empty for features made in memory.
    dataset_fingerprint: str = ""
    backbone_fingerprints: dict[str, str] = field(default_factory=dict)
    # backbone name -> (N, 4, D) float16 features of the left-right mirrored views, same slots as
    # `features` (no East/West swap); only for stores extracted with --flip.
    flipped: dict[str, np.ndarray] = field(default_factory=dict)
    # the store datasets `features` holds, concatenated in this order (read_split(datasets=...))
    datasets: tuple[str, ...] = ("features",)
    # Arrays the heads derive from these features (e.g. view means), kept so that each is computed once
    # per split: the arrays above are read-only once a head has read them. Never saved, never passed in,
    # and a new split (`subset`, dataclasses.replace) starts without them.
    derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.sample_id)
        for name, f in self.features.items():
            if f.ndim != 3 or f.shape[:2] != (n, len(VIEWS)):
                raise ValueError(f"features of {name!r} have shape {f.shape}; expected ({n}, 4, D)")
            if self.masks[name].shape != (n, len(VIEWS)):
                raise ValueError(f"mask of {name!r} has shape {self.masks[name].shape}; expected ({n}, 4)")
            if name in self.flipped and self.flipped[name].shape != f.shape:
                raise ValueError(f"flipped features of {name!r} have shape {self.flipped[name].shape}; expected {f.shape}")
        for name, arr in (("class_id", self.class_id), ("latlon", self.latlon)):
            if arr is not None and len(arr) != n:
                raise ValueError(f"{name} has {len(arr)} rows; expected {n}")

    @property
    def labelled(self) -> bool:
        return self.class_id is not None

    def __len__(self) -> int:
        return len(self.sample_id)

    def subset(self, rows: np.ndarray) -> "SplitFeatures":
        return SplitFeatures(
            split=self.split,
            sample_id=self.sample_id[rows],
            features={k: v[rows] for k, v in self.features.items()},
            masks={k: v[rows] for k, v in self.masks.items()},
            classes=self.classes,
            class_id=None if self.class_id is None else self.class_id[rows],
            latlon=None if self.latlon is None else self.latlon[rows],
            dataset_fingerprint=self.dataset_fingerprint,
            backbone_fingerprints=dict(self.backbone_fingerprints),
            flipped={k: v[rows] for k, v in self.flipped.items()},
            datasets=self.datasets,
        )
