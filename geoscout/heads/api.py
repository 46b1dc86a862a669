"""End-to-end head functions (what the CLI calls): train the heads, fit the ensemble, predict, evaluate.

Every function takes SplitFeatures and folders, works without a CLI and returns a small result.
All heads of one run share one validation split: each head records its digest, and mixing heads
validated on different rows is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..competition import NO_PREDICTION
from ..device import resolve_device
from ..errors import warn
from ..geo import spherical_mean
from ..metric import METRIC_KEYS
from ..store.features import SplitFeatures
from ..store.split import validation_digest
from .checkpoint import (
    CheckpointError,
    HeadCard,
    check_features,
    load_classifier,
    load_regressor,
    save_head,
    weights_sha256,
)
from .classifier import ClassifierObjective, classifier_outputs
from .decode import RETRIEVAL_WEIGHTS, DecodeConfig, decode
from .ensemble import EnsembleConfig, alpha_curve, best_alpha, combine_logits, fit_temperature, member_order
from .geocells import Geocells, make_geocells
from .models import ClassifierConfig, RegressorConfig, Scout, Sniper
from .presets import classifier_preset, config_from_dict, config_to_dict, ensemble_preset, regressor_preset
from .regressor import Anchors, RegressorObjective, regressed_points
from .retrieval import Neighbours, build_gallery, search
from .training import Prediction, Truth, fit, score, seeded, top5_from_logits
from .tta import check_tta, mirrored_views

ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_FORMAT = "geoscout-ensemble/2"  # 2: geocells, flip TTA, expected-distance decoding, retrieval
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
    flip_tta: str  # the flip TTA used ("none" when the store has no flipped features)
    retrieval_weight: float  # 0: no retrieval
    retrieval_curve: list[dict[str, float]]  # {"retrieval_weight", **metrics} over the tried weights


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
    logits: np.ndarray  # (N, K) cell logits; with flip TTA, the mean of the plain and the mirrored ones
    descriptors: np.ndarray  # of the plain views


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


def _run_classifier(
    head_dir: Path, features: SplitFeatures, device: torch.device, *, backbone: str | None = None, flip_tta: str = "none",
) -> _ClassifierRun:
    module, card = load_classifier(head_dir)
    if backbone is not None and card.backbone != backbone:
        raise CheckpointError(f"{head_dir} is a classifier for backbone {card.backbone!r}, given as {backbone!r}")
    check_features(card, features, head_dir)
    feats, masks = _backbone_arrays(features, card.backbone)
    module = module.to(device)
    logits, descriptors = classifier_outputs(module, feats, masks, batch_size=EVAL_BATCH, device=device)
    if flip_tta != "none":
        if card.backbone not in features.flipped:
            raise ValueError(f"flip TTA needs the mirrored views of {card.backbone!r}: extract the store with --flip")
        mirrored, mirrored_masks = mirrored_views(features.flipped[card.backbone], masks, flip_tta)
        logits = (logits + classifier_outputs(module, mirrored, mirrored_masks, batch_size=EVAL_BATCH, device=device)[0]) / 2
    return _ClassifierRun(card, weights_sha256(head_dir), logits, descriptors)


def _decode(
    logits: np.ndarray, geocells: Geocells, device: torch.device, config: DecodeConfig | None = None, *,
    regressor: Sniper | None = None, descriptors: np.ndarray | None = None, neighbours: Neighbours | None = None,
    retrieval_weight: float = 0.0,
) -> Prediction:
    """decode.decode with each candidate cell's position from the regressor (fed that cell and its
    probability) when there is one, else its centroid. Default config: the top-1 point."""

    def points(cells: np.ndarray, confidence: np.ndarray) -> np.ndarray:
        return regressed_points(regressor.to(device), descriptors, geocells.centroids, cells, confidence,
                                batch_size=EVAL_BATCH, device=device)

    return decode(logits, geocells, config or DecodeConfig(), points=None if regressor is None else points,
                  neighbours=neighbours, retrieval_weight=retrieval_weight)


def _shared_geocells(runs: dict[str, _ClassifierRun]) -> Geocells:
    """The members of an ensemble must classify the same cells, or their logits cannot be added."""
    cells = {b: run.card.geocells() for b, run in runs.items()}
    first, *rest = cells
    for b in rest:
        if cells[b] != cells[first]:
            raise CheckpointError(
                f"the classifiers of {first!r} ({len(cells[first])} geocells) and {b!r} ({len(cells[b])}) predict "
                "different geocells: train both with the same geocells settings"
            )
    return cells[first]


def _available_tta(mode: str, features: SplitFeatures, backbones: list[str]) -> str:
    check_tta(mode)
    missing = [b for b in backbones if b not in features.flipped]
    if mode != "none" and missing:
        warn(f"flip TTA {mode!r} is left out: the store has no mirrored views of {missing} (extract with --flip)")
        return "none"
    return mode


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
    geocells = make_geocells(train.class_id[train_rows], train.latlon[train_rows], len(train.classes),
                             cells=config.geocells, min_rows=config.min_cell_rows)
    dev = resolve_device(device)
    objective = ClassifierObjective(
        feats, masks, geocells.assign(train.class_id, train.latlon), train.latlon, geocells,
        label_smoothing=config.label_smoothing, haversine_tau_km=config.haversine_tau_km,
        haversine_within_state=config.haversine_within_state,
    )
    with seeded(seed):
        module = Scout(config, feats.shape[2], len(geocells))
        result = fit(
            module, objective, train_rows=train_rows, val_rows=val_rows,
            val_truth=Truth(train.class_id[val_rows], train.latlon[val_rows]), config=config.train, seed=seed,
            device=dev, desc=f"classifier {backbone}", progress=progress,
        )
    card = HeadCard(
        kind="classifier", backbone=backbone, config=config_to_dict(config), classes=train.classes.tolist(),
        centroids=geocells.centroids.tolist(), cell_class=geocells.cell_class.tolist(),
        dataset_fingerprint=train.dataset_fingerprint,
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
    """Train a Sniper on a frozen classifier's outputs: the offset from a cell's centroid (the classifier's
    anchor cell, or with anchor "true" the location's own cell while training)."""
    _require_labelled(train)
    config = config or regressor_preset(preset)
    train_rows, val_rows = _split_rows(val_mask, len(train))
    dev = resolve_device(device)
    run = _run_classifier(Path(classifier_dir), train, dev)
    _check_validation(run.card.validation_digest, validation_digest(train.sample_id[val_rows]), Path(classifier_dir))
    geocells = run.card.geocells()
    logits = torch.from_numpy(run.logits)
    anchors = Anchors(*geocells.anchor_cells(logits))
    train_anchors = anchors
    if config.anchor == "true":
        true_cell = geocells.assign(train.class_id, train.latlon)
        probability = torch.softmax(logits.float(), dim=1)[torch.arange(len(true_cell)), torch.from_numpy(true_cell)]
        train_anchors = Anchors(true_cell, probability.numpy())
    top5 = top5_from_logits(geocells.class_logits(logits))
    truth = Truth(train.class_id[val_rows], train.latlon[val_rows])
    centroid_metrics = score(Prediction(top5[val_rows], *geocells.centroids[anchors.cell[val_rows]].T), truth)
    objective = RegressorObjective(run.descriptors, anchors, top5, geocells.centroids, train.latlon, train_anchors=train_anchors)
    with seeded(seed):
        module = Sniper(config, run.descriptors.shape[1], len(geocells))
        result = fit(
            module, objective, train_rows=train_rows, val_rows=val_rows, val_truth=truth, config=config.train,
            seed=seed, device=dev, desc=f"regressor {run.card.backbone}", progress=progress,
        )
    gain = 1.0 - result.best_metrics["mean_km"] / centroid_metrics["mean_km"]
    if gain <= 0:
        warn(f"the regressor did not beat the predicted class's centroid on validation "
             f"({result.best_metrics['mean_km']:.1f} km vs {centroid_metrics['mean_km']:.1f} km)")
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
    """Choose alpha (and per-model temperatures), then the retrieval weight, on validation; write
    ensemble.json with the curves.

    Decoding follows `config.decode` (decode.py): candidate cells with the regressor's offsets (fed
    each cell and its probability) or their centroids, retrieved neighbours from the training rows
    outside validation, and their geometric median. Flip TTA averages each member's logits over the
    plain and the mirrored views where the store has them.
    """
    _require_labelled(train)
    config = config or ensemble_preset(preset)
    train_rows, val_rows = _split_rows(val_mask, len(train))
    val = train.subset(val_rows)
    digest = validation_digest(val.sample_id)
    dev = resolve_device(device)
    order = member_order(list(classifier_dirs), config.first_member)
    flip_tta = _available_tta(config.flip_tta, val, order)
    runs = {b: _run_classifier(Path(classifier_dirs[b]), val, dev, backbone=b, flip_tta=flip_tta) for b in order}
    for b in order:
        _check_validation(runs[b].card.validation_digest, digest, Path(classifier_dirs[b]))
    geocells = _shared_geocells(runs)
    temperatures = {b: fit_temperature(runs[b].logits, val.class_id, geocells) if config.temperature else 1.0 for b in order}
    regressor, regressor_backbone = (None, None) if regressor_dir is None else _regressor_for(Path(regressor_dir), runs, digest)
    descriptors = None if regressor_backbone is None else runs[regressor_backbone].descriptors
    neighbours = None
    if config.decode.retrieval_k:
        gallery = build_gallery(train, rows=train_rows, backbones=order, geocells=geocells)
        neighbours = search(gallery, val, k=config.decode.retrieval_k)
    truth = Truth(val.class_id, val.latlon)

    def score_logits(logits: np.ndarray, with_regressor: bool = True, retrieval_weight: float = 0.0) -> dict[str, float]:
        use = regressor if with_regressor else None
        return score(_decode(logits, geocells, dev, config.decode, regressor=use, descriptors=descriptors,
                             neighbours=neighbours, retrieval_weight=retrieval_weight), truth)

    # Alpha (and whether to keep the regressor) is chosen without retrieval, which is tuned after it.
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
    logits = combine_logits(runs[order[0]].logits, runs[order[1]].logits, alpha=alpha, temperatures=temps)
    retrieval_curve: list[dict[str, float]] = []
    if neighbours is not None:
        weights = RETRIEVAL_WEIGHTS if config.decode.retrieval_weight is None else (config.decode.retrieval_weight,)
        retrieval_curve = [{"retrieval_weight": w, **score_logits(logits, retrieval_weight=w)} for w in weights]
    # Ties go to the smaller weight: retrieval that does not win costs a search at prediction time for nothing.
    retrieval_weight = max(retrieval_curve, key=lambda r: (r["score"], -r["retrieval_weight"]))["retrieval_weight"] if retrieval_curve else 0.0
    metrics = score_logits(logits, retrieval_weight=retrieval_weight)
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
        "flip_tta": flip_tta,
        "retrieval_weight": retrieval_weight,
        "config": config_to_dict(config),
        "validation_digest": digest,
        "metrics": metrics,
        "alpha_curve": curve,
        "retrieval_curve": retrieval_curve,
    }
    (out_dir / ENSEMBLE_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return EnsembleResult(out_dir, order, alpha, temperatures, metrics, curve, flip_tta, retrieval_weight, retrieval_curve)


def _read_ensemble(ensemble_dir: Path) -> dict:
    path = Path(ensemble_dir) / ENSEMBLE_FILE
    if not path.is_file():
        raise CheckpointError(f"{ensemble_dir}: no {ENSEMBLE_FILE}; run fit_ensemble first")
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("format") != ENSEMBLE_FORMAT:
        raise CheckpointError(f"{path}: format {record.get('format')!r}; expected {ENSEMBLE_FORMAT!r}: fit the ensemble again")
    return record


def needs_gallery(ensemble_dir: Path | None) -> bool:
    """Whether `predict` from this ensemble (or from no ensemble: None) needs the training split as its gallery."""
    return ensemble_dir is not None and _read_ensemble(Path(ensemble_dir))["retrieval_weight"] > 0


def _predict_ensemble(features: SplitFeatures, ensemble_dir: Path, device: torch.device, gallery: SplitFeatures | None) -> Prediction:
    record = _read_ensemble(ensemble_dir)
    config = config_from_dict(EnsembleConfig, record["config"])
    runs, temps = {}, []
    for member in record["members"]:
        head_dir = Path(ensemble_dir) / member["dir"]
        runs[member["backbone"]] = _run_classifier(head_dir, features, device, backbone=member["backbone"], flip_tta=record["flip_tta"])
        if runs[member["backbone"]].sha256 != member["weights_sha256"]:
            raise CheckpointError(f"{head_dir} changed since the ensemble in {ensemble_dir} was fitted: fit it again")
        temps.append(member["temperature"])
    geocells = _shared_geocells(runs)
    regressor, descriptors = None, None
    if record["regressor"] is not None:
        regressor_dir = Path(ensemble_dir) / record["regressor"]["dir"]
        if weights_sha256(regressor_dir) != record["regressor"]["weights_sha256"]:
            raise CheckpointError(f"{regressor_dir} changed since the ensemble in {ensemble_dir} was fitted: fit it again")
        regressor, backbone = _regressor_for(regressor_dir, runs, None)
        descriptors = runs[backbone].descriptors
    a, b = (runs[m["backbone"]] for m in record["members"])
    neighbours = None
    if record["retrieval_weight"] > 0:
        if gallery is None:
            raise ValueError(f"the ensemble in {ensemble_dir} refines positions by retrieval: pass the training split as gallery")
        if gallery.dataset_fingerprint != a.card.dataset_fingerprint:
            raise CheckpointError(f"the gallery is dataset {gallery.dataset_fingerprint!r}; the ensemble was fitted on "
                                  f"{a.card.dataset_fingerprint!r}")
        built = build_gallery(gallery, rows=np.arange(len(gallery)), backbones=list(runs), geocells=geocells)
        neighbours = search(built, features, k=config.decode.retrieval_k)
    logits = combine_logits(a.logits, b.logits, alpha=record["alpha"], temperatures=(temps[0], temps[1]))
    return _decode(logits, geocells, device, config.decode, regressor=regressor, descriptors=descriptors,
                   neighbours=neighbours, retrieval_weight=record["retrieval_weight"])


def predict(
    features: SplitFeatures, *, ensemble_dir: Path | None = None, classifier_dir: Path | None = None,
    regressor_dir: Path | None = None, device: str = "cpu", gallery: SplitFeatures | None = None,
) -> Prediction:
    """(top-5 class ids, lat, lon) per row, from an ensemble folder or from one classifier (+ its regressor).

    Class ids index `features.classes` (map them to state_idx for a submission). An ensemble that
    refines positions by retrieval needs `gallery`: the labelled training split (see `needs_gallery`),
    never containing the rows predicted.
    """
    dev = resolve_device(device)
    if ensemble_dir is not None:
        if classifier_dir is not None or regressor_dir is not None:
            raise ValueError("give either ensemble_dir, or classifier_dir with an optional regressor_dir; not both")
        return _predict_ensemble(features, Path(ensemble_dir), dev, gallery)
    if classifier_dir is None:
        raise ValueError("predict needs ensemble_dir or classifier_dir")
    run = _run_classifier(Path(classifier_dir), features, dev)
    regressor = None
    if regressor_dir is not None:
        regressor, _ = _regressor_for(Path(regressor_dir), {run.card.backbone: run}, None)
    return _decode(run.logits, run.card.geocells(), dev, regressor=regressor, descriptors=run.descriptors)


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
        metrics[backbone] = score(_decode(run.logits, run.card.geocells(), dev), truth)
    if regressor_dir is not None:
        regressor, backbone = _regressor_for(Path(regressor_dir), runs, digest)
        run = runs[backbone]
        prediction = _decode(run.logits, run.card.geocells(), dev, regressor=regressor, descriptors=run.descriptors)
        metrics[f"{backbone}+regressor"] = score(prediction, truth)
    if ensemble_dir is not None:
        _check_validation(_read_ensemble(Path(ensemble_dir))["validation_digest"], digest, Path(ensemble_dir))
        gallery = train.subset(train_rows) if needs_gallery(ensemble_dir) else None
        metrics["ensemble"] = score(predict(val, ensemble_dir=ensemble_dir, device=device, gallery=gallery), truth)
    result = EvaluationResult(metrics)
    if print_table:
        print(result.table())
    return result
