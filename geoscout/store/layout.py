"""Where things live in a feature store folder and what each HDF5 file holds (schema v1).

STORE_DIR/
  store.json               the dataset this store belongs to (fingerprint, classes)
  {split}.samples.csv      sample_id, state_idx, class_id, latitude, longitude (labels empty for test)
  {split}.{backbone}.h5    features (N,4,D) f16, [projected (N,4,P) f16], [features_flip (N,4,D) f16],
                           mask (N,4) bool, sample_id (N,) i8
                           features_flip (extract --flip): each view mirrored left-right, in the same
                           N/E/S/W slots (the East/West swap of a mirrored world is left to the heads)
  {split}.{backbone}.bad_views.csv   views masked by --bad-images mask (sample_id, view, file, error)
  validation_split.json    the validation rows every head shares (written by the first `train`)
  .shards/{split}.{backbone}/        work in progress; removed once the .h5 is sealed
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SCHEMA_VERSION = 1
MANIFEST = "store.json"
FLIP_DATASET = "features_flip"


def features_path(store_dir: Path, split: str, backbone: str) -> Path:
    return Path(store_dir) / f"{split}.{backbone}.h5"


def samples_path(store_dir: Path, split: str) -> Path:
    return Path(store_dir) / f"{split}.samples.csv"


def bad_views_path(store_dir: Path, split: str, backbone: str) -> Path:
    return Path(store_dir) / f"{split}.{backbone}.bad_views.csv"


def validation_split_path(store_dir: Path) -> Path:
    """The one train/validation split every head and the ensemble share (see store/split.py)."""
    return Path(store_dir) / "validation_split.json"


def shard_dir(store_dir: Path, split: str, backbone: str) -> Path:
    return Path(store_dir) / ".shards" / f"{split}.{backbone}"


def backbone_fingerprint(spec: dict, weights_identity: dict, preprocessing: dict, *, precision: str) -> str:
    """Identity of what produced the numbers: architecture, exact weights, preprocessing and the
    precision the backbone computed in (bf16 features are not fp32 features: heads must not mix them).

    Where the weights came from (hub repo, revision) is recorded in the store but left out here:
    the same file bytes give the same fingerprint whether downloaded or copied.
    """
    content = {k: v for k, v in weights_identity.items() if k not in ("repo_id", "revision")}
    blob = json.dumps({"spec": spec, "weights": content, "preprocessing": preprocessing, "precision": precision}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
