"""The head API (what the stages and the CLI call): make the protocol, train members, fit the ensemble,
predict, evaluate. Every function takes SplitFeatures and folders, works without a CLI and returns a
small result.

The protocol (folds.py): validation rows are held out from every fit and every choice; the rest are
cut into K folds. Members are cross-fitted; the ensemble's temperatures and weights, the regressor,
and the decoding choices (expected-distance decoding, the regressor kept or not, the retrieval share)
are fitted on out-of-fold outputs. Validation scores are therefore honest; out-of-fold scores are
slightly optimistic (each fold's model stopped early on that fold's rows, and the choices were made on them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_dir, atomic_write_text
from ..competition import NO_PREDICTION
from ..device import resolve_device
from ..errors import ConfigError
from ..geo import spherical_mean
from ..metric import METRIC_KEYS, score_predictions
from ..store.features import SplitFeatures
from ..store.split import validation_digest
from .checkpoint import CheckpointError, HeadCard, load_weights, read_card, save_head, weights_sha256
from .configio import config_from_dict, config_to_dict
from .decode import decode
from .ensemble import EnsembleConfig, fine_cells, fit_temperature, fit_weights, joint_cell_logits, pool, state_log_probs
from .folds import Folds, make_folds
from .geocells import Geocells
from .inputs import FeatureSource, row_statistics, views_of, with_inputs
from .members import (
    LoadedMember,
    MemberResult,
    MemberSpec,
    Protocol,
    load_member,
    member_logits,
    member_metrics,
    member_oof,
    train_member,
)
from .models import RegressorConfig, Sniper
from .regressor import Anchors, RegressorObjective, regressed_points
from .retrieval import Neighbours, SearchSpace, build_gallery, fit_space, oof_neighbours, search
from .training import Prediction, fit, seeded

ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_FORMAT = "geoscout-ensemble/3"  # 3: any number of cross-fitted members, fitted on out-of-fold outputs
REGRESSOR_DIR = "regressor"
SPACE_FILE = "retrieval.npz"
EVAL_BATCH = 4096


# ------------------------------------------------------------------------------------------ protocol


def make_protocol(train: SplitFeatures, val_mask: np.ndarray, *, folds: int, seed: int = 0) -> Protocol:
    """Validation rows (the store's split) and K stratified folds of the rest."""
    if not train.labelled:
        raise ConfigError(f"split {train.split!r} has no labels; the heads train on the training split")
    val_mask = np.asarray(val_mask)
    if val_mask.dtype != bool or val_mask.shape != (len(train),):
        raise ValueError(f"val_mask must be a bool array of shape ({len(train)},); got {val_mask.dtype} {val_mask.shape}")
    fit_rows, val_rows = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
    if len(val_rows) == 0:
        raise ConfigError("the validation split holds no rows: too few training locations per state")
    return Protocol(make_folds(train.sample_id, train.class_id, fit_rows, k=folds, seed=seed), val_rows,
                    validation_digest(train.sample_id[val_rows]))


def train_members(train: FeatureSource, specs: list[MemberSpec], protocol: Protocol, out_dirs: dict[str, Path], *,
                  device: str = "auto", seed: int = 0, progress: bool = True) -> list[MemberResult]:
    """Cross-fit each member into its folder (written whole: NAME.tmp renamed into place). `train` is the
    training split, or a function giving it for the store datasets a member reads."""
    dev = resolve_device(device)
    results = []
    for spec in specs:
        with atomic_dir(out_dirs[spec.name]) as tmp:
            result = train_member(train, spec, protocol, tmp, device=dev, seed=seed, progress=progress)
        result.out_dir = Path(out_dirs[spec.name])
        results.append(result)
    return results


# ------------------------------------------------------------------------------------------ ensemble


@dataclass
class EnsembleResult:
    out_dir: Path
    members: list[str]
    weights: list[float]
    temperatures: list[float]
    oof: dict[str, dict[str, float]]  # member name and "ensemble" -> OOF metrics (slightly optimistic)
    regressor: bool  # kept
    decode: dict  # the chosen candidates and retrieval share
    choices: list[dict]  # every decoding tried on OOF, with its metrics
    seconds: float
    flip_tta: str = "none"  # the mirrored-view averaging used ("none" when left out)
    flip_tta_note: str = ""  # why: kept, lost out of fold, or the store has no mirrored views


@dataclass
class _Members:
    """Members loaded for an ensemble, with what pooling them needs."""

    loaded: list[LoadedMember]
    geocells: Geocells  # the ensemble's cells: the shared fine geocells, else one per state
    fine: list[int]  # which members give q(c | s)

    @property
    def names(self) -> list[str]:
        return [m.card.name for m in self.loaded]

    @property
    def backbones(self) -> list[str]:
        return list(dict.fromkeys(b for m in self.loaded for b in m.card.backbones))


def _load_members(member_dirs: list[Path]) -> _Members:
    if not member_dirs:
        raise ConfigError("an ensemble needs at least one trained member")
    loaded = [load_member(Path(d)) for d in member_dirs]
    first = loaded[0].card
    for m in loaded[1:]:
        for key in ("dataset_fingerprint", "classes", "validation_digest", "folds_digest"):
            if getattr(m.card, key) != getattr(first, key):
                raise CheckpointError(
                    f"{m.head_dir} and {loaded[0].head_dir} differ in {key}: the members of one ensemble must be "
                    "trained on the same data, validation split and folds"
                )
    geocells, fine = fine_cells([m.geocells for m in loaded])
    if geocells is None:
        geocells = loaded[0].geocells  # one cell per state, from the same fit rows for every member
    return _Members(loaded, geocells, fine)


def _combine(outputs: list[np.ndarray], members: _Members, weights: np.ndarray, temperatures: list[float]) -> np.ndarray:
    """(N, K) the ensemble's cell log-probabilities (up to a row constant) from every member's logits."""
    log_probs = [state_log_probs(z, m.geocells, t) for z, m, t in zip(outputs, members.loaded, temperatures)]
    states = pool(log_probs, weights)
    if not members.fine:
        return states.numpy()
    return joint_cell_logits(states, [outputs[i] for i in members.fine], [temperatures[i] for i in members.fine],
                             members.geocells)


def _descriptors(features: SplitFeatures, backbones: list[str]) -> np.ndarray:
    """What the regressor reads: the view means of every backbone side by side (standardised in the module)."""
    return views_of(features, backbones).means


@dataclass
class _Positions:
    """Everything decoding can use for some rows, and `decode` over a choice of candidates and share."""

    joint: np.ndarray  # (N, K) cell log-probabilities
    geocells: Geocells
    points: object  # (cells, probabilities) -> (N, k, 2) regressed points, or None
    neighbours: Neighbours | None
    similarity_temperature: float

    def decode(self, *, candidates: int, regressor: bool, share: float) -> Prediction:
        return decode(self.joint, self.geocells, candidates=candidates, points=self._points(candidates) if regressor else None,
                      neighbours=self.neighbours, retrieval_weight=share, similarity_temperature=self.similarity_temperature)

    def _points(self, candidates: int):
        """The regressor's points, computed once per number of candidates (the cells are the same each time)."""
        cache = self.__dict__.setdefault("_cache", {})

        def points(cells: np.ndarray, probability: np.ndarray) -> np.ndarray:
            if candidates not in cache:
                cache[candidates] = self.points(cells, probability)
            return cache[candidates]

        return points


def _score(prediction: Prediction, class_id: np.ndarray, latlon: np.ndarray) -> dict[str, float]:
    return score_predictions(class_id, latlon[:, 0], latlon[:, 1], prediction.top5, prediction.lat, prediction.lon)


def _train_regressor(descriptors: np.ndarray, joint: np.ndarray, geocells: Geocells, train: SplitFeatures, folds: Folds,
                     config: RegressorConfig, out_dir: Path, *, device: torch.device, seed: int, progress: bool,
                     card: HeadCard) -> tuple[list[torch.nn.Module], object]:
    """Cross-fit the regressor on the OOF ensemble outputs of the fit rows (`descriptors`, `joint` in
    folds.fit_rows order); write its folder; return the fold models and an OOF points function."""
    fit_latlon = train.latlon[folds.fit_rows]
    z = torch.as_tensor(joint)
    anchor_cell, anchor_p = geocells.anchor_cells(z)
    train_anchor = Anchors(anchor_cell, anchor_p)
    if config.anchor == "true":
        true_cell = geocells.assign(train.class_id[folds.fit_rows], fit_latlon)
        p = torch.softmax(z.float(), dim=1)[torch.arange(len(true_cell)), torch.from_numpy(true_cell)]
        train_anchor = Anchors(true_cell, p.numpy().astype(np.float32))
    local = folds.local()  # the arrays here hold only the fit rows
    objective = RegressorObjective(descriptors, train_anchor, geocells.centroids, fit_latlon)
    mean, std = row_statistics(descriptors, local.fit_rows)
    models = []
    for k in range(folds.k):
        with seeded(seed * 1009 + 500 + k):
            module = Sniper(config, descriptors.shape[1], len(geocells))
            module.standardize.set_statistics(mean, std)
            fit(module, objective, train_rows=local.train_rows(k), heldout_rows=local.heldout_rows(k), config=config.train,
                seed=seed * 1009 + 500 + k, device=device, desc=f"regressor fold {k + 1}/{folds.k}", progress=progress)
        models.append(module.cpu())
    save_head(out_dir, models, card)

    def oof_points(cells: np.ndarray, probability: np.ndarray) -> np.ndarray:
        out = np.empty((*cells.shape, 2))
        for k in range(folds.k):
            at = folds.fold == k
            out[at] = regressed_points([models[k]], descriptors[at], geocells.centroids, cells[at], probability[at],
                                       batch_size=EVAL_BATCH, device=device)
        return out

    return models, oof_points


@dataclass
class _Pool:
    temperatures: list[float]
    weights: np.ndarray
    joint: np.ndarray  # (M, K) OOF cell log-probabilities of the ensemble
    metrics: dict[str, float]  # OOF, anchor cell's centroid as the position
    member_scores: dict[str, dict[str, float]]
    fallback: str | None  # the member used alone because it beat the pooled ensemble out of fold


def _fit_pool(oof: list[np.ndarray], members: _Members, config: EnsembleConfig, class_id: np.ndarray,
              latlon: np.ndarray) -> _Pool:
    """Temperatures, then weights, on out-of-fold outputs; the best member alone where it beats the pool."""
    temperatures = [fit_temperature(z, m.geocells, class_id) if config.temperature else 1.0
                    for z, m in zip(oof, members.loaded)]
    if config.weights == "fixed":
        if len(config.fixed_weights) != len(oof):
            raise ConfigError(f"{len(config.fixed_weights)} fixed weights for {len(oof)} members")
        weights = np.asarray(config.fixed_weights, dtype=np.float64) / sum(config.fixed_weights)
    else:
        weights = fit_weights([state_log_probs(z, m.geocells, t) for z, m, t in zip(oof, members.loaded, temperatures)],
                              class_id)
    member_scores = {name: member_metrics(z, m.geocells, class_id, latlon)
                     for name, z, m in zip(members.names, oof, members.loaded)}
    joint = _combine(oof, members, weights, temperatures)
    metrics = member_metrics(joint, members.geocells, class_id, latlon)
    # Never below the best member on the rows the choice is made on: fall back to it when it wins.
    best = max(member_scores, key=lambda n: member_scores[n]["score"])
    fallback = None
    if config.weights == "fit" and member_scores[best]["score"] > metrics["score"]:
        fallback = best
        weights = np.eye(len(oof))[members.names.index(best)]
        joint = _combine(oof, members, weights, temperatures)
        metrics = member_metrics(joint, members.geocells, class_id, latlon)
    return _Pool(temperatures, weights, joint, metrics, member_scores, fallback)


def fit_ensemble(
    train: FeatureSource, *, member_dirs: list[Path], protocol: Protocol, out_dir: Path, config: EnsembleConfig,
    regressor_config: RegressorConfig, device: str = "auto", seed: int = 0, progress: bool = True,
) -> EnsembleResult:
    """Fit temperatures and weights, the regressor and the decoding choices on out-of-fold outputs, and
    write the ensemble folder (ensemble.json, regressor/, retrieval.npz), whole. Only the training split's
    plain "features" are read (the regressor's and retrieval's inputs); members bring their OOF outputs."""
    train = with_inputs(train, ("features",))
    started = time.perf_counter()
    dev = resolve_device(device)
    members = _load_members(member_dirs)
    folds = protocol.folds
    card0 = members.loaded[0].card
    if card0.validation_digest != protocol.validation_digest:
        raise CheckpointError(f"{members.loaded[0].head_dir} was validated on other rows than this run's validation split")
    fit_class, fit_latlon = train.class_id[folds.fit_rows], train.latlon[folds.fit_rows]
    pooled = _fit_pool([member_oof(m, train, folds) for m in members.loaded], members, config, fit_class, fit_latlon)
    flip_tta, flip_note = "none", "not asked for"
    if config.flip_tta != "none":
        # The default asks for it where it can be had: a store without --flip is a plain note, not a warning.
        mirrored = [member_oof(m, train, folds, config.flip_tta) for m in members.loaded]
        if any(z is None for z in mirrored):
            flip_note = "not available: the store has no mirrored views (extract with --flip)"
        else:
            with_tta = _fit_pool(mirrored, members, config, fit_class, fit_latlon)
            if with_tta.metrics["score"] > pooled.metrics["score"]:  # kept only where it wins out of fold
                pooled, flip_tta, flip_note = with_tta, config.flip_tta, f"{config.flip_tta!r} kept: it wins out of fold"
            else:
                flip_note = f"{config.flip_tta!r} left out: it does not win out of fold"
    weights, temperatures, joint, member_scores = pooled.weights, pooled.temperatures, pooled.joint, pooled.member_scores
    ensemble_metrics, fallback = pooled.metrics, pooled.fallback

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        points = None
        regressor_trained = config.regressor != "off"
        backbones = members.backbones
        if regressor_trained:
            descriptors = _descriptors(train, backbones)[folds.fit_rows]
            reg_card = dataclasses.replace(
                card0, kind="regressor", name=REGRESSOR_DIR, backbones=backbones, config=config_to_dict(regressor_config),
                centroids=members.geocells.centroids.tolist(), cell_class=members.geocells.cell_class.tolist(),
                backbone_fingerprints={b: train.backbone_fingerprints.get(b, "") for b in backbones},
                input_dim=descriptors.shape[1], metrics={})
            (tmp / REGRESSOR_DIR).mkdir()
            _, points = _train_regressor(descriptors, joint, members.geocells, train, folds, regressor_config,
                                         tmp / REGRESSOR_DIR, device=dev, seed=seed, progress=progress, card=reg_card)
        neighbours, space = None, None
        if config.decode.retrieval_k:
            space = fit_space(train, rows=folds.fit_rows, backbones=backbones, dim=config.decode.retrieval_dim, seed=seed)
            descriptors_search = space.describe(train)[folds.fit_rows]
            cells = members.geocells.assign(fit_class, fit_latlon)
            neighbours = oof_neighbours(descriptors_search, fit_latlon, cells, folds, k=config.decode.retrieval_k)
        positions = _Positions(joint, members.geocells, points, neighbours, config.decode.similarity_temperature)
        choices = []
        regressor_options = {"on": (True,), "off": (False,), "auto": (False, True)}[config.regressor]
        shares = config.decode.retrieval_weights if neighbours is not None else (0.0,)
        for candidates in config.decode.candidates:
            for use_regressor in regressor_options:
                for share in shares:
                    metrics = _score(positions.decode(candidates=candidates, regressor=use_regressor, share=share),
                                     fit_class, fit_latlon)
                    choices.append({"candidates": candidates, "regressor": use_regressor, "retrieval_weight": share,
                                    **{k: metrics[k] for k in ("score", "mean_km", "median_km", "gps_score")}})
        # The best OOF score; ties go to the earliest (simplest) choice.
        chosen = max(choices, key=lambda c: (c["score"], -choices.index(c)))
        if not chosen["regressor"] and regressor_trained:
            shutil.rmtree(tmp / REGRESSOR_DIR)
        if space is not None and chosen["retrieval_weight"] > 0:
            np.savez(tmp / SPACE_FILE, basis=space.basis if space.basis is not None else np.zeros((0, 0), np.float32),
                     **{f"center:{b}": c for b, c in space.centers.items()})
        ensemble_metrics = _score(positions.decode(candidates=chosen["candidates"], regressor=chosen["regressor"],
                                                   share=chosen["retrieval_weight"]), fit_class, fit_latlon) | {
            "nll": ensemble_metrics["nll"]}
        record = {
            "format": ENSEMBLE_FORMAT,
            # Paths relative to this folder, so a run folder can be moved as a whole.
            "members": [
                {"name": m.card.name, "kind": m.card.kind, "backbones": m.card.backbones,
                 "dir": os.path.relpath(m.head_dir, out_dir), "weights_sha256": weights_sha256(m.head_dir),
                 "weight": float(w), "temperature": float(t), "oof": member_scores[m.card.name]}
                for m, w, t in zip(members.loaded, weights, temperatures)
            ],
            "fallback_to": fallback,
            "backbones": backbones,
            "flip_tta": flip_tta,
            "flip_tta_note": flip_note,
            "regressor": chosen["regressor"],
            "decode": {"candidates": chosen["candidates"], "retrieval_weight": chosen["retrieval_weight"],
                       "retrieval_k": config.decode.retrieval_k, "similarity_temperature": config.decode.similarity_temperature},
            "config": config_to_dict(config),
            "regressor_config": config_to_dict(regressor_config),
            "validation_digest": protocol.validation_digest,
            "folds_digest": folds.digest,
            "folds": folds.k,
            "oof": ensemble_metrics,
            "choices": choices,
            "protocol": "weights, temperatures, the regressor and the decoding were fitted on out-of-fold outputs of "
                        "the fit rows; validation rows were touched by no choice",
        }
        atomic_write_text(tmp / ENSEMBLE_FILE, json.dumps(record, indent=1) + "\n")
    oof_table = {**member_scores, "ensemble": ensemble_metrics}
    return EnsembleResult(out_dir, members.names, [float(w) for w in weights], temperatures, oof_table, chosen["regressor"],
                          record["decode"], choices, time.perf_counter() - started, flip_tta, flip_note)


# ------------------------------------------------------------------------------------------ predict


def read_ensemble(ensemble_dir: Path) -> dict:
    path = Path(ensemble_dir) / ENSEMBLE_FILE
    if not path.is_file():
        raise CheckpointError(f"{ensemble_dir}: no {ENSEMBLE_FILE}; fit the ensemble first (`geoscout ensemble`)")
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("format") != ENSEMBLE_FORMAT:
        raise CheckpointError(f"{path}: format {record.get('format')!r}; this geoscout reads {ENSEMBLE_FORMAT!r}: fit it again")
    return record


def needs_gallery(ensemble_dir: Path) -> bool:
    """Whether predicting with this ensemble needs the training split as its retrieval gallery."""
    return read_ensemble(ensemble_dir)["decode"]["retrieval_weight"] > 0


def _load_space(ensemble_dir: Path, backbones: list[str]) -> SearchSpace:
    with np.load(Path(ensemble_dir) / SPACE_FILE) as z:
        basis = z["basis"]
        return SearchSpace(backbones, {b: z[f"center:{b}"] for b in backbones}, basis if basis.size else None)


@dataclass
class EnsembleOutputs:
    """What predict computed for some rows: enough to decode again or to explain the answer."""

    prediction: Prediction
    joint: np.ndarray  # (N, K) cell log-probabilities
    geocells: Geocells
    member_outputs: dict[str, np.ndarray]  # member name -> (N, K_m) logits


def ensemble_outputs(source: FeatureSource, ensemble_dir: Path, *, device: str = "auto",
                     gallery: SplitFeatures | None = None, fit_rows: np.ndarray | None = None) -> EnsembleOutputs:
    """The ensemble's answer for every row of the source's features (a SplitFeatures of "features", or a
    function giving one per tuple of store datasets, for members that read others). Retrieval needs
    `gallery` (the labelled training split) and `fit_rows` (its rows the ensemble was fitted on), see
    `needs_gallery`."""
    features = with_inputs(source, ("features",))  # the regressor and retrieval read the plain features
    dev = resolve_device(device)
    ensemble_dir = Path(ensemble_dir)
    record = read_ensemble(ensemble_dir)
    member_dirs = [ensemble_dir / m["dir"] for m in record["members"]]
    members = _load_members(member_dirs)
    for entry, member in zip(record["members"], members.loaded):
        if weights_sha256(member.head_dir) != entry["weights_sha256"]:
            raise CheckpointError(f"{member.head_dir} changed since the ensemble in {ensemble_dir} was fitted: fit it again")
    outputs = [member_logits(m, source, device=dev, flip_tta=record["flip_tta"]) for m in members.loaded]
    weights = np.array([m["weight"] for m in record["members"]])
    temperatures = [m["temperature"] for m in record["members"]]
    joint = _combine(outputs, members, weights, temperatures)
    points = None
    if record["regressor"]:
        reg_dir = ensemble_dir / REGRESSOR_DIR
        card = read_card(reg_dir)
        config = config_from_dict(RegressorConfig, card.config)
        models = [load_weights(Sniper(config, card.input_dim, len(card.centroids)), reg_dir, k) for k in range(card.folds)]
        descriptors = _descriptors(features, card.backbones)

        def points(cells: np.ndarray, probability: np.ndarray) -> np.ndarray:
            return regressed_points([m.to(dev) for m in models], descriptors, members.geocells.centroids, cells, probability,
                                    batch_size=EVAL_BATCH, device=dev)
    neighbours = None
    decode_record = record["decode"]
    if decode_record["retrieval_weight"] > 0:
        if gallery is None or fit_rows is None:
            raise ConfigError(f"the ensemble in {ensemble_dir} refines positions by retrieval: pass the training split as gallery")
        if gallery.dataset_fingerprint != members.loaded[0].card.dataset_fingerprint:
            raise CheckpointError(f"the gallery is dataset {gallery.dataset_fingerprint!r}; the ensemble was fitted on "
                                  f"{members.loaded[0].card.dataset_fingerprint!r}")
        space = _load_space(ensemble_dir, record["backbones"])
        cells = members.geocells.assign(gallery.class_id, gallery.latlon)
        built = build_gallery(space.describe(gallery), gallery.latlon, cells, fit_rows)
        neighbours = search(built, space.describe(features), k=decode_record["retrieval_k"])
    positions = _Positions(joint, members.geocells, points, neighbours, decode_record["similarity_temperature"])
    prediction = positions.decode(candidates=decode_record["candidates"], regressor=record["regressor"],
                                  share=decode_record["retrieval_weight"])
    return EnsembleOutputs(prediction, joint, members.geocells, dict(zip(members.names, outputs)))


def predict(features: FeatureSource, ensemble_dir: Path, *, device: str = "auto", gallery: SplitFeatures | None = None,
            fit_rows: np.ndarray | None = None) -> Prediction:
    """(top-5 class ids, lat, lon) per row. Class ids index `features.classes` (map them to state_idx for a submission)."""
    return ensemble_outputs(features, ensemble_dir, device=device, gallery=gallery, fit_rows=fit_rows).prediction


# ------------------------------------------------------------------------------------------ evaluate


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


def baseline_prediction(train: SplitFeatures, rows: np.ndarray, n: int) -> Prediction:
    """The trivial answer: the most frequent classes of `rows`, at the most frequent class's centroid."""
    counts = np.bincount(train.class_id[rows], minlength=len(train.classes))
    order = np.argsort(-counts, kind="stable")[:5]
    top5 = np.full((n, 5), NO_PREDICTION, dtype=np.int64)
    top5[:, :len(order)] = order
    top = rows[train.class_id[rows] == order[0]]
    lat, lon = spherical_mean(train.latlon[top, 0], train.latlon[top, 1])
    return Prediction(top5, np.full(n, lat), np.full(n, lon))


def evaluate(train: FeatureSource, protocol: Protocol, *, ensemble_dir: Path, device: str = "auto",
             truth: tuple[FeatureSource, np.ndarray, np.ndarray] | None = None) -> EvaluationResult:
    """Every METRIC_KEYS value of the baseline, each member alone (its anchor cell's centroid) and the
    ensemble, on the validation rows; or, with `truth` = (features, class_id, latlon), on those rows."""
    plain = with_inputs(train, ("features",))
    if truth is None:
        rows = protocol.val_rows
        source = (lambda datasets: with_inputs(train, datasets).subset(rows)) if callable(train) else plain.subset(rows)
        class_id, latlon = plain.class_id[rows], plain.latlon[rows]
    else:
        source, class_id, latlon = truth
    record = read_ensemble(ensemble_dir)
    if record["validation_digest"] != protocol.validation_digest:
        raise CheckpointError(f"{ensemble_dir} was fitted with another validation split than this run's")
    fit_rows = protocol.folds.fit_rows
    outputs = ensemble_outputs(source, ensemble_dir, device=device, gallery=plain, fit_rows=fit_rows)
    metrics = {"baseline": _score(baseline_prediction(plain, fit_rows, len(class_id)), class_id, latlon)}
    members = _load_members([Path(ensemble_dir) / m["dir"] for m in record["members"]])
    for member in members.loaded:
        metrics[member.card.name] = {k: v for k, v in member_metrics(
            outputs.member_outputs[member.card.name], member.geocells, class_id, latlon).items() if k in METRIC_KEYS}
    metrics["ensemble"] = _score(outputs.prediction, class_id, latlon)
    return EvaluationResult(metrics)
