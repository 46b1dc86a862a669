"""A head on disk: weights.safetensors + head.json (config, classes, centroids, fingerprints, metrics).

A head is rebuilt from its folder alone, and refuses features from another dataset or backbone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import GeoscoutError
from ..store.features import SplitFeatures
from .geocells import Geocells
from .models import ClassifierConfig, RegressorConfig, Scout, Sniper
from .presets import config_from_dict

WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "head.json"
CARD_FORMAT = "geoscout-head/1"


class CheckpointError(GeoscoutError, ValueError):
    """A head folder that cannot be used: unreadable, inconsistent, or made for other features."""


@dataclass
class HeadCard:
    kind: str  # "classifier" | "regressor"
    backbone: str
    config: dict
    classes: list[int]  # state_idx of each class id
    centroids: list[list[float]]  # (K, 2) degrees: each geocell's centroid, from the training rows
    dataset_fingerprint: str
    backbone_fingerprint: str
    feature_dim: int  # the backbone's embedding size
    input_dim: int  # what the module reads: feature_dim for a Scout, the Scout's descriptor size for a Sniper
    validation_digest: str  # which rows were held out (see split.validation_digest)
    metrics: dict = field(default_factory=dict)
    classifier_sha256: str = ""  # a Sniper: the weights of the Scout whose outputs it reads
    # The class id of each geocell; empty: one cell per class, in class order (heads from before geocells).
    cell_class: list[int] = field(default_factory=list)
    format: str = CARD_FORMAT

    def geocells(self) -> Geocells:
        cell_class = self.cell_class or list(range(len(self.classes)))
        return Geocells(np.asarray(cell_class, dtype=np.int64), np.asarray(self.centroids, dtype=np.float64), len(self.classes))


def weights_sha256(head_dir: Path) -> str:
    return hashlib.sha256((Path(head_dir) / WEIGHTS_FILE).read_bytes()).hexdigest()


def save_head(head_dir: Path, module: nn.Module, card: HeadCard) -> None:
    head_dir = Path(head_dir)
    head_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(head_dir / WEIGHTS_FILE), metadata={"format": CARD_FORMAT, "kind": card.kind})
    (head_dir / CARD_FILE).write_text(json.dumps(dataclasses.asdict(card), indent=1) + "\n", encoding="utf-8")


def read_card(head_dir: Path) -> HeadCard:
    path = Path(head_dir) / CARD_FILE
    if not path.is_file():
        raise CheckpointError(f"{head_dir}: no {CARD_FILE}; is this a head folder written by geoscout?")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != CARD_FORMAT:
        raise CheckpointError(f"{path}: format {data.get('format')!r}; expected {CARD_FORMAT!r}")
    try:
        return HeadCard(**data)
    except TypeError as exc:
        raise CheckpointError(f"{path}: not a valid head card ({exc})") from None


def _load_weights(module: nn.Module, head_dir: Path) -> None:
    """Strict load that says exactly how the file and the config disagree."""
    path = Path(head_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{head_dir}: no {WEIGHTS_FILE}")
    stored = load_file(str(path))
    expected = module.state_dict()
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    shapes = {k: (tuple(stored[k].shape), tuple(v.shape)) for k, v in expected.items() if k in stored and stored[k].shape != v.shape}
    if missing or unexpected or shapes:
        details = [f"missing {missing[:5]}" * bool(missing), f"unexpected {unexpected[:5]}" * bool(unexpected)]
        details += [f"{k}: file {a} vs config {b}" for k, (a, b) in list(shapes.items())[:5]]
        raise CheckpointError(
            f"{head_dir}: the weights in {WEIGHTS_FILE} do not fit the config in {CARD_FILE}: " + "; ".join(d for d in details if d)
        )
    module.load_state_dict(stored, strict=True)
    module.eval()


def _check_kind(card: HeadCard, kind: str, head_dir: Path) -> None:
    if card.kind != kind:
        raise CheckpointError(f"{head_dir} holds a {card.kind}, not a {kind}")


def load_classifier(head_dir: Path) -> tuple[Scout, HeadCard]:
    card = read_card(head_dir)
    _check_kind(card, "classifier", head_dir)
    module = Scout(config_from_dict(ClassifierConfig, card.config), card.input_dim, len(card.centroids))
    _load_weights(module, head_dir)
    return module, card


def load_regressor(head_dir: Path) -> tuple[Sniper, HeadCard]:
    card = read_card(head_dir)
    _check_kind(card, "regressor", head_dir)
    module = Sniper(config_from_dict(RegressorConfig, card.config), card.input_dim, len(card.centroids))
    _load_weights(module, head_dir)
    return module, card


def check_features(card: HeadCard, features: SplitFeatures, head_dir: Path) -> None:
    """Refuse features the head was not trained for, naming both fingerprints."""
    name = card.backbone
    if name not in features.features:
        raise CheckpointError(f"{head_dir} was trained on backbone {name!r}; these features have {sorted(features.features)}")
    have_dataset = features.dataset_fingerprint
    have_backbone = features.backbone_fingerprints.get(name, "")
    if (have_dataset, have_backbone) != (card.dataset_fingerprint, card.backbone_fingerprint):
        raise CheckpointError(
            f"{head_dir} was trained on dataset {card.dataset_fingerprint!r} with backbone {name!r} "
            f"{card.backbone_fingerprint!r}; these features are dataset {have_dataset!r}, backbone "
            f"{have_backbone!r}: retrain the head on these features"
        )
    if not np.array_equal(np.asarray(card.classes), features.classes):
        raise CheckpointError(f"{head_dir} predicts classes (state_idx) {card.classes}; these features have {features.classes.tolist()}")
    dim = features.features[name].shape[2]
    if dim != card.feature_dim:
        raise CheckpointError(f"{head_dir} expects {card.feature_dim}-d {name!r} embeddings; these are {dim}-d")
