"""Crash-safe store writing: fixed shards completed by atomic rename, sealed into one HDF5 file.

An h5py writer killed mid-run loses every row (and `libver='latest'` files refuse to reopen),
so features never go straight into the final file. Each shard of `shard_size` locations is
written to `.shards/` as its own file and renamed into place when whole; a rerun skips the
shards that exist. When all shards exist, they are copied into `{split}.{backbone}.h5.tmp`,
which is renamed into place last: a store file under its final name is always complete.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import polars as pl

from .. import __version__
from ..atomic import atomic_write_text, fsync_dir
from ..competition import VIEWS
from ..errors import warn
from .h5 import lock_error, open_h5
from .layout import FLIP_DATASET, SCHEMA_VERSION, bad_views_path, features_path, shard_dir

BAD_VIEW_COLUMNS = ("sample_id", "view", "file", "error")


@dataclass(frozen=True)
class StoreIdentity:
    """Everything the numbers in a store depend on; a resumed run must match it exactly."""

    split: str
    backbone: str
    n_rows: int
    split_fingerprint: str
    dataset_fingerprint: str
    backbone_fingerprint: str
    spec: dict
    weights_identity: dict
    preprocessing: dict
    classes: list
    dims: dict  # output name ("features", "projected") -> embedding size
    shard_size: int  # shard files are named by index, so their boundaries must not move on resume
    precision: str  # "fp32", "bf16" or "fp16": what the backbone computed in; never mixed in one store

    def attrs(self) -> dict:
        """HDF5 attributes of the sealed file (JSON for nested values, readable with plain h5py)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "geoscout_version": __version__,
            "split": self.split,
            "backbone": self.backbone,
            "split_fingerprint": self.split_fingerprint,
            "dataset_fingerprint": self.dataset_fingerprint,
            "backbone_fingerprint": self.backbone_fingerprint,
            "backbone_spec": json.dumps(self.spec, sort_keys=True),
            "weights_identity": json.dumps(self.weights_identity, sort_keys=True),
            "preprocessing": json.dumps(self.preprocessing, sort_keys=True),
            "precision": self.precision,
            "classes": json.dumps(self.classes),
            "views": json.dumps(list(VIEWS)),
            "complete": True,
        }


class ShardedWriter:
    """Writes one (split, backbone) store. Shards are independent, so ranks may share the work."""

    def __init__(self, store_dir: Path, identity: StoreIdentity):
        self.store_dir = Path(store_dir)
        self.identity = identity
        self.dir = shard_dir(self.store_dir, identity.split, identity.backbone)
        self.final = features_path(self.store_dir, identity.split, identity.backbone)

    @property
    def n_shards(self) -> int:
        return -(-self.identity.n_rows // self.identity.shard_size)

    def shard_rows(self, shard: int) -> range:
        size = self.identity.shard_size
        return range(shard * size, min((shard + 1) * size, self.identity.n_rows))

    def _shard_file(self, shard: int) -> Path:
        return self.dir / f"shard_{shard:06d}.npz"

    def prepare(self, device: str = "cpu") -> None:
        """Start or resume: shards left by a run with another identity (precision included) or on another
        kind of device are stale and discarded, so a store is never completed with shards computed another
        way (a GPU's and a CPU's numbers differ in the last bits even at one precision). A sealed store is
        whole, so it serves any device."""
        run_file = self.dir / "identity.json"
        wanted = json.dumps({**asdict(self.identity), "device": device}, sort_keys=True)
        if self.dir.exists() and (not run_file.exists() or run_file.read_text() != wanted):
            self._discard_stale(run_file, device)
        if not self.dir.exists():
            self.dir.mkdir(parents=True)
            atomic_write_text(run_file, wanted)

    def _discard_stale(self, run_file: Path, device: str) -> None:
        done = len(list(self.dir.glob("shard_*.npz")))
        if done:
            old = json.loads(run_file.read_text()) if run_file.exists() else {}
            if old.get("precision", self.identity.precision) != self.identity.precision:
                why = f"computed at precision {old.get('precision')}, this run asks for {self.identity.precision}"
            elif old.get("device", device) != device:
                why = f"computed on {old.get('device')}, this run is on {device}"
            else:
                why = "made with other settings"
            warn(f"discarding {done} shard(s) of an unfinished {self.final.name} {why}; starting it again")
        shutil.rmtree(self.dir)

    def pending_shards(self) -> list[int]:
        return [k for k in range(self.n_shards) if not self._shard_file(k).exists()]

    def write_shard(self, shard: int, outputs: dict[str, np.ndarray], mask: np.ndarray, bad_views: list[dict]) -> None:
        rows = self.shard_rows(shard)
        for name, arr in outputs.items():
            if arr.shape != (len(rows), len(VIEWS), self.identity.dims[name]):
                raise ValueError(f"shard {shard} output {name!r} has shape {arr.shape}")
        buf = io.BytesIO()
        np.savez(buf, mask=mask, bad_views=np.frombuffer(json.dumps(bad_views).encode(), dtype=np.uint8),
                 **{k: v.astype(np.float16) for k, v in outputs.items()})
        tmp = self._shard_file(shard).with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._shard_file(shard))

    def _read_shard(self, shard: int) -> dict[str, np.ndarray]:
        with np.load(self._shard_file(shard), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def seal(self, sample_id: np.ndarray) -> Path:
        """Assemble the shards into the final HDF5 file; refuses while any shard is missing."""
        missing = self.pending_shards()
        if missing:
            raise RuntimeError(f"cannot seal {self.final.name}: {len(missing)} of {self.n_shards} shards missing")
        ident = self.identity
        n = ident.n_rows
        tmp = self.final.with_name(self.final.name + ".tmp")
        bad_views: list[dict] = []
        with open_h5(tmp, "w") as f:
            # contiguous (no chunks, no compression): whole-split reads run at disk speed
            datasets = {name: f.create_dataset(name, shape=(n, len(VIEWS), dim), dtype="f2") for name, dim in ident.dims.items()}
            mask = f.create_dataset("mask", shape=(n, len(VIEWS)), dtype=bool)
            f.create_dataset("sample_id", data=np.asarray(sample_id, dtype=np.int64))
            for k in range(self.n_shards):
                rows = self.shard_rows(k)
                shard = self._read_shard(k)
                for name, ds in datasets.items():
                    ds[rows.start:rows.stop] = shard[name]
                mask[rows.start:rows.stop] = shard["mask"]
                bad_views += json.loads(shard["bad_views"].tobytes().decode())
            f.attrs.update(ident.attrs())
            f.attrs["n_bad_views"] = len(bad_views)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        bad_path = bad_views_path(self.store_dir, ident.split, ident.backbone)
        if bad_views:
            pl.DataFrame(bad_views).select(BAD_VIEW_COLUMNS).write_csv(bad_path)
        elif bad_path.exists():
            bad_path.unlink()
        os.replace(tmp, self.final)
        fsync_dir(self.store_dir)
        shutil.rmtree(self.dir)
        return self.final


def sealed_identity(path: Path) -> dict | None:
    """Attributes of a sealed store file, or None when there is none (or it is unreadable).

    A file HDF5 cannot lock is not "unreadable": that raises FileLockError, so that a locking
    failure on a network file system is never reported as a store of other data.
    """
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            return dict(f.attrs)
    except OSError as exc:
        better = lock_error(path, exc)
        if better is not None:
            raise better from exc
        return None


def matches(path: Path, identity: StoreIdentity) -> bool:
    """A sealed file of the same numbers holding at least the wanted outputs (a --flip store serves a plain run)."""
    attrs = sealed_identity(path)
    if attrs is None:
        return False
    want = identity.attrs()
    keys = ("schema_version", "split_fingerprint", "dataset_fingerprint", "backbone_fingerprint", "precision")
    if not (all(str(attrs.get(k)) == str(want[k]) for k in keys) and bool(attrs.get("complete"))):
        return False
    with open_h5(path, "r") as f:
        return set(identity.dims) <= set(f)


def mismatch(path: Path, identity: StoreIdentity) -> str:
    """Why the sealed file at `path` does not serve `identity`, in words (for the conflict message)."""
    attrs = sealed_identity(path) or {}
    have = attrs.get("precision")
    if have is not None and str(have) != identity.precision:
        return f"was computed at precision {have}, not {identity.precision}"
    if str(attrs.get("split_fingerprint")) != identity.split_fingerprint:
        return "holds other rows"
    if str(attrs.get("backbone_fingerprint")) != identity.backbone_fingerprint:
        layers = json.loads(attrs.get("backbone_spec") or "{}").get("layers", 0)
        if layers != identity.spec.get("layers", 0):
            return f"was extracted with --layers {layers}, not {identity.spec.get('layers', 0)}"
        return "was made with other weights, preprocessing or precision"
    with open_h5(path, "r") as f:
        missing = sorted(set(identity.dims) - set(f))
    if FLIP_DATASET in missing:
        return "was extracted without --flip"
    return f"lacks {', '.join(missing)}"
