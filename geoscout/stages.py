"""Store-level stages shared by the per-stage CLI commands and `geoscout run`.

Heads live under one folder, by preset:
  HEADS/{preset}/{member}/     one folder per ensemble member (classifier-BACKBONE, probe-B1+B2, ...)
  HEADS/{preset}/ensemble/     ensemble.json, regressor/, retrieval.npz
Every head of a store shares STORE_DIR/validation_split.json and, per preset, the same folds.
A `StoreData` loads each split once and hands it to every stage of a run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from .competition import TEST_CSV, TEST_TRUTH_CSV
from .errors import ConfigError, MissingFileError
from .geo import haversine_km
from .heads.api import EvaluationResult, ensemble_outputs, evaluate, fit_ensemble, make_protocol, train_members
from .heads.members import MemberResult, Protocol
from .heads.presets import Recipe
from .heads.submission import class_ids_to_state_idx, to_submission_frame
from .metric import read_truth
from .store.features import SplitFeatures
from .store.layout import validation_split_path
from .store.reader import available_backbones, read_manifest, read_split
from .store.split import load_validation_split, make_validation_split, save_validation_split

DEFAULT_VAL_FRACTION = 0.1


@dataclass(frozen=True)
class HeadPaths:
    root: Path
    preset: str

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.preset

    def member(self, name: str) -> Path:
        return self.folder / name

    @property
    def ensemble(self) -> Path:
        return self.folder / "ensemble"

    def trained_members(self) -> list[str]:
        """Member folders that hold a finished head (a kill leaves only NAME.tmp behind)."""
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir()
                      if p.is_dir() and p.name.startswith(("classifier-", "probe-")) and (p / "head.json").is_file())


@dataclass
class StoreData:
    """The splits of one store, each read once and shared by every stage that needs it."""

    store_dir: Path
    backbones: list[str] | None = None  # None: every backbone the store has
    _splits: dict[tuple[str, tuple[str, ...]], SplitFeatures] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.store_dir = Path(self.store_dir)
        if self.backbones is None:
            self.backbones = available_backbones(self.store_dir, "train")
            if not self.backbones:
                raise MissingFileError(f"{self.store_dir} holds no training features; run `geoscout extract` first")

    def split(self, name: str, datasets: tuple[str, ...] = ("features",)) -> SplitFeatures:
        """A split's features of the chosen store datasets (read once per split and datasets)."""
        key = (name, tuple(datasets))
        if key not in self._splits:
            self._splits[key] = read_split(self.store_dir, name, self.backbones, datasets=tuple(datasets))
        return self._splits[key]

    def source(self, name: str):
        """The split as a feature source: heads ask it for the datasets they read."""
        return lambda datasets: self.split(name, datasets)

    @property
    def train(self) -> SplitFeatures:
        return self.split("train")

    def validation_mask(self, *, fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0) -> np.ndarray:
        """The store's saved validation split, made (stratified by state, seeded) on first use."""
        path = validation_split_path(self.store_dir)
        if path.exists():
            return load_validation_split(path, self.train)
        mask = make_validation_split(self.train.class_id, fraction, seed)
        save_validation_split(path, features=self.train, mask=mask, fraction=fraction, seed=seed)
        return mask

    def protocol(self, folds: int, seed: int = 0) -> Protocol:
        return make_protocol(self.train, self.validation_mask(), folds=folds, seed=seed)

    def test_truth(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(class ids, latlon) of the test rows in store order, from test_ground_truth.csv when the data
        folder has one (synthetic data); None otherwise (the competition keeps its test truth)."""
        path = Path(read_manifest(self.store_dir)["data_dir"]) / TEST_TRUTH_CSV
        if not path.exists():
            return None
        truth = read_truth(path)
        test = self.split("test")
        row = {int(s): i for i, s in enumerate(truth.sample_id)}
        missing = [int(s) for s in test.sample_id if int(s) not in row]
        if missing:
            raise ConfigError(f"{path} lacks test sample_id(s) {missing[:5]}")
        order = np.array([row[int(s)] for s in test.sample_id])
        class_of = {int(s): c for c, s in enumerate(test.classes)}
        class_id = np.array([class_of.get(int(s), -1) for s in truth.state_idx[order]])
        return class_id, np.stack([truth.latitude[order], truth.longitude[order]], axis=1)


def train_members_stage(data: StoreData, heads: HeadPaths, recipe: Recipe, *, names: list[str] | None = None,
                        device: str, seed: int = 0, progress: bool = True) -> list[MemberResult]:
    """Cross-fit the recipe's members (or only those named) into HEADS/PRESET/NAME/."""
    specs = [m for m in recipe.members if names is None or m.name in names]
    if names is not None:
        unknown = sorted(set(names) - {m.name for m in recipe.members})
        if unknown:
            raise ConfigError(f"no member {unknown} in preset {recipe.name!r}; its members: {[m.name for m in recipe.members]}")
    protocol = data.protocol(recipe.folds, seed)
    return train_members(data.source("train"), specs, protocol, {m.name: heads.member(m.name) for m in specs},
                         device=device, seed=seed, progress=progress)


def fit_ensemble_stage(data: StoreData, heads: HeadPaths, recipe: Recipe, *, members: list[str] | None = None,
                       device: str, seed: int = 0, progress: bool = True):
    """The ensemble of the given trained members (default: every member of the recipe that is trained)."""
    names = members or [m.name for m in recipe.members if m.name in heads.trained_members()]
    if not names:
        raise MissingFileError(f"no trained members under {heads.folder}; run `geoscout train` first")
    missing = [n for n in names if n not in heads.trained_members()]
    if missing:
        raise MissingFileError(f"member(s) {missing} are not trained under {heads.folder}; run `geoscout train` first")
    return fit_ensemble(data.train, member_dirs=[heads.member(n) for n in names], protocol=data.protocol(recipe.folds, seed),
                        out_dir=heads.ensemble, config=recipe.ensemble, regressor_config=recipe.regressor, device=device,
                        seed=seed, progress=progress)


def _require_ensemble(heads: HeadPaths) -> None:
    if not (heads.ensemble / "ensemble.json").is_file():
        raise MissingFileError(f"no ensemble under {heads.folder}; run `geoscout train` and `geoscout ensemble` first")


def evaluate_stage(data: StoreData, heads: HeadPaths, recipe: Recipe, *, device: str, seed: int = 0,
                   split: str = "validation") -> EvaluationResult:
    """Every head and the ensemble on the validation rows, or ("test") on the test split where its truth is known."""
    _require_ensemble(heads)
    protocol = data.protocol(recipe.folds, seed)
    if split == "validation":
        return evaluate(data.source("train"), protocol, ensemble_dir=heads.ensemble, device=device)
    truth = data.test_truth()
    if truth is None:
        raise MissingFileError(f"the data folder has no {TEST_TRUTH_CSV}: test scores need the test truth")
    return evaluate(data.source("train"), protocol, ensemble_dir=heads.ensemble, device=device,
                    truth=(data.source("test"), *truth))


def validation_predictions(data: StoreData, heads: HeadPaths, recipe: Recipe, *, device: str, seed: int = 0) -> pl.DataFrame:
    """The ensemble on the validation rows, one row per location (what the report plots)."""
    _require_ensemble(heads)
    protocol = data.protocol(recipe.folds, seed)
    val = data.train.subset(protocol.val_rows)
    rows = protocol.val_rows
    pred = ensemble_outputs(lambda datasets: data.split("train", datasets).subset(rows), heads.ensemble, device=device,
                            gallery=data.train, fit_rows=protocol.folds.fit_rows).prediction
    top5 = class_ids_to_state_idx(pred.top5, val.classes)
    return pl.DataFrame({
        "sample_id": val.sample_id,
        "true_state_idx": val.classes[val.class_id],
        "true_latitude": val.latlon[:, 0],
        "true_longitude": val.latlon[:, 1],
        **{f"pred_state_idx_{k + 1}": top5[:, k] for k in range(5)},
        "pred_latitude": np.asarray(pred.lat),
        "pred_longitude": np.asarray(pred.lon),
        "km": haversine_km(val.latlon[:, 0], val.latlon[:, 1], pred.lat, pred.lon),
    })


def predict_stage(data: StoreData, heads: HeadPaths, recipe: Recipe, out: Path, *, device: str, seed: int = 0,
                  template: Path | None = None) -> pl.DataFrame:
    """Write the submission for the test split, filled into sample_submission.csv (the data folder's by default)."""
    _require_ensemble(heads)
    protocol = data.protocol(recipe.folds, seed)
    test = data.split("test")
    pred = ensemble_outputs(data.source("test"), heads.ensemble, device=device, gallery=data.train,
                            fit_rows=protocol.folds.fit_rows).prediction
    top5 = class_ids_to_state_idx(pred.top5, test.classes)
    template_path = Path(template) if template else Path(read_manifest(data.store_dir)["data_dir"]) / TEST_CSV
    if not template_path.exists():
        raise MissingFileError(f"{template_path} not found: pass the competition's {TEST_CSV} as the template")
    frame = to_submission_frame(test.sample_id, top5, pred.lat, pred.lon, pl.read_csv(template_path, infer_schema=False))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    frame.write_csv(tmp, float_precision=6)
    os.replace(tmp, out)
    return frame
