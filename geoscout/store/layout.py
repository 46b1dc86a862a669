"""Where things live in a feature store folder and what each HDF5 file holds (schema v1).

STORE_DIR/
  store.json               the dataset this store belongs to (fingerprint, classes)
  {split}.samples.csv      sample_id, state_idx, class_id, latitude, longitude (labels empty for test)
  {split}.{key}.h5         features (N,4,D) f16, [projected (N,4,P) f16], [features_flip (N,4,D) f16],
                           [layers (N,4,L) f16, patch_mean (N,4,D') f16], mask (N,4) bool, sample_id (N,) i8
                           features_flip (extract --flip): each view mirrored left-right, in the same
                           N/E/S/W slots (the East/West swap of a mirrored world is left to the heads)
                           layers, patch_mean (extract --layers K): see docs/store.md
  {split}.{key}.bad_views.csv   views masked by --bad-images mask (sample_id, view, file, error)
  validation_split.json    the validation rows every head shares (written by the first `train`)
  .shards/{split}.{key}/   work in progress; removed once the .h5 is sealed

{key} is the backbone's canonical name made file-safe by `store_key` (':' -> '~', '/' -> '+').
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SCHEMA_VERSION = 1
MANIFEST = "store.json"
FLIP_DATASET = "features_flip"
FEATURES_DATASET = "features"
LAYERS_DATASET = "layers"  # one vector per each of the last K blocks (extract --layers K)
PATCH_MEAN_DATASET = "patch_mean"  # mean of the final patch tokens (extract --layers K)
LAYER_DATASETS = (LAYERS_DATASET, PATCH_MEAN_DATASET)
NOT_FEATURES = ("mask", "sample_id")  # datasets of a store file that are not per-view embeddings
# Backbone names may hold ':' and '/' (timm:..., open_clip:hf-hub:org/repo); neither character
# occurs in any file name made from them, and '~' and '+' never occur in a backbone name.
_KEY_CHARS = {":": "~", "/": "+"}


def store_key(backbone: str) -> str:
    """The file-safe form of a (canonical) backbone name, used in every store path; reversible."""
    if any(c in backbone for c in _KEY_CHARS.values()) or not backbone or backbone.startswith("."):
        raise ValueError(f"backbone name {backbone!r} cannot be made into a store file name")
    for char, safe in _KEY_CHARS.items():
        backbone = backbone.replace(char, safe)
    return backbone


def backbone_from_key(key: str) -> str:
    """The backbone name a store file name was made from (the inverse of `store_key`)."""
    for char, safe in _KEY_CHARS.items():
        key = key.replace(safe, char)
    return key


def features_path(store_dir: Path, split: str, backbone: str) -> Path:
    return Path(store_dir) / f"{split}.{store_key(backbone)}.h5"


def samples_path(store_dir: Path, split: str) -> Path:
    return Path(store_dir) / f"{split}.samples.csv"


def bad_views_path(store_dir: Path, split: str, backbone: str) -> Path:
    return Path(store_dir) / f"{split}.{store_key(backbone)}.bad_views.csv"


def validation_split_path(store_dir: Path) -> Path:
    """The one train/validation split every head and the ensemble share (see store/split.py)."""
    return Path(store_dir) / "validation_split.json"


def shard_dir(store_dir: Path, split: str, backbone: str) -> Path:
    return Path(store_dir) / ".shards" / f"{split}.{store_key(backbone)}"


def backbone_fingerprint(spec: dict, weights_identity: dict, preprocessing: dict, *, precision: str) -> str:
    """Identity of what produced the numbers: architecture, exact weights, preprocessing and the
    precision the backbone computed in (bf16 features are not fp32 features: heads must not mix them).

    Where the weights came from (hub repo, revision) is recorded in the store but left out here:
    the same file bytes give the same fingerprint whether downloaded or copied.
    """
    content = {k: v for k, v in weights_identity.items() if k not in ("repo_id", "revision")}
    blob = json.dumps({"spec": spec, "weights": content, "preprocessing": preprocessing, "precision": precision}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
