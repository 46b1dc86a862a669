"""Reading stores back: whole splits into RAM at disk speed, refusing anything that does not line up."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import polars as pl

from ..competition import VIEWS
from ..errors import GeoscoutError
from .features import SplitFeatures
from .h5 import open_h5
from .layout import (
    FEATURES_DATASET,
    FLIP_DATASET,
    LAYER_DATASETS,
    MANIFEST,
    NOT_FEATURES,
    SCHEMA_VERSION,
    backbone_from_key,
    features_path,
    samples_path,
)


class StoreError(GeoscoutError, ValueError):
    """A store that is missing, incomplete, of another schema, or does not match its companions."""


def read_manifest(store_dir: Path) -> dict:
    path = Path(store_dir) / MANIFEST
    if not path.exists():
        raise StoreError(f"{store_dir} is not a feature store (no {MANIFEST}); run `geoscout extract` first")
    return json.loads(path.read_text())


def available_backbones(store_dir: Path, split: str) -> list[str]:
    """Canonical names of the backbones with a sealed file for `split`."""
    prefix = f"{split}."
    return sorted(backbone_from_key(p.name[len(prefix):-3]) for p in Path(store_dir).glob(f"{split}.*.h5"))


def read_store_attrs(path: Path) -> dict:
    if not path.exists():
        raise StoreError(f"{path} not found")
    with open_h5(path, "r") as f:
        attrs = dict(f.attrs)
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{path}: schema version {attrs.get('schema_version')}, this geoscout reads {SCHEMA_VERSION}")
    if not attrs.get("complete"):
        raise StoreError(f"{path} is not complete; rerun `geoscout extract` to finish it")
    return attrs


def _read_contiguous(ds: h5py.Dataset) -> np.ndarray:
    # read_direct into one preallocated array: no intermediate copies, runs near disk speed
    out = np.empty(ds.shape, dtype=ds.dtype)
    if out.size:
        ds.read_direct(out)
    return out


def read_features(path: Path) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """(attrs, sample_id, features (N,4,D) f16, mask (N,4) bool) of one store file."""
    attrs = read_store_attrs(path)
    with open_h5(path, "r") as f:
        return attrs, _read_contiguous(f["sample_id"]), _read_contiguous(f["features"]), _read_contiguous(f["mask"])


@contextmanager
def open_checked(store_dir: Path, split: str, backbone: str, *, manifest: dict, sample_id: np.ndarray):
    """The open HDF5 file of (split, backbone), after checking it belongs to this store, row for row."""
    path = features_path(store_dir, split, backbone)
    if not path.exists():
        have = available_backbones(store_dir, split)
        raise StoreError(f"no {split} features for backbone {backbone!r} in {store_dir}; available: {have or 'none'}")
    attrs = read_store_attrs(path)
    if attrs["dataset_fingerprint"] != manifest["dataset_fingerprint"]:
        raise StoreError(
            f"{path} was built from other data (dataset fingerprint {attrs['dataset_fingerprint']}, "
            f"this store's is {manifest['dataset_fingerprint']})"
        )
    with open_h5(path, "r") as f:
        if not np.array_equal(f["sample_id"][()], sample_id):
            raise StoreError(f"{path}: its sample_id order differs from {samples_path(store_dir, split).name}")
        if f["mask"].shape != (len(sample_id), len(VIEWS)):
            raise StoreError(f"{path}: mask shape {f['mask'].shape}")
        yield f


def read_samples(store_dir: Path, split: str) -> pl.DataFrame:
    """The split's sample table: sample_id, state_idx, class_id, latitude, longitude (labels null for test)."""
    path = samples_path(store_dir, split)
    if not path.exists():
        raise StoreError(f"{path} not found; run `geoscout extract` for the {split} split")
    return pl.read_csv(path)


def _missing_datasets(f: h5py.File, name: str, missing: list[str]) -> StoreError:
    have = sorted(k for k in f if k not in NOT_FEATURES)
    hints = []
    if any(d in LAYER_DATASETS for d in missing):
        hints.append("extract with --layers K to store the class tokens of the last K blocks ('layers') "
                     "and the mean of the final patch tokens ('patch_mean')")
    if FLIP_DATASET in missing:
        hints.append(f"extract with --flip to store {FLIP_DATASET!r}")
    return StoreError(
        f"{f.filename}: backbone {name!r} has no {', '.join(repr(d) for d in missing)} dataset "
        f"(it has: {', '.join(have)})" + ("; " + "; ".join(hints) if hints else "")
    )


def _read_datasets(f: h5py.File, name: str, datasets: tuple[str, ...]) -> np.ndarray:
    """The chosen datasets of one store file, concatenated along the last axis (float16)."""
    missing = [d for d in datasets if d not in f]
    if missing:
        raise _missing_datasets(f, name, missing)
    n = f["mask"].shape[0]
    widths = [f[d].shape[-1] for d in datasets]
    out = np.empty((n, len(VIEWS), sum(widths)), dtype=np.float16)  # filled in place: no second copy
    start = 0
    for d, width in zip(datasets, widths):
        if f[d].shape != (n, len(VIEWS), width) or f[d].dtype != np.float16:
            raise StoreError(f"{f.filename}: dataset {d!r} is {f[d].dtype} {f[d].shape}, not per-view float16 vectors")
        if n and width:
            f[d].read_direct(out, dest_sel=np.s_[..., start:start + width])
        start += width
    return out


def read_split(
    store_dir: Path, split: str, backbones: list[str], datasets: tuple[str, ...] | list[str] = (FEATURES_DATASET,)
) -> SplitFeatures:
    """Per-view vectors of `split` for every named (canonical) backbone, aligned row by row with the sample table.

    `datasets` chooses what each backbone's vectors are: the named datasets of its store file
    (docs/store.md: "features", "projected", "layers", "patch_mean", ...) concatenated along the last
    axis, in the order given. A dataset a file lacks is an error that says how to extract it.
    `flipped` is filled only for plain "features" (the mirrored views are stored for those alone).
    Stores of other data, of another row order, or of mixed datasets are refused.
    """
    store_dir = Path(store_dir)
    manifest = read_manifest(store_dir)
    if not backbones:
        raise StoreError("no backbone named")
    datasets = tuple(datasets)
    if not datasets:
        raise StoreError("no dataset named")
    not_vectors = [d for d in datasets if d in NOT_FEATURES]
    if not_vectors or len(set(datasets)) != len(datasets):
        raise StoreError(f"datasets {list(datasets)}: each may be named once, "
                         f"and {', '.join(NOT_FEATURES)} are not per-view vectors")
    table = read_samples(store_dir, split)
    sample_id = table["sample_id"].to_numpy().astype(np.int64)
    features, masks, fingerprints, flipped = {}, {}, {}, {}
    for name in backbones:
        with open_checked(store_dir, split, name, manifest=manifest, sample_id=sample_id) as f:
            features[name], masks[name] = _read_datasets(f, name, datasets), _read_contiguous(f["mask"])
            fingerprints[name] = str(f.attrs["backbone_fingerprint"])
            if datasets == (FEATURES_DATASET,) and FLIP_DATASET in f:
                flipped[name] = _read_contiguous(f[FLIP_DATASET])
    labelled = table["class_id"].null_count() == 0
    return SplitFeatures(
        split=split,
        sample_id=sample_id,
        features=features,
        masks=masks,
        classes=np.asarray(manifest["classes"], dtype=np.int64),
        class_id=table["class_id"].to_numpy().astype(np.int64) if labelled else None,
        latlon=table.select("latitude", "longitude").to_numpy().astype(np.float64) if labelled else None,
        dataset_fingerprint=manifest["dataset_fingerprint"],
        backbone_fingerprints=fingerprints,
        flipped=flipped,
        datasets=datasets,
    )
