"""End-to-end head functions (what the CLI calls): train the heads, fit the ensemble, predict, evaluate.

Every function takes SplitFeatures and folders, works without a CLI and returns a small result.
All heads of one run share one validation split: each head records its digest, and mixing heads
validated on different rows is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..geo import spherical_mean
from ..metric import METRIC_KEYS, NO_PREDICTION
from ..store.features import SplitFeatures
from .checkpoint import (
    CheckpointError, HeadCard, check_features, load_classifier, load_regressor, save_head, weights_sha256,
)
from .classifier import ClassifierObjective, class_centroids, classifier_outputs
from .ensemble import EnsembleConfig, alpha_curve, best_alpha, combine_logits, fit_temperature, member_order
from .models import ClassifierConfig, RegressorConfig, Scout, Sniper
from .presets import classifier_preset, config_to_dict, ensemble_preset, regressor_preset
from .regressor import RegressorObjective, softmax_top1
from .split import validation_digest
from .training import Prediction, Truth, fit, predict_rows, resolve_device, score, seeded, top5_from_logits

ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_FORMAT = "geoscout-ensemble/1"
EVAL_BATCH = 4096


@dataclass
class ClassifierResult:
    out_dir: Path
    backbone: str
    metrics: dict[str, float]  # validation METRIC_KEYS of the kept weights (top-5 + predicted class centroid)
    best_epoch: int
    epochs_run: int
    seconds: float


@dataclass
class RegressorResult:
    out_dir: Path
    metrics: dict[str, float]  # validation: the classifier's top-5 + the regressor's coordinates
    centroid_metrics: dict[str, float]  # validation: the classifier's top-5 + its top-1 class centroid
    centroid_mean_km: float
    regressor_mean_km: float
    relative_gain: float  # 1 - regressor_mean_km / centroid_mean_km
    best_epoch: int
    epochs_run: int
    seconds: float


@dataclass
class EnsembleResult:
    out_dir: Path
    members: list[str]  # [A, B]: alpha weighs A
    alpha: float
    temperatures: dict[str, float]
    metrics: dict[str, float]  # validation, at the chosen alpha
    curve: list[dict[str, float]]  # {"alpha", **metrics} over the grid


@dataclass
class EvaluationResult:
    metrics: dict[str, dict[str, float]]  # row name -> METRIC_KEYS dict, on the validation rows

    def table(self) -> str:
        names = list(self.metrics)
        width = max(12, *(len(n) for n in names))
        lines = [f"{'metric':<20}" + "".join(f"{n:>{width + 2}}" for n in names)]
        for key in METRIC_KEYS:
            cells = "".join(f"{self.metrics[n][key]:>{width + 2}.4f}" for n in names)
            lines.append(f"{key:<20}{cells}")
        return "\n".join(lines)


@dataclass
class _ClassifierRun:
    """One classifier's outputs on some features."""

    card: HeadCard
    sha256: str
    logits: np.ndarray
    descriptors: np.ndarray


def _require_labelled(features: SplitFeatures) -> None:
    if not features.labelled:
        raise ValueError(f"split {features.split!r} has no labels; training and validation need the training split")


def _split_rows(val_mask: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    val_mask = np.asarray(val_mask)
    if val_mask.dtype != bool or val_mask.shape != (n,):
        raise ValueError(f"val_mask must be a bool array of shape ({n},); got {val_mask.dtype} {val_mask.shape}")
    train_rows, val_rows = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise ValueError(f"the split leaves {len(train_rows)} training and {len(val_rows)} validation rows; both need some")
    return train_rows, val_rows


def _backbone_arrays(features: SplitFeatures, backbone: str) -> tuple[np.ndarray, np.ndarray]:
    if backbone not in features.features:
        raise ValueError(f"no features for backbone {backbone!r}; available: {sorted(features.features)}")
    return features.features[backbone], features.masks[backbone]


def _check_validation(card_digest: str, digest: str, head_dir: Path) -> None:
    if card_digest != digest:
        raise CheckpointError(
            f"{head_dir} was validated on other rows (split {card_digest}) than these (split {digest}): "
            "train every head with the same validation split"
        )


def _run_classifier(head_dir: Path, features: SplitFeatures, device: torch.device, *, backbone: str | None = None) -> _ClassifierRun:
    module, card = load_classifier(head_dir)
    if backbone is not None and card.backbone != backbone:
        raise CheckpointError(f"{head_dir} is a classifier for backbone {card.backbone!r}, given as {backbone!r}")
    check_features(card, features, head_dir)
    feats, masks = _backbone_arrays(features, card.backbone)
    logits, descriptors = classifier_outputs(module.to(device), feats, masks, batch_size=EVAL_BATCH, device=device)
    return _ClassifierRun(card, weights_sha256(head_dir), logits, descriptors)


def _decode(
    logits: np.ndarray, centroids: np.ndarray, device: torch.device, *,
    regressor: Sniper | None = None, descriptors: np.ndarray | None = None,
) -> Prediction:
    """Top-5 from logits; coordinates from the regressor fed the top-1 class and confidence, else the centroid."""
    top5 = top5_from_logits(torch.from_numpy(logits))
    if regressor is None:
        latlon = centroids[top5[:, 0]]
        return Prediction(top5, latlon[:, 0], latlon[:, 1])
    top1, confidence = softmax_top1(logits)
    objective = RegressorObjective(descriptors, top1, confidence, top5, centroids, None)
    return predict_rows(regressor.to(device), objective, np.arange(len(logits)), batch_size=EVAL_BATCH, device=device)


def _regressor_for(regressor_dir: Path, runs: dict[str, _ClassifierRun], digest: str | None) -> tuple[Sniper, str]:
    """The regressor and the backbone of the classifier (among `runs`) whose outputs it reads.
    `digest`: the validation rows it must have been validated on (None when predicting)."""
    module, card = load_regressor(regressor_dir)
    if digest is not None:
        _check_validation(card.validation_digest, digest, regressor_dir)
    for backbone, run in runs.items():
        if run.sha256 == card.classifier_sha256:
            return module, backbone
    raise CheckpointError(f"{regressor_dir} reads a classifier that is not among the given ones ({sorted(runs)})")


def train_classifier(
    train: SplitFeatures, *, backbone: str, val_mask: np.ndarray, out_dir: Path, preset: str = "default",
    config: ClassifierConfig | None = None, device: str = "cpu", seed: int = 0, progress: bool = True,
) -> ClassifierResult:
    """Train a Scout on one backbone's features; keep the epoch with the best validation competition score."""
    _require_labelled(train)
    config = config or classifier_preset(preset, backbone=backbone)
    feats, masks = _backbone_arrays(train, backbone)
    train_rows, val_rows = _split_rows(val_mask, len(train))
    num_classes = len(train.classes)
    centroids = class_centroids(train.class_id[train_rows], train.latlon[train_rows], num_classes)
    dev = resolve_device(device)
    objective = ClassifierObjective(feats, masks, train.class_id, centroids, label_smoothing=config.label_smoothing)
    with seeded(seed):
        module = Scout(config, feats.shape[2], num_classes)
        result = fit(
            module, objective, train_rows=train_rows, val_rows=val_rows,
            val_truth=Truth(train.class_id[val_rows], train.latlon[val_rows]), config=config.train, seed=seed,
            device=dev, desc=f"classifier {backbone}", progress=progress,
        )
    card = HeadCard(
        kind="classifier", backbone=backbone, config=config_to_dict(config), classes=train.classes.tolist(),
        centroids=centroids.tolist(), dataset_fingerprint=train.dataset_fingerprint,
        backbone_fingerprint=train.backbone_fingerprints.get(backbone, ""), feature_dim=feats.shape[2],
        input_dim=feats.shape[2], validation_digest=validation_digest(train.sample_id[val_rows]),
        metrics={"validation": result.best_metrics, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                 "seconds": result.seconds, "seed": seed, "history": result.history},
    )
    save_head(out_dir, module, card)
    return ClassifierResult(Path(out_dir), backbone, result.best_metrics, result.best_epoch, result.epochs_run, result.seconds)


def train_regressor(
    train: SplitFeatures, *, classifier_dir: Path, val_mask: np.ndarray, out_dir: Path, preset: str = "default",
    config: RegressorConfig | None = None, device: str = "cpu", seed: int = 0, progress: bool = True,
) -> RegressorResult:
    """Train a Sniper on a frozen classifier's outputs: the offset from its top-1 class's centroid."""
    _require_labelled(train)
    config = config or regressor_preset(preset)
    train_rows, val_rows = _split_rows(val_mask, len(train))
    dev = resolve_device(device)
    run = _run_classifier(Path(classifier_dir), train, dev)
    _check_validation(run.card.validation_digest, validation_digest(train.sample_id[val_rows]), Path(classifier_dir))
    centroids = np.asarray(run.card.centroids)
    top1, confidence = softmax_top1(run.logits)
    top5 = top5_from_logits(torch.from_numpy(run.logits))
    truth = Truth(train.class_id[val_rows], train.latlon[val_rows])
    centroid_metrics = score(Prediction(top5[val_rows], *centroids[top1[val_rows]].T), truth)
    objective = RegressorObjective(run.descriptors, top1, confidence, top5, centroids, train.latlon)
    with seeded(seed):
        module = Sniper(config, run.descriptors.shape[1], len(train.classes))
        result = fit(
            module, objective, train_rows=train_rows, val_rows=val_rows, val_truth=truth, config=config.train,
            seed=seed, device=dev, desc=f"regressor {run.card.backbone}", progress=progress,
        )
    gain = 1.0 - result.best_metrics["mean_km"] / centroid_metrics["mean_km"]
    if gain <= 0:
        warnings.warn(
            f"the regressor did not beat the predicted class's centroid on validation "
            f"({result.best_metrics['mean_km']:.1f} km vs {centroid_metrics['mean_km']:.1f} km)", stacklevel=2,
        )
    card = dataclasses.replace(
        run.card, kind="regressor", config=config_to_dict(config), input_dim=run.descriptors.shape[1],
        classifier_sha256=run.sha256,
        metrics={"validation": result.best_metrics, "centroid_validation": centroid_metrics, "relative_gain": gain,
                 "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "seconds": result.seconds,
                 "seed": seed, "history": result.history},
    )
    save_head(out_dir, module, card)
    return RegressorResult(
        Path(out_dir), result.best_metrics, centroid_metrics, centroid_metrics["mean_km"],
        result.best_metrics["mean_km"], gain, result.best_epoch, result.epochs_run, result.seconds,
    )


def fit_ensemble(
    train: SplitFeatures, *, classifier_dirs: dict[str, Path], val_mask: np.ndarray, out_dir: Path,
    regressor_dir: Path | None = None, preset: str = "default", config: EnsembleConfig | None = None,
    device: str = "cpu",
) -> EnsembleResult:
    """Choose alpha (and per-model temperatures) on validation; write ensemble.json with the alpha curve.

    Coordinates: the regressor's offset applied to the ensemble's top-1 class (fed the ensemble's top-1
    class and confidence), or that class's centroid without a regressor.
    """
    _require_labelled(train)
    config = config or ensemble_preset(preset)
    _, val_rows = _split_rows(val_mask, len(train))
    val = train.subset(val_rows)
    digest = validation_digest(val.sample_id)
    dev = resolve_device(device)
    order = member_order(list(classifier_dirs), config.first_member)
    runs = {b: _run_classifier(Path(classifier_dirs[b]), val, dev, backbone=b) for b in order}
    for b in order:
        _check_validation(runs[b].card.validation_digest, digest, Path(classifier_dirs[b]))
    temperatures = {b: fit_temperature(runs[b].logits, val.class_id) if config.temperature else 1.0 for b in order}
    regressor, regressor_backbone = (None, None) if regressor_dir is None else _regressor_for(Path(regressor_dir), runs, digest)
    descriptors = None if regressor_backbone is None else runs[regressor_backbone].descriptors
    centroids = np.asarray(runs[order[0]].card.centroids)
    truth = Truth(val.class_id, val.latlon)

    def score_logits(logits: np.ndarray, with_regressor: bool = True) -> dict[str, float]:
        use = regressor if with_regressor else None
        return score(_decode(logits, centroids, dev, regressor=use, descriptors=descriptors), truth)

    temps = (temperatures[order[0]], temperatures[order[1]])
    curve = alpha_curve(runs[order[0]].logits, runs[order[1]].logits, temperatures=temps, steps=config.alpha_steps, score=score_logits)
    if regressor is not None and config.alpha is None:
        # The regressor reads one member's descriptors; when the mix leans on the other member its
        # offsets can hurt. Keep it only if it wins on validation, so the ensemble never scores
        # below its best member at that member's own centroids.
        plain = alpha_curve(runs[order[0]].logits, runs[order[1]].logits, temperatures=temps,
                            steps=config.alpha_steps, score=lambda x: score_logits(x, with_regressor=False))
        if max(r["score"] for r in plain) > max(r["score"] for r in curve):
            curve, regressor, regressor_dir, descriptors = plain, None, None, None
    alpha = best_alpha(curve) if config.alpha is None else config.alpha
    metrics = score_logits(combine_logits(runs[order[0]].logits, runs[order[1]].logits, alpha=alpha, temperatures=temps))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    regressor_entry = None
    if regressor_dir is not None:
        regressor_entry = {"dir": os.path.relpath(regressor_dir, out_dir), "weights_sha256": weights_sha256(Path(regressor_dir))}
    record = {
        "format": ENSEMBLE_FORMAT,
        # Paths relative to this folder, so a run folder can be moved as a whole.
        "members": [
            {"backbone": b, "dir": os.path.relpath(classifier_dirs[b], out_dir), "weights_sha256": runs[b].sha256,
             "temperature": temperatures[b]}
            for b in order
        ],
        "alpha": alpha,
        "regressor": regressor_entry,
        "config": config_to_dict(config),
        "validation_digest": digest,
        "metrics": metrics,
        "alpha_curve": curve,
    }
    (out_dir / ENSEMBLE_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return EnsembleResult(out_dir, order, alpha, temperatures, metrics, curve)


def _read_ensemble(ensemble_dir: Path) -> dict:
    path = Path(ensemble_dir) / ENSEMBLE_FILE
    if not path.is_file():
        raise CheckpointError(f"{ensemble_dir}: no {ENSEMBLE_FILE}; run fit_ensemble first")
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("format") != ENSEMBLE_FORMAT:
        raise CheckpointError(f"{path}: format {record.get('format')!r}; expected {ENSEMBLE_FORMAT!r}")
    return record


def _predict_ensemble(features: SplitFeatures, ensemble_dir: Path, device: torch.device) -> Prediction:
    record = _read_ensemble(ensemble_dir)
    runs, temps = {}, []
    for member in record["members"]:
        head_dir = Path(ensemble_dir) / member["dir"]
        runs[member["backbone"]] = _run_classifier(head_dir, features, device, backbone=member["backbone"])
        if runs[member["backbone"]].sha256 != member["weights_sha256"]:
            raise CheckpointError(f"{head_dir} changed since the ensemble in {ensemble_dir} was fitted: fit it again")
        temps.append(member["temperature"])
    regressor, descriptors = None, None
    if record["regressor"] is not None:
        regressor_dir = Path(ensemble_dir) / record["regressor"]["dir"]
        if weights_sha256(regressor_dir) != record["regressor"]["weights_sha256"]:
            raise CheckpointError(f"{regressor_dir} changed since the ensemble in {ensemble_dir} was fitted: fit it again")
        regressor, backbone = _regressor_for(regressor_dir, runs, None)
        descriptors = runs[backbone].descriptors
    a, b = (runs[m["backbone"]] for m in record["members"])
    logits = combine_logits(a.logits, b.logits, alpha=record["alpha"], temperatures=(temps[0], temps[1]))
    return _decode(logits, np.asarray(a.card.centroids), device, regressor=regressor, descriptors=descriptors)


def predict(
    features: SplitFeatures, *, ensemble_dir: Path | None = None, classifier_dir: Path | None = None,
    regressor_dir: Path | None = None, device: str = "cpu",
) -> Prediction:
    """(top-5 class ids, lat, lon) per row, from an ensemble folder or from one classifier (+ its regressor).

    Class ids index `features.classes` (map them to state_idx for a submission).
    """
    dev = resolve_device(device)
    if ensemble_dir is not None:
        if classifier_dir is not None or regressor_dir is not None:
            raise ValueError("give either ensemble_dir, or classifier_dir with an optional regressor_dir; not both")
        return _predict_ensemble(features, Path(ensemble_dir), dev)
    if classifier_dir is None:
        raise ValueError("predict needs ensemble_dir or classifier_dir")
    run = _run_classifier(Path(classifier_dir), features, dev)
    regressor = None
    if regressor_dir is not None:
        regressor, _ = _regressor_for(Path(regressor_dir), {run.card.backbone: run}, None)
    return _decode(run.logits, np.asarray(run.card.centroids), dev, regressor=regressor, descriptors=run.descriptors)


def _baseline(train: SplitFeatures, train_rows: np.ndarray, n: int) -> Prediction:
    """The trivial answer: the training set's most frequent classes, at the most frequent class's centroid."""
    counts = np.bincount(train.class_id[train_rows], minlength=len(train.classes))
    order = np.argsort(-counts, kind="stable")[:5]
    top5 = np.full((n, 5), NO_PREDICTION, dtype=np.int64)
    top5[:, : len(order)] = order
    rows = train_rows[train.class_id[train_rows] == order[0]]
    lat, lon = spherical_mean(train.latlon[rows, 0], train.latlon[rows, 1])
    return Prediction(top5, np.full(n, lat), np.full(n, lon))


def evaluate(
    train: SplitFeatures, *, val_mask: np.ndarray, classifier_dirs: dict[str, Path], regressor_dir: Path | None = None,
    ensemble_dir: Path | None = None, device: str = "cpu", print_table: bool = True,
) -> EvaluationResult:
    """Every METRIC_KEYS value on the validation rows: the trivial baseline, each classifier (centroid
    coordinates), the regressor on its classifier, and the ensemble."""
    _require_labelled(train)
    train_rows, val_rows = _split_rows(val_mask, len(train))
    val = train.subset(val_rows)
    digest = validation_digest(val.sample_id)
    dev = resolve_device(device)
    truth = Truth(val.class_id, val.latlon)
    metrics = {"baseline": score(_baseline(train, train_rows, len(val_rows)), truth)}
    runs = {b: _run_classifier(Path(d), val, dev, backbone=b) for b, d in classifier_dirs.items()}
    for backbone, run in runs.items():
        _check_validation(run.card.validation_digest, digest, Path(classifier_dirs[backbone]))
        metrics[backbone] = score(_decode(run.logits, np.asarray(run.card.centroids), dev), truth)
    if regressor_dir is not None:
        regressor, backbone = _regressor_for(Path(regressor_dir), runs, digest)
        run = runs[backbone]
        prediction = _decode(run.logits, np.asarray(run.card.centroids), dev, regressor=regressor, descriptors=run.descriptors)
        metrics[f"{backbone}+regressor"] = score(prediction, truth)
    if ensemble_dir is not None:
        _check_validation(_read_ensemble(Path(ensemble_dir))["validation_digest"], digest, Path(ensemble_dir))
        metrics["ensemble"] = score(predict(val, ensemble_dir=ensemble_dir, device=device), truth)
    result = EvaluationResult(metrics)
    if print_table:
        print(result.table())
    return result
