import numpy as np
import polars as pl
import pytest

from geoscout.competition import PRED_STATE_COLUMNS
from geoscout.heads.submission import class_ids_to_state_idx, to_submission_frame
from geoscout.problems import InputError


def template(ids: list[int]) -> pl.DataFrame:
    frame = pl.DataFrame({
        "sample_id": ids,
        **{f"image_{v}": [f"img_{i:06d}_{v}.jpg" for i in ids] for v in ("north", "east", "south", "west")},
    })
    empty = {c: pl.Series(c, [None] * len(ids), dtype=pl.Int64) for c in PRED_STATE_COLUMNS}
    return frame.with_columns(*empty.values(), pl.lit(None, pl.Float64).alias("predicted_latitude"),
                              pl.lit(None, pl.Float64).alias("predicted_longitude"))


def test_frame_follows_the_template_and_passes_the_competition_check():
    classes = np.array([4, 9, 18, 31, 42, 45])
    class_top5 = np.array([[0, 1, 2, 3, 4], [5, 4, 3, 2, 1], [2, 0, 1, -1, -1]])
    top5 = class_ids_to_state_idx(class_top5, classes)
    assert top5[2].tolist() == [18, 4, 9, -1, -1]
    frame = to_submission_frame(np.array([12, 10, 11]), top5, [40.0, 35.5, 44.1], [-75.0, -100.0, -70.2], template([10, 11, 12]))
    assert frame["sample_id"].to_list() == [10, 11, 12]
    assert frame["predicted_state_idx_1"].to_list() == [45, 18, 4]
    assert frame["predicted_latitude"].to_list() == [35.5, 44.1, 40.0]
    assert frame.columns[:5] == ["sample_id", "image_north", "image_east", "image_south", "image_west"]


def test_fewer_than_five_guesses_are_padded_with_no_prediction():
    frame = to_submission_frame(np.array([1]), np.array([[7]]), [40.0], [-90.0], template([1]))
    assert frame.row(0, named=True)["predicted_state_idx_5"] == -1


def test_missing_or_foreign_locations_are_refused():
    with pytest.raises(ValueError, match="without a prediction"):
        to_submission_frame(np.array([1]), np.array([[3]]), [40.0], [-90.0], template([1, 2]))
    with pytest.raises(ValueError, match="repeat"):
        to_submission_frame(np.array([1, 1]), np.array([[3], [3]]), [40.0] * 2, [-90.0] * 2, template([1]))


def test_invalid_values_fail_the_competition_check():
    with pytest.raises(InputError, match="predicted_latitude"):
        to_submission_frame(np.array([1]), np.array([[3]]), [95.0], [-90.0], template([1]))
    with pytest.raises(InputError, match="predicted_state_idx_1"):
        to_submission_frame(np.array([1]), np.array([[50]]), [40.0], [-90.0], template([1]))
