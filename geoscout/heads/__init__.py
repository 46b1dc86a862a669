"""Lightweight heads on frozen per-view embeddings: Scout (state classifier), Sniper (offset regressor),
their logit-level ensemble, and the end-to-end functions that train, predict and evaluate them."""

from .api import (
    ClassifierResult,
    EnsembleResult,
    EvaluationResult,
    RegressorResult,
    evaluate,
    fit_ensemble,
    needs_gallery,
    predict,
    train_classifier,
    train_regressor,
)
from .decode import DecodeConfig
from .ensemble import EnsembleConfig
from .fusion import FusionConfig
from .models import ClassifierConfig, RegressorConfig
from .presets import PRESETS, classifier_preset, ensemble_preset, regressor_preset
from .submission import class_ids_to_state_idx, to_submission_frame
from .training import Prediction, TrainConfig

__all__ = [
    "ClassifierConfig", "ClassifierResult", "DecodeConfig", "EnsembleConfig", "EnsembleResult", "EvaluationResult", "FusionConfig",
    "PRESETS", "Prediction", "RegressorConfig", "RegressorResult", "TrainConfig", "class_ids_to_state_idx",
    "classifier_preset", "ensemble_preset", "evaluate", "fit_ensemble", "needs_gallery", "predict", "regressor_preset", "to_submission_frame",
    "train_classifier", "train_regressor",
]
