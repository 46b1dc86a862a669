"""The one validation split every head and the ensemble share, and its small JSON file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from .features import SplitFeatures
from .reader import StoreError

SPLIT_FORMAT = "geoscout-validation-split/1"


def make_validation_split(class_id: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask, True for validation rows: `fraction` of every class (rounded), seeded.

    Every class keeps at least one training row, so each class has a centroid and a chance to be learned.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1); got {fraction}")
    class_id = np.asarray(class_id)
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(class_id), dtype=bool)
    for c in np.unique(class_id):
        rows = np.flatnonzero(class_id == c)
        take = min(int(round(fraction * len(rows))), len(rows) - 1)
        mask[rng.permutation(rows)[:take]] = True
    return mask


def validation_digest(sample_ids: np.ndarray) -> str:
    """Identity of a set of validation rows: heads trained with different held-out rows must not be mixed."""
    ids = np.sort(np.asarray(sample_ids, dtype=np.int64))
    return hashlib.sha256(ids.tobytes()).hexdigest()[:16]


def save_validation_split(path: Path, *, features: SplitFeatures, mask: np.ndarray, fraction: float, seed: int) -> None:
    if len(mask) != len(features):
        raise ValueError(f"the mask has {len(mask)} rows; the features have {len(features)}")
    record = {
        "format": SPLIT_FORMAT,
        "dataset_fingerprint": features.dataset_fingerprint,
        "fraction": fraction,
        "seed": seed,
        "n_rows": len(features),
        "sample_ids": sorted(int(s) for s in features.sample_id[mask]),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps(record) + "\n")


def load_validation_split(path: Path, features: SplitFeatures) -> np.ndarray:
    """The mask over `features` rows; refuses a split made for another dataset or another set of rows."""
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    if record.get("format") != SPLIT_FORMAT:
        raise StoreError(f"{path}: format {record.get('format')!r}; expected {SPLIT_FORMAT!r}")
    if record["dataset_fingerprint"] != features.dataset_fingerprint:
        raise StoreError(
            f"{path} was made for dataset {record['dataset_fingerprint']!r}; these features are dataset "
            f"{features.dataset_fingerprint!r}"
        )
    if record["n_rows"] != len(features):
        raise StoreError(f"{path} was made for {record['n_rows']} rows; these features have {len(features)}")
    mask = np.isin(features.sample_id, np.asarray(record["sample_ids"], dtype=np.int64))
    if mask.sum() != len(record["sample_ids"]):
        raise StoreError(f"{path} names {len(record['sample_ids']) - int(mask.sum())} sample_id(s) that these features lack")
    return mask
