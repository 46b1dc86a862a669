"""A head folder: K fold models as safetensors, their out-of-fold outputs, and a JSON card.

  head.json           the card: kind, backbones, config, classes, geocells, the fingerprints of the
                      features it was trained on, the validation and fold digests, metrics
  fold{k}.safetensors the weights of the model trained without fold k
  oof.safetensors     "outputs": what each fit row got from the model that never saw it; "sample_id";
                      "outputs:swap" / "outputs:naive": the same for the mirrored views (stores with --flip)

A head is rebuilt from its folder alone (config + weights), and refuses features of other data or
another backbone. Folders are written whole: to `NAME.tmp`, renamed into place last (atomic.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_write_text
from ..errors import GeoscoutError
from ..store.features import SplitFeatures
from .geocells import Geocells

CARD_FILE = "head.json"
OOF_FILE = "oof.safetensors"
CARD_FORMAT = "geoscout-head/2"  # 2: K fold models and out-of-fold outputs


class CheckpointError(GeoscoutError, ValueError):
    """A head folder that cannot be used: unreadable, inconsistent, or made for other features."""


def fold_file(k: int) -> str:
    return f"fold{k}.safetensors"


@dataclass
class HeadCard:
    kind: str  # "classifier", "probe" or "regressor"
    name: str  # the folder name, e.g. "classifier-streetclip" or "probe-streetclip+convnextv2-large"
    backbones: list[str]  # whose features it reads, in order (side by side)
    config: dict
    classes: list[int]  # state_idx of each class id
    centroids: list[list[float]]  # (K, 2) degrees: each output cell's centroid, from the fit rows
    cell_class: list[int]  # (K,) the class of each cell; one cell per class for a probe
    dataset_fingerprint: str
    backbone_fingerprints: dict[str, str]
    input_dim: int  # what the module reads: sum of the backbones' widths
    validation_digest: str  # which rows were held out from everything (store/split.py)
    folds_digest: str  # which fit rows, in which folds (folds.py)
    folds: int
    metrics: dict = field(default_factory=dict)
    format: str = CARD_FORMAT

    @property
    def inputs(self) -> tuple[str, ...]:
        """The store datasets the head reads, side by side (a regressor reads "features")."""
        return tuple(self.config.get("inputs", ("features",)))

    def geocells(self) -> Geocells:
        return Geocells(np.asarray(self.cell_class, dtype=np.int64), np.asarray(self.centroids, dtype=np.float64),
                        len(self.classes))


def weights_sha256(head_dir: Path) -> str:
    """One digest over every fold's weights: an ensemble notices when a member was retrained."""
    h = hashlib.sha256()
    card = read_card(head_dir)
    for k in range(card.folds):
        h.update((Path(head_dir) / fold_file(k)).read_bytes())
    return h.hexdigest()


def save_head(head_dir: Path, modules: list[nn.Module], card: HeadCard, oof: dict[str, np.ndarray] | None = None,
              oof_sample_id: np.ndarray | None = None) -> None:
    """Write into an existing (fresh) folder; callers make it whole with atomic.atomic_dir."""
    head_dir = Path(head_dir)
    if len(modules) != card.folds:
        raise ValueError(f"{len(modules)} fold models for a card of {card.folds} folds")
    for k, module in enumerate(modules):
        state = {name: t.detach().cpu().contiguous() for name, t in module.state_dict().items()}
        save_file(state, str(head_dir / fold_file(k)), metadata={"format": CARD_FORMAT, "kind": card.kind, "fold": str(k)})
    if oof is not None:  # {"": plain outputs, "swap"/"naive": mirrored ones}
        tensors = {("outputs" if mode == "" else f"outputs:{mode}"): torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
                   for mode, v in oof.items()}
        save_file({**tensors, "sample_id": torch.from_numpy(np.asarray(oof_sample_id, dtype=np.int64))}, str(head_dir / OOF_FILE))
    atomic_write_text(head_dir / CARD_FILE, json.dumps(dataclasses.asdict(card), indent=1) + "\n")


def read_card(head_dir: Path) -> HeadCard:
    path = Path(head_dir) / CARD_FILE
    if not path.is_file():
        raise CheckpointError(f"{head_dir}: no {CARD_FILE}; is this a head folder written by geoscout? (train it first)")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != CARD_FORMAT:
        raise CheckpointError(f"{path}: format {data.get('format')!r}; this geoscout reads {CARD_FORMAT!r}: retrain the head")
    try:
        return HeadCard(**data)
    except TypeError as exc:
        raise CheckpointError(f"{path}: not a valid head card ({exc})") from None


def load_weights(module: nn.Module, head_dir: Path, k: int) -> nn.Module:
    """Strict load of fold k that says exactly how the file and the config disagree."""
    path = Path(head_dir) / fold_file(k)
    if not path.is_file():
        raise CheckpointError(f"{head_dir}: no {fold_file(k)}")
    stored = load_file(str(path))
    expected = module.state_dict()
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    shapes = {k: (tuple(stored[k].shape), tuple(v.shape)) for k, v in expected.items() if k in stored and stored[k].shape != v.shape}
    if missing or unexpected or shapes:
        details = [f"missing {missing[:5]}" * bool(missing), f"unexpected {unexpected[:5]}" * bool(unexpected)]
        details += [f"{k}: file {a} vs config {b}" for k, (a, b) in list(shapes.items())[:5]]
        raise CheckpointError(
            f"{head_dir}: the weights in {fold_file(k)} do not fit the config in {CARD_FILE}: " + "; ".join(d for d in details if d)
        )
    module.load_state_dict(stored, strict=True)
    return module.eval()


def read_oof(head_dir: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({"": outputs (M, K) float32, and "swap"/"naive" for mirrored views where present}, sample_id (M,)) of
    the fit rows, each from the fold model that never saw it."""
    path = Path(head_dir) / OOF_FILE
    if not path.is_file():
        raise CheckpointError(f"{head_dir}: no {OOF_FILE}")
    data = load_file(str(path))
    outputs = {name.partition(":")[2]: t.numpy() for name, t in data.items() if name.startswith("outputs")}
    return outputs, data["sample_id"].numpy()


def check_features(card: HeadCard, features: SplitFeatures, head_dir: Path) -> None:
    """Refuse features the head was not trained for, naming both fingerprints."""
    missing = [b for b in card.backbones if b not in features.features]
    if missing:
        raise CheckpointError(f"{head_dir} reads backbone(s) {missing}; these features have {sorted(features.features)}")
    if tuple(features.datasets) != card.inputs:
        raise CheckpointError(f"{head_dir} reads the store datasets {list(card.inputs)}; these features hold "
                              f"{list(features.datasets)}")
    if features.dataset_fingerprint != card.dataset_fingerprint:
        raise CheckpointError(
            f"{head_dir} was trained on dataset {card.dataset_fingerprint!r}; these features are dataset "
            f"{features.dataset_fingerprint!r}: retrain the head on these features"
        )
    for b in card.backbones:
        have = features.backbone_fingerprints.get(b, "")
        if have != card.backbone_fingerprints.get(b):
            raise CheckpointError(
                f"{head_dir} was trained on backbone {b!r} {card.backbone_fingerprints.get(b)!r}; these features are "
                f"{have!r} (other weights or preprocessing): retrain the head on these features"
            )
    if not np.array_equal(np.asarray(card.classes), features.classes):
        raise CheckpointError(f"{head_dir} predicts classes (state_idx) {card.classes}; these features have {features.classes.tolist()}")
    dim = sum(features.features[b].shape[2] for b in card.backbones)
    if dim != card.input_dim:
        raise CheckpointError(f"{head_dir} expects {card.input_dim}-d inputs from {card.backbones}; these are {dim}-d")
