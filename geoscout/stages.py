"""Store-level stages shared by the per-stage CLI commands and `geoscout run`.

Heads live under one folder, by preset:
  HEADS/{preset}/classifier-{backbone}/   HEADS/{preset}/regressor/   HEADS/{preset}/ensemble/
Every head of a store shares STORE_DIR/validation_split.json.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from .competition import TEST_CSV
from .errors import MissingFileError
from .heads.api import (
    EvaluationResult,
    evaluate,
    fit_ensemble,
    needs_gallery,
    predict,
    train_classifier,
    train_regressor,
)
from .heads.submission import class_ids_to_state_idx, to_submission_frame
from .store.features import SplitFeatures
from .store.layout import validation_split_path
from .store.reader import available_backbones, read_manifest, read_split
from .store.split import load_validation_split, make_validation_split, save_validation_split

DEFAULT_VAL_FRACTION = 0.1


@dataclass(frozen=True)
class HeadPaths:
    root: Path
    preset: str

    def classifier(self, backbone: str) -> Path:
        return Path(self.root) / self.preset / f"classifier-{backbone}"

    @property
    def regressor(self) -> Path:
        return Path(self.root) / self.preset / "regressor"

    @property
    def ensemble(self) -> Path:
        return Path(self.root) / self.preset / "ensemble"

    def trained_backbones(self) -> list[str]:
        folder = Path(self.root) / self.preset
        return sorted(p.name.removeprefix("classifier-") for p in folder.glob("classifier-*") if not p.name.endswith(".tmp"))


def regressor_backbone(backbones: list[str]) -> str:
    """The regressor reads the CLIP classifier (the seed's choice) when there is one, else the first."""
    clip = [b for b in backbones if "clip" in b.lower()]
    return clip[0] if clip else backbones[0]


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished folder into place; a kill before this leaves the old one or none, never half."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def fresh_tmp(final: Path) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def load_train(store_dir: Path, backbones: list[str] | None = None) -> SplitFeatures:
    return read_split(store_dir, "train", backbones or available_backbones(store_dir, "train"))


def validation_mask(store_dir: Path, train: SplitFeatures, *, fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0) -> np.ndarray:
    """The store's saved validation split, made (stratified by state, seeded) on first use."""
    path = validation_split_path(store_dir)
    if path.exists():
        return load_validation_split(path, train)
    mask = make_validation_split(train.class_id, fraction, seed)
    tmp = path.with_name(path.name + ".tmp")
    save_validation_split(tmp, features=train, mask=mask, fraction=fraction, seed=seed)
    os.replace(tmp, path)
    return mask


def train_classifier_stage(store_dir: Path, heads: HeadPaths, backbone: str, *, device: str, seed: int = 0,
                           progress: bool = True):
    train = load_train(store_dir, [backbone])
    mask = validation_mask(store_dir, train)
    final = heads.classifier(backbone)
    tmp = fresh_tmp(final)
    result = train_classifier(train, backbone=backbone, val_mask=mask, out_dir=tmp, preset=heads.preset,
                              device=device, seed=seed, progress=progress)
    replace_dir(tmp, final)
    result.out_dir = final
    return result


def train_regressor_stage(store_dir: Path, heads: HeadPaths, backbone: str, *, device: str, seed: int = 0,
                          progress: bool = True):
    train = load_train(store_dir, [backbone])
    mask = validation_mask(store_dir, train)
    final = heads.regressor
    tmp = fresh_tmp(final)
    result = train_regressor(train, classifier_dir=heads.classifier(backbone), val_mask=mask, out_dir=tmp,
                             preset=heads.preset, device=device, seed=seed, progress=progress)
    replace_dir(tmp, final)
    result.out_dir = final
    return result


def fit_ensemble_stage(store_dir: Path, heads: HeadPaths, backbones: list[str], *, device: str):
    train = load_train(store_dir, backbones)
    mask = validation_mask(store_dir, train)
    final = heads.ensemble
    tmp = fresh_tmp(final)
    regressor = heads.regressor if heads.regressor.exists() else None
    result = fit_ensemble(train, classifier_dirs={b: heads.classifier(b) for b in backbones}, val_mask=mask,
                          out_dir=tmp, regressor_dir=regressor, preset=heads.preset, device=device)
    replace_dir(tmp, final)
    result.out_dir = final
    return result


def _prediction_source(heads: HeadPaths, backbones: list[str]) -> dict:
    if heads.ensemble.exists():
        return {"ensemble_dir": heads.ensemble}
    backbone = regressor_backbone(backbones)
    return {"classifier_dir": heads.classifier(backbone),
            "regressor_dir": heads.regressor if heads.regressor.exists() else None}


def evaluate_stage(store_dir: Path, heads: HeadPaths, *, device: str) -> EvaluationResult:
    backbones = heads.trained_backbones()
    if not backbones:
        raise MissingFileError(f"no classifiers under {Path(heads.root) / heads.preset}; run `geoscout train` first")
    train = load_train(store_dir, backbones)
    return evaluate(
        train, val_mask=validation_mask(store_dir, train), classifier_dirs={b: heads.classifier(b) for b in backbones},
        regressor_dir=heads.regressor if heads.regressor.exists() else None,
        ensemble_dir=heads.ensemble if heads.ensemble.exists() else None, device=device, print_table=False,
    )


def validation_predictions(store_dir: Path, heads: HeadPaths, *, device: str) -> pl.DataFrame:
    """The final model on the validation rows, one row per location (what the report plots)."""
    from .geo import haversine_km

    backbones = heads.trained_backbones()
    train = load_train(store_dir, backbones)
    mask = validation_mask(store_dir, train)
    val = train.subset(np.flatnonzero(mask))
    source = _prediction_source(heads, backbones)
    gallery = train.subset(np.flatnonzero(~mask)) if needs_gallery(source.get("ensemble_dir")) else None
    pred = predict(val, **source, device=device, gallery=gallery)
    top5 = class_ids_to_state_idx(pred.top5, val.classes)
    columns = {
        "sample_id": val.sample_id,
        "true_state_idx": val.classes[val.class_id],
        "true_latitude": val.latlon[:, 0],
        "true_longitude": val.latlon[:, 1],
        **{f"pred_state_idx_{k + 1}": top5[:, k] for k in range(5)},
        "pred_latitude": np.asarray(pred.lat),
        "pred_longitude": np.asarray(pred.lon),
        "km": haversine_km(val.latlon[:, 0], val.latlon[:, 1], pred.lat, pred.lon),
    }
    return pl.DataFrame(columns)


def predict_stage(store_dir: Path, heads: HeadPaths, out: Path, *, device: str, template: Path | None = None) -> pl.DataFrame:
    """Write the submission for the test split, filled into sample_submission.csv (the data folder's by default)."""
    backbones = heads.trained_backbones()
    if not backbones:
        raise MissingFileError(f"no classifiers under {Path(heads.root) / heads.preset}; run `geoscout train` first")
    test = read_split(store_dir, "test", backbones)
    source = _prediction_source(heads, backbones)
    gallery = load_train(store_dir, backbones) if needs_gallery(source.get("ensemble_dir")) else None
    pred = predict(test, **source, device=device, gallery=gallery)
    top5 = class_ids_to_state_idx(pred.top5, test.classes)
    template_path = Path(template) if template else Path(read_manifest(store_dir)["data_dir"]) / TEST_CSV
    if not template_path.exists():
        raise MissingFileError(f"{template_path} not found: pass the competition's {TEST_CSV} as the template")
    template = pl.read_csv(template_path, infer_schema=False)
    frame = to_submission_frame(test.sample_id, top5, pred.lat, pred.lon, template)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    frame.write_csv(tmp, float_precision=6)
    os.replace(tmp, out)
    return frame
