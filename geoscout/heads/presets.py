"""Named recipes: which members an ensemble has for given backbones, and every head's config.

"seed" is the reference design on cached features (SEED-NOTES.md); "default" is what geoscout
recommends. Roles follow the order of the backbones given, never their names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import ConfigError
from .configio import config_to_dict
from .decode import DecodeConfig
from .ensemble import EnsembleConfig
from .fusion import FusionConfig
from .members import MemberSpec
from .models import ClassifierConfig, ProbeConfig, RegressorConfig
from .training import TrainConfig

PRESETS = ("default", "seed")
DEFAULT_FOLDS = 5


@dataclass
class Recipe:
    name: str
    members: list[MemberSpec]
    ensemble: EnsembleConfig
    regressor: RegressorConfig
    folds: int = DEFAULT_FOLDS
    notes: list[str] = field(default_factory=list)

    def key(self) -> dict:
        """The resolved configuration, for stage cache keys: editing a preset retrains what it changed."""
        return {
            "members": [{"kind": m.kind, "backbones": list(m.backbones), "label": m.label, "config": config_to_dict(m.config)}
                        for m in self.members],
            "ensemble": config_to_dict(self.ensemble), "regressor": config_to_dict(self.regressor), "folds": self.folds,
        }


def _check_preset(name: str) -> None:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")


def default_classifier() -> ClassifierConfig:
    # Attention over the views (a learned weight per view) rather than their plain mean: a view that
    # shows nothing of the place no longer dilutes the others (+0.01 score in the noisy-views regime).
    # The step budget: 400 optimiser steps at every scale, many passes over a small split, about 4 over
    # 47,000 rows (what fits 5 folds x 2 backbones into the heads' 300 s on two CPU cores; at competition
    # scale 600 steps scored 0.0007 lower on the planted test split, bench/heads.py scale).
    return ClassifierConfig(
        fusion=FusionConfig(kind="attention", width=None, input_norm=False),
        hidden=512, norm="layer", activation="gelu", dropout=0.3, linear_skip=False, label_smoothing=0.0,
        # Geocells inside each state, with haversine smoothing inside the true state: what the position needs.
        geocells=300, min_cell_rows=30, haversine_tau_km=250.0, haversine_within_state=True,
        view_dropout=0.15,
        train=TrainConfig(batch_size=512, lr=1e-3, weight_decay=0.05, max_epochs=30, min_steps=400, max_steps=400,
                          patience=6),
    )


def seed_clip_classifier() -> ClassifierConfig:
    """The seed's StreetCLIP branch on cached features: nn.TransformerEncoder defaults (post-norm, ReLU,
    FFN 2048) at the backbone's width, 8 heads, 2 layers, the four outputs concatenated, then
    Linear(1024) -> BatchNorm -> SiLU -> Dropout(0.3). Its optimiser settings are not published for
    cached features; these are ordinary ones."""
    return ClassifierConfig(
        fusion=FusionConfig(kind="transformer", width=None, input_norm=False, depth=2, heads=8, ffn_dim=2048, dropout=0.1,
                            direction_embeddings=False, pooling="concat", norm_first=False),
        hidden=1024, norm="batch", activation="silu", dropout=0.3, label_smoothing=0.0,
        train=TrainConfig(batch_size=256, lr=3e-4, weight_decay=0.01, max_epochs=10, min_steps=200, patience=4),
    )


def seed_convnext_classifier() -> ClassifierConfig:
    """The seed's ConvNeXt branch: no fusion transformer, the four views concatenated -> Linear(2048) ->
    BatchNorm -> GELU -> Dropout(0.4), label smoothing 0.1."""
    return ClassifierConfig(
        fusion=FusionConfig(kind="concat", width=None, input_norm=False),
        hidden=2048, norm="batch", activation="gelu", dropout=0.4, label_smoothing=0.1,
        train=TrainConfig(batch_size=256, lr=5e-4, weight_decay=1e-4, max_epochs=10, min_steps=200, patience=4),
    )


def recipe(name: str, backbones: list[str] | tuple[str, ...]) -> Recipe:
    """The members and configs of preset `name` for these backbones (in the order given)."""
    _check_preset(name)
    backbones = tuple(backbones)
    if not backbones:
        raise ConfigError("a recipe needs at least one backbone")
    if name == "seed":
        members = [MemberSpec("classifier", (backbones[0],), seed_clip_classifier())]
        members += [MemberSpec("classifier", (b,), seed_convnext_classifier()) for b in backbones[1:]]
        weights = (0.6, *(0.4 / (len(backbones) - 1),) * (len(backbones) - 1)) if len(backbones) > 1 else (1.0,)
        return Recipe(
            name, members,
            EnsembleConfig(weights="fixed", fixed_weights=weights, temperature=False, flip_tta="none", regressor="on",
                           decode=DecodeConfig(candidates=(1,), retrieval_k=0)),
            RegressorConfig(state_embedding_dim=64, append_confidence=False, hidden=512, blocks=2, dropout=0.1,
                            anchor="predicted", train=TrainConfig(batch_size=256, lr=3e-4, weight_decay=0.01, max_epochs=7,
                                                                  min_steps=200, patience=4)),
            notes=["the seed fine-tunes both backbones end to end; here they are frozen and only the heads train",
                   "the first backbone takes the seed's StreetCLIP branch and weight 0.6, the others its ConvNeXt branch",
                   "its regressor reads the StreetCLIP classifier's fused features; here it reads the standardised view "
                   "means of every backbone (fused features of cross-fitted models live in K different spaces)",
                   "its classifiers were validated on one 10% split; here every head is cross-fitted like the default's"],
        )
    members = [MemberSpec("classifier", (b,), default_classifier()) for b in backbones]
    members.append(MemberSpec("probe", backbones, ProbeConfig()))
    return Recipe(
        name, members,
        EnsembleConfig(weights="fit", temperature=True, flip_tta="swap", regressor="auto",
                       decode=DecodeConfig(candidates=(1, 8), retrieval_k=32)),
        # The regressor is best early at every scale (at 59,000 fit rows: step 92 of its 600), so it is evaluated
        # at least every 10 steps: patience then waits 60 steps past the best, not 276.
        RegressorConfig(state_embedding_dim=64, append_confidence=True, hidden=256, blocks=2, dropout=0.1, anchor="true",
                        train=TrainConfig(batch_size=512, lr=1e-3, weight_decay=0.05, max_epochs=20, min_steps=300,
                                          max_steps=600, patience=6, max_eval_interval=10)),
    )


def with_changes(base: Recipe, name: str, *, member: dict | None = None, ensemble: dict | None = None,
                 decode: dict | None = None, regressor: dict | None = None, folds: int | None = None,
                 kinds: tuple[str, ...] | None = None, inputs: tuple[str, ...] | None = None) -> Recipe:
    """A variant of a recipe (the ablation's): fields replaced in every classifier config, the ensemble,
    its decoding or the regressor; `kinds` keeps only members of those kinds; `inputs` sets the store
    datasets every member reads."""
    members = [m for m in base.members if kinds is None or m.kind in kinds]
    if inputs is not None:
        members = [dataclasses.replace(m, config=dataclasses.replace(m.config, inputs=tuple(inputs))) for m in members]
    if member:
        members = [dataclasses.replace(m, config=dataclasses.replace(m.config, **member)) if m.kind == "classifier" else m
                   for m in members]
    ens = dataclasses.replace(base.ensemble, **(ensemble or {}))
    ens = dataclasses.replace(ens, decode=dataclasses.replace(ens.decode, **(decode or {})))
    return Recipe(name, members, ens, dataclasses.replace(base.regressor, **(regressor or {})),
                  base.folds if folds is None else folds, list(base.notes))
