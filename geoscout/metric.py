"""The competition metric, exactly as COMPETITION.md defines it, plus the usual geolocation extras.

final = 0.70 * classification + 0.30 * gps
classification: weight of the first position (1..5) holding the true state; a state repeated
  later in the list earns nothing (only its first occurrence counts).
gps = max(0, 1 - mean_km / 5000)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from .competition import NO_PREDICTION, PRED_COORD_COLUMNS, PRED_STATE_COLUMNS, TRUTH_COLUMNS
from .csvio import parse_float, parse_int, read_csv_as_text
from .geo import haversine_km
from .problems import InputError, Problem, csv_line
from .states import NUM_STATES

POSITION_WEIGHTS = (1.00, 0.60, 0.40, 0.25, 0.15)
DISTANCE_THRESHOLDS_KM = (1, 25, 200, 750, 2500)
METRIC_KEYS = (
    "score", "classification_score", "gps_score", "top1_accuracy", "top5_accuracy",
    "mean_km", "median_km", *(f"acc_{t}km" for t in DISTANCE_THRESHOLDS_KM), "geoscore", "n",
)


def classification_points(true_idx: np.ndarray, top5: np.ndarray) -> np.ndarray:
    """Per-location classification credit. `top5` is (N, k<=5), NO_PREDICTION (-1) where empty."""
    true_idx = np.asarray(true_idx)
    top5 = np.asarray(top5)
    weights = np.asarray(POSITION_WEIGHTS[: top5.shape[1]])
    hit = top5 == true_idx[:, None]
    first = hit.argmax(axis=1)  # the first occurrence: later repeats of the same state never count
    return np.where(hit.any(axis=1), weights[first], 0.0)


def score_predictions(true_idx, true_lat, true_lon, top5, pred_lat, pred_lon) -> dict[str, float]:
    """Every metric in METRIC_KEYS from arrays. Indices may be state_idx or class ids, as long as both sides agree."""
    true_idx = np.asarray(true_idx)
    top5 = np.asarray(top5)
    if len(true_idx) == 0:
        raise ValueError("cannot score zero locations")
    km = haversine_km(true_lat, true_lon, pred_lat, pred_lon)
    classification = float(classification_points(true_idx, top5).mean())
    mean_km = float(km.mean())
    gps = max(0.0, 1.0 - mean_km / 5000.0)
    result = {
        "score": 0.70 * classification + 0.30 * gps,
        "classification_score": classification,
        "gps_score": gps,
        "top1_accuracy": float((top5[:, 0] == true_idx).mean()),
        "top5_accuracy": float((top5 == true_idx[:, None]).any(axis=1).mean()),
        "mean_km": mean_km,
        "median_km": float(np.median(km)),
        **{f"acc_{t}km": float((km <= t).mean()) for t in DISTANCE_THRESHOLDS_KM},
        "geoscore": float((5000.0 * np.exp(-km / 1492.7)).mean()),
        "n": int(len(true_idx)),
    }
    assert tuple(result) == METRIC_KEYS
    return result


@dataclass(frozen=True)
class Truth:
    sample_id: list[str]
    state_idx: np.ndarray
    latitude: np.ndarray
    longitude: np.ndarray


@dataclass(frozen=True)
class Submission:
    sample_id: list[str]
    top5: np.ndarray  # (N, 5) state_idx, NO_PREDICTION where empty
    latitude: np.ndarray
    longitude: np.ndarray


def _check_columns(df: pl.DataFrame, required, file: str) -> list[Problem]:
    if df.width == 0:
        return [Problem(file, "the CSV is empty (no header)")]
    missing = [c for c in required if c not in df.columns]
    problems = [Problem(file, f"missing required column {c!r}; found {df.columns}", column=c) for c in missing]
    if not problems and df.height == 0:
        problems.append(Problem(file, "the CSV has a header but no rows"))
    return problems


def read_truth(path: Path) -> Truth:
    file = str(path)
    df = read_csv_as_text(path)
    problems = _check_columns(df, TRUTH_COLUMNS, file)
    if problems:
        raise InputError(problems, file)
    ids, states, lats, lons, seen = [], [], [], [], set()
    for i, row in enumerate(df.select(TRUTH_COLUMNS).iter_rows()):
        sid, s, la, lo = (v.strip() for v in row)
        where = dict(line=csv_line(i), sample_id=sid)
        if sid in seen:
            problems.append(Problem(file, "duplicate sample_id", column="sample_id", value=sid, **where))
        seen.add(sid)
        si, lat, lon = parse_int(s), parse_float(la), parse_float(lo)
        if si is None or not 0 <= si < NUM_STATES:
            problems.append(Problem(file, f"state_idx must be an integer in 0..{NUM_STATES - 1}", column="state_idx", value=s, **where))
        if lat is None or not -90 <= lat <= 90:
            problems.append(Problem(file, "latitude must be a number in [-90, 90]", column="latitude", value=la, **where))
        if lon is None or not -180 <= lon <= 180:
            problems.append(Problem(file, "longitude must be a number in [-180, 180]", column="longitude", value=lo, **where))
        ids.append(sid), states.append(si), lats.append(lat), lons.append(lon)
    if problems:
        raise InputError(problems, file)
    return Truth(ids, np.array(states), np.array(lats, dtype=np.float64), np.array(lons, dtype=np.float64))


def check_submission(df: pl.DataFrame, expected_ids: list[str], file: str) -> Submission:
    """Parse a submission by the competition's rules; raise InputError listing every violation."""
    required = ("sample_id", PRED_STATE_COLUMNS[0], *PRED_COORD_COLUMNS)
    problems = _check_columns(df, required, file)
    if problems:
        raise InputError(problems, file)
    optional = [c for c in PRED_STATE_COLUMNS[1:] if c in df.columns]
    ids: list[str] = []
    top5 = np.full((df.height, 5), NO_PREDICTION, dtype=np.int64)
    lat = np.zeros(df.height)
    lon = np.zeros(df.height)
    seen: set[str] = set()
    for i, row in enumerate(df.select(["sample_id", *required[1:], *optional]).iter_rows(named=True)):
        sid = row["sample_id"].strip()
        where = dict(line=csv_line(i), sample_id=sid)
        if sid in seen:
            problems.append(Problem(file, "duplicate sample_id: one row per location", column="sample_id", value=sid, **where))
        seen.add(sid)
        ids.append(sid)
        first = parse_int(row[PRED_STATE_COLUMNS[0]])
        if first is None or not 0 <= first < NUM_STATES:
            problems.append(Problem(file, f"required, an integer in 0..{NUM_STATES - 1}", column=PRED_STATE_COLUMNS[0], value=row[PRED_STATE_COLUMNS[0]], **where))
        else:
            top5[i, 0] = first
        for k, col in enumerate(PRED_STATE_COLUMNS[1:], start=1):
            text = (row.get(col) or "").strip()
            if text == "":
                continue
            value = parse_int(text)
            if value is None or not (value == NO_PREDICTION or 0 <= value < NUM_STATES):
                problems.append(Problem(file, f"must be empty, -1 or an integer in 0..{NUM_STATES - 1}", column=col, value=text, **where))
            else:
                top5[i, k] = value
        for col, bound, out in (("predicted_latitude", 90, lat), ("predicted_longitude", 180, lon)):
            value = parse_float(row[col])
            if value is None or not -bound <= value <= bound:
                problems.append(Problem(file, f"required, a number in [-{bound}, {bound}]", column=col, value=row[col], **where))
            else:
                out[i] = value
    missing = [s for s in expected_ids if s not in seen]
    extra = sorted(seen - set(expected_ids))
    if missing:
        problems.append(Problem(file, f"{len(missing)} location(s) have no row, e.g. sample_id {missing[:5]}", column="sample_id"))
    if extra:
        problems.append(Problem(file, f"{len(extra)} row(s) name a sample_id that is not in the truth, e.g. {extra[:5]}", column="sample_id"))
    if problems:
        raise InputError(problems, file)
    return Submission(ids, top5, lat, lon)


def score_files(truth_csv: Path, submission_csv: Path) -> dict[str, float]:
    """Validate the submission against the truth file's locations, then score it."""
    truth = read_truth(Path(truth_csv))
    sub = check_submission(read_csv_as_text(Path(submission_csv)), truth.sample_id, str(submission_csv))
    order = {sid: i for i, sid in enumerate(sub.sample_id)}
    idx = np.array([order[s] for s in truth.sample_id])
    return score_predictions(
        truth.state_idx, truth.latitude, truth.longitude, sub.top5[idx], sub.latitude[idx], sub.longitude[idx]
    )
