"""Ensemble members: classifiers (Scouts: views -> geocells) and probes (view mean -> states), cross-fitted.

A member trains one model per fold (folds.py) and keeps each fit row's out-of-fold output, which is
what the ensemble and the regressor are fitted on. On any other rows (validation, test) a member's
output is the mean of its K fold models' logits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..metric import score_predictions
from ..store.features import SplitFeatures
from ..store.layout import store_key
from .checkpoint import CheckpointError, HeadCard, check_features, load_weights, read_card, read_oof, save_head
from .classifier import ClassifierObjective, ProbeObjective, probe_logits, scout_logits
from .configio import config_from_dict, config_to_dict
from .folds import Folds
from .geocells import Geocells, make_geocells
from .inputs import FeatureSource, Views, flipped_views_of, row_statistics, view_statistics, views_of, with_inputs
from .models import ClassifierConfig, Probe, ProbeConfig, Scout
from .training import fit, seeded, top5_from_logits
from .tta import TTA_MODES, mirrored_views

EVAL_BATCH = 4096
MEMBER_KINDS = ("classifier", "probe")


@dataclass(frozen=True)
class MemberSpec:
    """What to train: a kind, the backbones whose features it reads (side by side), and its config."""

    kind: str  # "classifier" | "probe"
    backbones: tuple[str, ...]
    config: ClassifierConfig | ProbeConfig
    label: str = ""  # tells apart two members of one kind on the same backbones (e.g. "concat")

    def __post_init__(self) -> None:
        if self.kind not in MEMBER_KINDS:
            raise ConfigError(f"unknown member kind {self.kind!r}; available: {list(MEMBER_KINDS)}")
        if not self.backbones:
            raise ConfigError("a member reads at least one backbone")

    @property
    def name(self) -> str:
        return f"{self.kind}-{'+'.join(store_key(b) for b in self.backbones)}" + (f"-{self.label}" if self.label else "")


@dataclass(frozen=True)
class Protocol:
    """The rows of one run: validation rows held out from everything, and the folds of the rest."""

    folds: Folds
    val_rows: np.ndarray
    validation_digest: str


@dataclass
class MemberResult:
    name: str
    out_dir: Path
    oof: dict[str, float]  # OOF metrics: the competition's, plus "nll"
    seconds: float
    details: dict  # per fold: best step, steps run; for a probe, the OOF NLL of every l2 tried


def member_metrics(cell_logits: np.ndarray, geocells: Geocells, class_id: np.ndarray, latlon: np.ndarray) -> dict[str, float]:
    """The competition metrics with the anchor cell's centroid as the position, plus the state NLL."""
    z = torch.as_tensor(cell_logits, dtype=torch.float64)
    cell, _ = geocells.anchor_cells(z)
    top5 = top5_from_logits(geocells.class_logits(z))
    point = geocells.centroids[cell]
    metrics = score_predictions(class_id, latlon[:, 0], latlon[:, 1], top5, point[:, 0], point[:, 1])
    metrics["nll"] = float(F.cross_entropy(geocells.class_logits(z), torch.as_tensor(class_id)).item())
    return metrics


def _cross_fit(build: Callable[[], nn.Module], objective, folds: Folds, outputs: Callable[[nn.Module, np.ndarray], np.ndarray],
               config, *, seed: int, device: torch.device, desc: str, progress: bool) -> tuple[list[nn.Module], np.ndarray, list[dict]]:
    """One model per fold, each early-stopped on its held-out fold; returns them, the OOF outputs (in
    `folds.fit_rows` order) and per-fold details."""
    models, parts, details = [], {}, []
    for k in range(folds.k):
        with seeded(seed * 1009 + k):
            module = build()
            result = fit(module, objective, train_rows=folds.train_rows(k), heldout_rows=folds.heldout_rows(k),
                         config=config, seed=seed * 1009 + k, device=device, desc=f"{desc} fold {k + 1}/{folds.k}",
                         progress=progress)
        models.append(module.cpu())
        parts[k] = outputs(module.to(device), folds.heldout_rows(k))
        module.cpu()
        details.append({"fold": k, "best_step": result.best_step, "steps_run": result.steps_run, "budget": result.budget,
                        "heldout_loss": result.best_loss, "seconds": result.seconds})
    oof = np.zeros((len(folds.fit_rows), parts[0].shape[1]), dtype=np.float32)
    for k, part in parts.items():
        oof[folds.fold == k] = part
    return models, oof, details


def _outputs(kind: str, views: Views, *, device: torch.device) -> Callable[[nn.Module, np.ndarray], np.ndarray]:
    """(module, rows) -> the module's logits for those rows of `views`, in eval mode."""
    if kind == "classifier":
        return lambda m, rows: scout_logits(m, views, rows, batch_size=EVAL_BATCH, device=device)
    means = views.means
    return lambda m, rows: probe_logits(m, means, rows, batch_size=EVAL_BATCH, device=device)


def _mirrored(split: SplitFeatures, backbones: tuple[str, ...] | list[str], mode: str) -> Views | None:
    """The mirrored views of a store extracted with --flip, moved to their mirrored slots (tta.py)."""
    flipped = flipped_views_of(split, backbones)
    if flipped is None:
        return None
    mirrored = [mirrored_views(part, flipped.mask, mode) for part in flipped.parts]
    return Views(tuple(features for features, _ in mirrored), mirrored[0][1])


def _card(spec: MemberSpec, train: SplitFeatures, protocol: Protocol, geocells: Geocells, input_dim: int,
          metrics: dict) -> HeadCard:
    return HeadCard(
        kind=spec.kind, name=spec.name, backbones=list(spec.backbones), config=config_to_dict(spec.config),
        classes=train.classes.tolist(), centroids=geocells.centroids.tolist(), cell_class=geocells.cell_class.tolist(),
        dataset_fingerprint=train.dataset_fingerprint,
        backbone_fingerprints={b: train.backbone_fingerprints.get(b, "") for b in spec.backbones},
        input_dim=input_dim, validation_digest=protocol.validation_digest, folds_digest=protocol.folds.digest,
        folds=protocol.folds.k, metrics=metrics,
    )


def train_member(source: FeatureSource, spec: MemberSpec, protocol: Protocol, out_dir: Path, *, device: torch.device,
                 seed: int = 0, progress: bool = True) -> MemberResult:
    """Cross-fit one member on the fit rows and write its folder (into an existing, fresh `out_dir`)."""
    train = with_inputs(source, spec.config.inputs)
    if not train.labelled:
        raise ConfigError(f"split {train.split!r} has no labels; members train on the training split")
    started = time.perf_counter()
    folds = protocol.folds
    fit_class, fit_latlon = train.class_id[folds.fit_rows], train.latlon[folds.fit_rows]
    views = views_of(train, spec.backbones)
    dim = views.dim
    if spec.kind == "classifier":
        config: ClassifierConfig = spec.config
        geocells = make_geocells(fit_class, fit_latlon, len(train.classes), cells=config.geocells, min_rows=config.min_cell_rows)
        mean, std = view_statistics(views, folds.fit_rows)
        objective = ClassifierObjective(
            views, geocells.assign(train.class_id, train.latlon), train.latlon, geocells,
            label_smoothing=config.label_smoothing, haversine_tau_km=config.haversine_tau_km,
            haversine_within_state=config.haversine_within_state, view_dropout=config.view_dropout, seed=seed)

        def build() -> nn.Module:
            module = Scout(config, dim, len(geocells))
            module.standardize.set_statistics(mean, std)
            return module

        models, oof, details = _cross_fit(build, objective, folds, _outputs(spec.kind, views, device=device), config.train,
                                          seed=seed, device=device, desc=spec.name, progress=progress)
        extra = {}
    else:
        config: ProbeConfig = spec.config
        geocells = make_geocells(fit_class, fit_latlon, len(train.classes), cells=0, min_rows=1)
        means = views.means
        mean, std = row_statistics(means, folds.fit_rows, present=views.mask.any(axis=1))

        # The L2 strength by cross-validation: every candidate is cross-fitted, strongest first, each fold
        # starting from the previous candidate's model of that fold (a warm start along the path); the
        # lowest OOF NLL wins, and its OOF outputs are the member's (no refit: the K fold models are it).
        tried, best, previous = [], None, None
        for l2 in sorted(config.l2, reverse=True):
            start = iter(previous or [])

            def build() -> nn.Module:
                module = Probe(dim, len(train.classes))
                module.standardize.set_statistics(mean, std)
                warm = next(start, None)
                if warm is not None:
                    module.load_state_dict(warm.state_dict())
                return module

            objective = ProbeObjective(means, train.class_id, l2=l2)
            models_l2, oof_l2, details_l2 = _cross_fit(build, objective, folds, _outputs(spec.kind, views, device=device),
                                                       config.train, seed=seed, device=device,
                                                       desc=f"{spec.name} l2={l2:g}", progress=progress)
            nll = member_metrics(oof_l2, geocells, fit_class, fit_latlon)["nll"]
            tried.append({"l2": l2, "oof_nll": nll, "steps": [d["steps_run"] for d in details_l2]})
            if best is None or nll < best[0]:
                best = (nll, l2, models_l2, oof_l2, details_l2)
            previous = models_l2
        _, chosen, models, oof, details = best
        extra = {"l2_tried": tried, "l2": chosen, "sklearn_C": 1.0 / (chosen * len(folds.fit_rows))}
    oof_metrics = member_metrics(oof, geocells, fit_class, fit_latlon)
    # Out-of-fold outputs of the mirrored views too, where the store has them: the ensemble decides on
    # these rows whether flip test-time augmentation helps.
    mirrored_oof = {}
    for mode in TTA_MODES[1:]:
        mirrored = _mirrored(train, spec.backbones, mode)
        if mirrored is None:
            break
        outputs = _outputs(spec.kind, mirrored, device=device)
        mirrored_oof[mode] = np.zeros_like(oof)
        for k, module in enumerate(models):
            mirrored_oof[mode][folds.fold == k] = outputs(module.to(device), folds.heldout_rows(k))
            module.cpu()
    seconds = time.perf_counter() - started
    card = _card(spec, train, protocol, geocells, dim, {"oof": oof_metrics, "folds": details, "seconds": seconds,
                                                        "seed": seed, **extra})
    save_head(out_dir, models, card, oof={"": oof, **mirrored_oof}, oof_sample_id=train.sample_id[folds.fit_rows])
    return MemberResult(spec.name, Path(out_dir), oof_metrics, seconds, {"folds": details, **extra})


@dataclass
class LoadedMember:
    card: HeadCard
    head_dir: Path
    models: list[nn.Module]

    @property
    def geocells(self) -> Geocells:
        return self.card.geocells()


def load_member(head_dir: Path) -> LoadedMember:
    card = read_card(head_dir)
    if card.kind not in MEMBER_KINDS:
        raise CheckpointError(f"{head_dir} holds a {card.kind}, not an ensemble member ({', '.join(MEMBER_KINDS)})")
    cells = len(card.centroids)
    models = []
    for k in range(card.folds):
        if card.kind == "classifier":
            module = Scout(config_from_dict(ClassifierConfig, card.config), card.input_dim, cells)
        else:
            module = Probe(card.input_dim, len(card.classes))
        models.append(load_weights(module, head_dir, k))
    return LoadedMember(card, Path(head_dir), models)


def _fold_mean(models: list[nn.Module], outputs: Callable[[nn.Module], np.ndarray], device: torch.device) -> np.ndarray:
    total = None
    for module in models:
        out = outputs(module.to(device)).astype(np.float64)
        module.cpu()
        total = out if total is None else total + out
    return (total / len(models)).astype(np.float32)


def member_logits(member: LoadedMember, source: FeatureSource, *, device: torch.device, flip_tta: str = "none") -> np.ndarray:
    """(N, K) logits of every row of the source's features: the mean of the fold models; with flip TTA, the
    mean of the plain and the mirrored views' logits (views moved to their mirrored slots, see tta.py)."""
    features = with_inputs(source, member.card.inputs)
    check_features(member.card, features, member.head_dir)
    rows = np.arange(len(features))
    variants = [views_of(features, member.card.backbones)]
    if flip_tta != "none":
        mirrored = _mirrored(features, member.card.backbones, flip_tta)
        if mirrored is None:
            raise ConfigError(f"flip TTA needs the mirrored views of {member.card.backbones}: extract the store with --flip")
        variants.append(mirrored)
    logits = [_fold_mean(member.models, lambda m: _outputs(member.card.kind, v, device=device)(m, rows), device)
              for v in variants]
    return np.mean(logits, axis=0).astype(np.float32)


def member_oof(member: LoadedMember, train: SplitFeatures, folds: Folds, flip_tta: str = "none") -> np.ndarray | None:
    """The member's OOF outputs (with flip TTA: the mean of the plain and the mirrored ones, or None when
    the member has no mirrored OOF outputs), checked to be of these fit rows in this fold assignment."""
    if member.card.folds_digest != folds.digest:
        raise CheckpointError(
            f"{member.head_dir} was cross-fitted on other rows or folds ({member.card.folds_digest}) than these "
            f"({folds.digest}): retrain it with the same validation split, folds and seed"
        )
    outputs, sample_id = read_oof(member.head_dir)
    if not np.array_equal(sample_id, train.sample_id[folds.fit_rows]):
        raise CheckpointError(f"{member.head_dir}: its out-of-fold rows are not these fit rows")
    if flip_tta == "none":
        return outputs[""]
    if flip_tta not in outputs:
        return None
    return ((outputs[""].astype(np.float64) + outputs[flip_tta]) / 2).astype(np.float32)
