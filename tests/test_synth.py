"""The synthetic dataset must match the competition's layout exactly, be deterministic, and be learnable."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geoscout.competition import VIEWS as DIRECTIONS
from geoscout.states import STATES, state_index
from geoscout.synth import SynthSummary, synthesize

GROUND_TRUTH_HEADER = [
    "sample_id", "image_north", "image_east", "image_south", "image_west",
    "state", "state_idx", "latitude", "longitude",
]
SUBMISSION_HEADER = [
    "sample_id", "image_north", "image_east", "image_south", "image_west",
    "predicted_state_idx_1", "predicted_state_idx_2", "predicted_state_idx_3",
    "predicted_state_idx_4", "predicted_state_idx_5", "predicted_latitude", "predicted_longitude",
]
# (lat_min, lat_max, lon_min, lon_max), padded by ~0.5 degree for the few-km jitter.
US_BOXES = (
    (24.0, 50.0, -125.5, -66.5),  # conterminous states
    (51.0, 72.0, -180.0, -129.5),  # Alaska
    (18.5, 22.8, -160.8, -154.3),  # Hawaii
)


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    return synthesize(tmp_path_factory.mktemp("synth"), n_train=40, n_test=12, seed=3, progress=False)


def test_layout_and_summary(small: SynthSummary) -> None:
    names = {p.name for p in small.out_dir.iterdir()}
    assert names == {
        "train_images", "test_images", "train_ground_truth.csv", "test_ground_truth.csv",
        "sample_submission.csv", "state_mapping.csv",
    }
    assert (small.n_train, small.n_test, small.n_images) == (40, 12, 208)
    assert len(list((small.out_dir / "train_images").iterdir())) == 160
    assert len(list((small.out_dir / "test_images").iterdir())) == 48


@pytest.mark.parametrize("split", ["train", "test"])
def test_ground_truth_rows(small: SynthSummary, split: str) -> None:
    header, rows = read_csv(small.out_dir / f"{split}_ground_truth.csv")
    assert header == GROUND_TRUTH_HEADER
    first_id = 0 if split == "train" else small.n_train  # test ids continue after train's
    assert [int(r["sample_id"]) for r in rows] == list(range(first_id, first_id + len(rows)))
    for row in rows:
        sid = int(row["sample_id"])
        for direction in DIRECTIONS:
            name = row[f"image_{direction}"]
            assert name == f"img_{sid:06d}_{direction}.jpg"
            with Image.open(small.out_dir / f"{split}_images" / name) as image:
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (256, 256))
        assert state_index(row["state"]) == int(row["state_idx"])
        for key in ("latitude", "longitude"):
            assert len(row[key].split(".")[1]) == 6
        lat, lon = float(row["latitude"]), float(row["longitude"])
        assert any(a <= lat <= b and c <= lon <= d for a, b, c, d in US_BOXES), (lat, lon)


def test_state_mapping(small: SynthSummary) -> None:
    header, rows = read_csv(small.state_mapping_csv)
    assert header == ["state_idx", "state"]
    indices = [int(r["state_idx"]) for r in rows]
    assert indices == sorted(set(indices))
    assert all(STATES[int(r["state_idx"])] == r["state"] for r in rows)
    occurring = {int(r["state_idx"]) for split in ("train", "test") for r in read_csv(small.out_dir / f"{split}_ground_truth.csv")[1]}
    assert set(indices) == occurring
    assert small.states == tuple(r["state"] for r in rows)


def test_sample_submission_is_a_valid_template(small: SynthSummary) -> None:
    header, rows = read_csv(small.sample_submission_csv)
    assert header == SUBMISSION_HEADER
    _, test_rows = read_csv(small.test_csv)
    image_cols = header[:5]
    assert [[r[c] for c in image_cols] for r in rows] == [[r[c] for c in image_cols] for r in test_rows]
    for row in rows:
        assert 0 <= int(row["predicted_state_idx_1"]) < len(STATES)
        assert all(-1 <= int(row[f"predicted_state_idx_{k}"]) < len(STATES) for k in range(2, 6))
        assert -90 <= float(row["predicted_latitude"]) <= 90
        assert -180 <= float(row["predicted_longitude"]) <= 180


def test_n_states_is_honoured(tmp_path: Path) -> None:
    summary = synthesize(tmp_path, n_train=30, n_test=4, n_states=5, progress=False)
    _, rows = read_csv(summary.train_csv)
    assert len({r["state"] for r in rows}) == 5
    assert len(summary.states) == 5
    with pytest.raises(ValueError):
        synthesize(tmp_path, n_train=1, n_test=1, n_states=51, progress=False)


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    digests = [
        tree_digest(synthesize(tmp_path / name, n_train=6, n_test=3, seed=seed, progress=False).out_dir)
        for name, seed in (("a", 7), ("b", 7), ("c", 8))
    ]
    assert digests[0] == digests[1]
    assert digests[0]["train_ground_truth.csv"] != digests[2]["train_ground_truth.csv"]
    assert digests[0]["train_images/img_000000_north.jpg"] != digests[2]["train_images/img_000000_north.jpg"]


def test_views_are_learnable(tmp_path: Path) -> None:
    """Mean colours of the sky and ground halves of the four views already tell the state."""
    from sklearn.linear_model import LogisticRegression

    summary = synthesize(tmp_path, n_train=200, n_test=0, n_states=5, seed=1, progress=False)
    _, rows = read_csv(summary.train_csv)
    features, labels = [], []
    for row in rows:
        views = [np.asarray(Image.open(tmp_path / "train_images" / row[f"image_{d}"]), dtype=np.float32) for d in DIRECTIONS]
        features.append(np.concatenate([[v[:128].mean((0, 1)), v[128:].mean((0, 1))] for v in views]).ravel() / 255)
        labels.append(int(row["state_idx"]))
    x, y = np.array(features), np.array(labels)
    model = LogisticRegression(max_iter=2000).fit(x[:150], y[:150])
    majority = max(np.mean(y[150:] == s) for s in set(y))
    accuracy = model.score(x[150:], y[150:])
    assert accuracy >= max(0.8, majority + 0.3), (accuracy, majority)
