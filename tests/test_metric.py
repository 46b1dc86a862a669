import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from geoscout.cli import app
from geoscout.geo import haversine_km
from geoscout.metric import METRIC_KEYS, classification_points, score_predictions

runner = CliRunner()


def write(path, text):
    path.write_text(text)
    return path


def test_classification_weights_by_position_and_repeats():
    truth = np.array([5, 5, 5, 5, 5, 5, 5, 5])
    top5 = np.array([
        [5, 1, 2, 3, 4],    # position 1 -> 1.00
        [1, 5, 2, 3, 4],    # position 2 -> 0.60
        [1, 2, 5, 3, 4],    # 0.40
        [1, 2, 3, 5, 4],    # 0.25
        [1, 2, 3, 4, 5],    # 0.15
        [1, 2, 3, 4, 6],    # none -> 0
        [5, 5, 5, 5, 5],    # repeats earn nothing more -> 1.00
        [1, 1, 5, -1, -1],  # a repeated wrong state still holds its position -> 0.40
    ])
    np.testing.assert_allclose(classification_points(truth, top5), [1, 0.6, 0.4, 0.25, 0.15, 0, 1, 0.4])


def test_score_is_point7_classification_plus_point3_gps():
    truth_idx = np.array([3, 7])
    top5 = np.array([[3, -1, -1, -1, -1], [1, 7, -1, -1, -1]])
    lat_t, lon_t = np.array([40.0, 30.0]), np.array([-100.0, -90.0])
    lat_p, lon_p = np.array([40.0, 31.0]), np.array([-100.0, -90.0])
    r = score_predictions(truth_idx, lat_t, lon_t, top5, lat_p, lon_p)
    km = haversine_km(30, -90, 31, -90)
    assert tuple(r) == METRIC_KEYS
    assert r["classification_score"] == pytest.approx(0.8)
    assert r["mean_km"] == pytest.approx(km / 2)
    assert r["median_km"] == pytest.approx(km / 2)
    assert r["gps_score"] == pytest.approx(1 - km / 2 / 5000)
    assert r["score"] == pytest.approx(0.7 * 0.8 + 0.3 * (1 - km / 2 / 5000))
    assert r["top1_accuracy"] == 0.5 and r["top5_accuracy"] == 1.0
    assert r["acc_1km"] == 0.5 and r["acc_200km"] == 1.0
    assert r["geoscore"] == pytest.approx((5000 + 5000 * math.exp(-km / 1492.7)) / 2)
    assert r["n"] == 2


def test_gps_score_floors_at_zero():
    r = score_predictions(np.array([0]), [40.0], [-100.0], np.array([[0, -1, -1, -1, -1]]), [-40.0], [80.0])
    assert r["mean_km"] > 5000 and r["gps_score"] == 0.0 and r["score"] == pytest.approx(0.7)


TRUTH = """sample_id,state_idx,latitude,longitude,extra
0,4,36.0,-119.0,x
1,42,31.0,-99.0,y
2,31,43.0,-75.0,z
"""


def test_score_command_end_to_end_with_empty_and_minus_one(tmp_path):
    truth = write(tmp_path / "truth.csv", TRUTH)
    # column order differs from the template; empty and -1 allowed in positions 2..5
    sub = write(tmp_path / "sub.csv", (
        "predicted_latitude,predicted_longitude,sample_id,predicted_state_idx_1,predicted_state_idx_2,"
        "predicted_state_idx_3,predicted_state_idx_4,predicted_state_idx_5\n"
        "36.0,-119.0,0,4,,,,\n"
        "31.0,-100.0,1,4,42,-1,,\n"
        "43.0,-75.0,2,0,1,2,3,31\n"
    ))
    result = runner.invoke(app, ["score", str(truth), str(sub), "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert list(r) == list(METRIC_KEYS)
    km = haversine_km(31, -99, 31, -100)
    assert r["classification_score"] == pytest.approx((1 + 0.6 + 0.15) / 3)
    assert r["mean_km"] == pytest.approx(km / 3)
    assert r["score"] == pytest.approx(0.7 * (1.75 / 3) + 0.3 * (1 - km / 3 / 5000))
    text = runner.invoke(app, ["score", str(truth), str(sub)])
    assert text.exit_code == 0 and "classification_score" in text.stdout


@pytest.mark.parametrize("body, needle", [
    ("sample_id,predicted_state_idx_1,predicted_latitude\n0,4,36\n1,4,36\n2,4,36\n", "missing required column 'predicted_longitude'"),
    ("", "empty"),
    ("sample_id,predicted_state_idx_1,predicted_latitude,predicted_longitude\n0,4,36,-119\n1,4,36,-119\n", "have no row"),
    ("sample_id,predicted_state_idx_1,predicted_latitude,predicted_longitude\n0,4,36,-119\n1,4,36,-119\n2,4,1,1\n9,4,1,1\n", "not in the truth"),
    ("sample_id,predicted_state_idx_1,predicted_latitude,predicted_longitude\n0,4,36,-119\n0,4,36,-119\n1,4,1,1\n2,4,1,1\n", "duplicate sample_id"),
    ("sample_id,predicted_state_idx_1,predicted_latitude,predicted_longitude\n0,50,36,-119\n1,4,36,-119\n2,4,1,1\n", "column predicted_state_idx_1='50'"),
    ("sample_id,predicted_state_idx_1,predicted_latitude,predicted_longitude\n0,,36,-119\n1,4,36,-119\n2,4,1,1\n", "column predicted_state_idx_1=''"),
    ("sample_id,predicted_state_idx_1,predicted_state_idx_2,predicted_latitude,predicted_longitude\n0,4,-2,36,-119\n1,4,,36,-119\n2,4,,1,1\n", "column predicted_state_idx_2='-2'"),
    ("sample_id,predicted_state_idx_1,predicted_latitude,predicted_longitude\n0,4,91,-119\n1,4,36,-119\n2,4,1,1\n", "column predicted_latitude='91'"),
    ("sample_id,predicted_state_idx_1,predicted_latitude,predicted_longitude\n0,4,36,-181\n1,4,36,-119\n2,4,1,1\n", "column predicted_longitude='-181'"),
    ("sample_id,predicted_state_idx_1,predicted_latitude,predicted_longitude\n0,4,nan,-119\n1,4,36,-119\n2,4,1,1\n", "column predicted_latitude='nan'"),
])
def test_bad_submissions_are_refused_naming_the_culprit(tmp_path, body, needle):
    truth = write(tmp_path / "truth.csv", TRUTH)
    sub = write(tmp_path / "sub.csv", body)
    result = runner.invoke(app, ["score", str(truth), str(sub)])
    assert result.exit_code == 1
    assert needle in result.stderr
    if needle.startswith("column"):  # these are all on the first data row: editor line 2
        assert f"sub.csv:2 sample_id=0 {needle}" in result.stderr


def test_bad_truth_is_refused(tmp_path):
    truth = write(tmp_path / "truth.csv", "sample_id,state_idx,latitude\n0,4,36\n")
    sub = write(tmp_path / "sub.csv", "sample_id,predicted_state_idx_1,predicted_latitude,predicted_longitude\n0,4,36,-119\n")
    result = runner.invoke(app, ["score", str(truth), str(sub)])
    assert result.exit_code == 1 and "missing required column 'longitude'" in result.stderr
