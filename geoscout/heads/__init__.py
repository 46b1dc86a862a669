"""Lightweight heads on frozen per-view embeddings: cross-fitted members (classifiers and a logistic
probe), their ensemble fitted on out-of-fold outputs, a residual regressor, and decoding to an answer."""

from .api import (
    EnsembleResult,
    EvaluationResult,
    ensemble_outputs,
    evaluate,
    fit_ensemble,
    make_protocol,
    needs_gallery,
    predict,
    read_ensemble,
    train_members,
)
from .decode import DecodeConfig
from .ensemble import EnsembleConfig
from .fusion import FusionConfig
from .members import MemberResult, MemberSpec, Protocol
from .models import ClassifierConfig, ProbeConfig, RegressorConfig
from .presets import PRESETS, Recipe, recipe
from .submission import class_ids_to_state_idx, to_submission_frame
from .training import Prediction, TrainConfig

__all__ = [
    "ClassifierConfig", "DecodeConfig", "EnsembleConfig", "EnsembleResult", "EvaluationResult", "FusionConfig",
    "MemberResult", "MemberSpec", "PRESETS", "Prediction", "ProbeConfig", "Protocol", "Recipe", "RegressorConfig",
    "TrainConfig", "class_ids_to_state_idx", "ensemble_outputs", "evaluate", "fit_ensemble", "make_protocol",
    "needs_gallery", "predict", "read_ensemble", "recipe", "to_submission_frame", "train_members",
]
