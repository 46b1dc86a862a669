"""`geoscout validate`: a good folder passes; every class of bad input is caught and named."""

import os

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from geoscout.cli import app
from geoscout.data import load_competition, validate_competition

runner = CliRunner()


def edit_csv(path, row, column, value):
    df = pl.read_csv(path, infer_schema=False)
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == row).then(pl.lit(value)).otherwise(pl.col(column)).alias(column))
    df.write_csv(path)


def validate(data_dir):
    return runner.invoke(app, ["validate", str(data_dir), "--workers", "2"])


def test_synth_folder_validates(synth_dir):
    result = validate(synth_dir)
    assert result.exit_code == 0, result.output
    assert "train: 40 locations, 160 images" in result.stdout
    assert "test:  12 locations, 48 images" in result.stdout
    assert "ok: no problems found" in result.stdout


def test_class_map_round_trip(synth_dir):
    comp = load_competition(synth_dir)
    classes = comp.classes
    assert len(classes) == len(np.unique(comp.train.state_idx))
    ids = classes.to_class(comp.train.state_idx)
    assert ids.min() == 0 and ids.max() == len(classes) - 1
    np.testing.assert_array_equal(classes.to_state_idx(ids), comp.train.state_idx)
    assert classes.to_state_idx(np.array([-1]))[0] == -1
    with pytest.raises(ValueError, match="not among the training classes"):
        classes.to_class(np.array([49 if 49 not in classes.state_idx else 1]))


TRAIN = "train_ground_truth.csv"


@pytest.mark.parametrize("column, value, needle", [
    ("latitude", "nan", "column latitude='nan'"),
    ("latitude", "91.5", "column latitude='91.5'"),
    ("longitude", "-200", "column longitude='-200'"),
    ("longitude", "", "column longitude=''"),
    ("state_idx", "50", "column state_idx='50'"),
    ("state", "Narnia", "column state='Narnia': state disagrees with state_idx"),
    ("sample_id", "abc", "column sample_id='abc'"),
    ("image_north", "/etc/passwd", "absolute path"),
    ("image_east", "../../secret.jpg", "contains '..'"),
    ("image_south", "img\x00.jpg", "NUL byte"),
])
def test_bad_csv_values_are_named(synth_dir, column, value, needle):
    edit_csv(synth_dir / TRAIN, 3, column, value)
    result = validate(synth_dir)
    assert result.exit_code == 1
    assert f"{TRAIN}:5" in result.stderr  # data row 3 is editor line 5
    assert needle in result.stderr


def test_unknown_state_idx_not_in_mapping(synth_dir):
    comp = load_competition(synth_dir)
    absent = next(i for i in range(50) if i not in set(comp.train.state_idx.tolist()) | set(pl.read_csv(synth_dir / "state_mapping.csv")["state_idx"].to_list()))
    from geoscout.states import STATES
    edit_csv(synth_dir / TRAIN, 0, "state_idx", str(absent))
    edit_csv(synth_dir / TRAIN, 0, "state", STATES[absent])
    result = validate(synth_dir)
    assert result.exit_code == 1 and f"state_idx {absent} is not in state_mapping.csv" in result.stderr


def test_mapping_disagreeing_with_alphabetical_table(synth_dir):
    edit_csv(synth_dir / "state_mapping.csv", 0, "state", "Texas")
    result = validate(synth_dir)
    assert result.exit_code == 1 and "state_mapping.csv:2" in result.stderr and "alphabetical" in result.stderr


def test_duplicate_sample_id(synth_dir):
    first = pl.read_csv(synth_dir / TRAIN)["sample_id"][0]
    edit_csv(synth_dir / TRAIN, 2, "sample_id", str(first))
    result = validate(synth_dir)
    assert result.exit_code == 1 and f"sample_id={first} column sample_id='{first}': duplicate sample_id (first at line 2)" in result.stderr


def test_missing_column_and_empty_csv(synth_dir):
    pl.read_csv(synth_dir / TRAIN).drop("latitude").write_csv(synth_dir / TRAIN)
    (synth_dir / "sample_submission.csv").write_text("")
    result = validate(synth_dir)
    assert result.exit_code == 1
    assert "missing required column 'latitude'" in result.stderr
    assert "sample_submission.csv: the CSV is empty" in result.stderr


def test_header_only_csv(synth_dir):
    (synth_dir / TRAIN).write_text((synth_dir / TRAIN).read_text().splitlines()[0] + "\n")
    result = validate(synth_dir)
    assert result.exit_code == 1 and "header but no rows" in result.stderr


def image(synth_dir, row=1, column="image_west"):
    name = pl.read_csv(synth_dir / TRAIN)[column][row]
    return synth_dir / "train_images" / name


@pytest.mark.parametrize("damage, needle", [
    (lambda p: p.unlink(), "image file not found"),
    (lambda p: p.write_bytes(b""), "empty (0 bytes)"),
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[:-2]), "truncated"),
    (lambda p: p.write_bytes(b"hello, not an image at all" * 20), "not an image"),
])
def test_bad_image_files_are_named(synth_dir, damage, needle):
    path = image(synth_dir)
    damage(path)
    result = validate(synth_dir)
    assert result.exit_code == 1
    assert f"{TRAIN}:3" in result.stderr and f"column image_west='{path.name}'" in result.stderr
    assert needle in result.stderr


def test_a_decompression_bomb_is_a_bad_image_not_a_crash(synth_dir, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 256 * 256 // 2 - 1)  # PIL raises above twice its limit
    result = validate(synth_dir)
    assert result.exit_code == 1 and "too large to decode safely" in result.stderr and TRAIN in result.stderr


def test_png_named_jpg_is_not_a_jpeg(synth_dir):
    from PIL import Image

    path = image(synth_dir)
    Image.new("RGB", (256, 256)).save(path, format="PNG")
    result = validate(synth_dir)
    assert result.exit_code == 1 and "not a JPEG (found PNG)" in result.stderr


def test_symlink_escaping_the_images_folder(synth_dir, tmp_path):
    path = image(synth_dir)
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(path.read_bytes())
    path.unlink()
    os.symlink(outside, path)
    result = validate(synth_dir)
    assert result.exit_code == 1 and "resolves outside the images folder" in result.stderr


def test_every_problem_is_listed_not_only_the_first(synth_dir):
    image(synth_dir, row=0, column="image_north").unlink()
    image(synth_dir, row=2, column="image_south").write_bytes(b"")
    report = validate_competition(synth_dir, workers=2, progress=False)
    assert len(report.problems) == 2
