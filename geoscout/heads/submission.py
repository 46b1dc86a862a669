"""Predictions -> the competition's submission table, checked by the competition's own rules."""

from __future__ import annotations

import numpy as np
import polars as pl

from ..competition import NO_PREDICTION, PRED_COORD_COLUMNS, PRED_STATE_COLUMNS
from ..metric import check_submission


def class_ids_to_state_idx(top5_class_ids: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Map class ids to state_idx through `classes`, keeping NO_PREDICTION slots."""
    top5 = np.asarray(top5_class_ids)
    return np.where(top5 == NO_PREDICTION, NO_PREDICTION, np.asarray(classes)[np.clip(top5, 0, None)])


def to_submission_frame(
    sample_ids: np.ndarray, top5_state_idx: np.ndarray, lat: np.ndarray, lon: np.ndarray, template: pl.DataFrame
) -> pl.DataFrame:
    """The template (sample_submission.csv) in its own row order with every prediction column filled.

    Rows are matched by sample_id; a template row without a prediction, or a prediction for a location
    the template lacks, is an error. The result passes `check_submission` before it is returned.
    """
    keys = [str(s).strip() for s in np.asarray(sample_ids).tolist()]
    if len(set(keys)) != len(keys):
        raise ValueError("sample_ids repeat: one prediction per location")
    top5 = np.asarray(top5_state_idx, dtype=np.int64)
    if top5.ndim != 2 or top5.shape[0] != len(keys) or not 1 <= top5.shape[1] <= 5:
        raise ValueError(f"top5_state_idx has shape {top5.shape}; expected ({len(keys)}, 1..5)")
    if "sample_id" not in template.columns:
        raise ValueError(f"the template has no sample_id column; found {template.columns}")
    template_keys = [str(s).strip() for s in template["sample_id"].to_list()]
    position = {k: i for i, k in enumerate(keys)}
    missing = [k for k in template_keys if k not in position]
    extra = sorted(set(keys) - set(template_keys))
    if missing or extra:
        raise ValueError(
            f"predictions and template disagree: {len(missing)} template location(s) without a prediction "
            f"(e.g. {missing[:5]}), {len(extra)} prediction(s) for locations not in the template (e.g. {extra[:5]})"
        )
    order = np.array([position[k] for k in template_keys], dtype=np.int64)
    padded = np.full((len(keys), 5), NO_PREDICTION, dtype=np.int64)
    padded[:, : top5.shape[1]] = top5
    columns = {col: pl.Series(col, padded[order, k]) for k, col in enumerate(PRED_STATE_COLUMNS)}
    for col, values in zip(PRED_COORD_COLUMNS, (lat, lon)):
        columns[col] = pl.Series(col, np.asarray(values, dtype=np.float64)[order])
    frame = template.with_columns(*columns.values())
    check_submission(frame.cast(pl.String), template_keys, "submission")
    return frame
