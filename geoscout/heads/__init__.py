"""Lightweight heads on frozen per-view embeddings: Scout (state classifier), Sniper (offset regressor),
their logit-level ensemble, and the end-to-end functions that train, predict and evaluate them."""

from .decode import DecodeConfig
from .ensemble import EnsembleConfig
from .fusion import FusionConfig
from .models import ClassifierConfig, RegressorConfig
from .pipeline import (
    ClassifierResult, EnsembleResult, EvaluationResult, RegressorResult, evaluate, fit_ensemble, needs_gallery, predict,
    train_classifier, train_regressor,
)
from .presets import PRESETS, classifier_preset, ensemble_preset, regressor_preset
from .split import load_validation_split, make_validation_split, save_validation_split
from .submission import class_ids_to_state_idx, to_submission_frame
from .training import Prediction, TrainConfig

__all__ = [
    "ClassifierConfig", "ClassifierResult", "DecodeConfig", "EnsembleConfig", "EnsembleResult", "EvaluationResult", "FusionConfig",
    "PRESETS", "Prediction", "RegressorConfig", "RegressorResult", "TrainConfig", "class_ids_to_state_idx",
    "classifier_preset", "ensemble_preset", "evaluate", "fit_ensemble", "load_validation_split",
    "make_validation_split", "needs_gallery", "predict", "regressor_preset", "save_validation_split", "to_submission_frame",
    "train_classifier", "train_regressor",
]
