"""`geoscout locate`: copies of a test location's four files give that location's submission row; the
embedding is bitwise the store's; the radii, neighbours, outputs and card; and the refusals (other
weights, bad files)."""

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from geoscout.card import GID_ANSWER, GID_CELLS, card_html, map_figure
from geoscout.cli import app
from geoscout.competition import IMAGE_COLUMNS, PRED_STATE_COLUMNS
from geoscout.drawing import GID_BORDERS
from geoscout.extract.runner import extract
from geoscout.extract.weights import WeightsError
from geoscout.geo import haversine_km
from geoscout.heads.checkpoint import CheckpointError
from geoscout.heads.presets import with_changes
from geoscout.heads.training import TrainConfig
from geoscout.images import ImageError
from geoscout.locate import Locator, locate, locate_csv, parse_views, probability_radii
from geoscout.problems import InputError
from geoscout.run import RunConfig, run_pipeline
from geoscout.store.reader import read_split
from geoscout.synth import synthesize

runner = CliRunner()
BACKBONES = ["tiny-clip", "tiny-convnext"]
QUICK = TrainConfig(max_epochs=2, min_steps=20, patience=1)
BROKEN_ROW, BROKEN_VIEW = 1, 2  # a test location whose south view is a truncated JPEG


def quick_recipe(original):
    """The preset's classifiers on a small training budget, with every part `locate` must reproduce switched
    on: geocells, the regressor, expected-distance decoding and retrieval (so the gallery is needed)."""

    def recipe(self, preset):
        base = original(self, preset)
        return with_changes(base, base.name, kinds=("classifier",),
                            member={"train": QUICK, "geocells": 12, "min_cell_rows": 4},
                            ensemble={"regressor": "on"}, regressor={"train": QUICK},
                            decode={"candidates": (8,), "retrieval_weights": (0.5,), "retrieval_k": 8})
    return recipe


@dataclass
class FinishedRun:
    data: Path
    work: Path
    rows: list[dict]  # of its submission.csv
    broken: int  # the sample_id whose BROKEN_VIEW the run masked

    def views(self, row: dict, folder: Path) -> list[str]:
        """Copies of a test location's four files under other names; '-' for the view the run masked."""
        folder.mkdir(parents=True, exist_ok=True)
        views = []
        for v, column in enumerate(IMAGE_COLUMNS):
            copy = folder / f"location{row['sample_id']}_{v}.jpg"
            if row["sample_id"] == self.broken and v == BROKEN_VIEW:
                views.append("-")
            else:
                views.append(str(shutil.copyfile(self.data / "test_images" / row[column], copy)))
        return views


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> FinishedRun:
    """A small run with --flip and --bad-images mask, one test view a truncated JPEG."""
    root = tmp_path_factory.mktemp("locate")
    data = root / "data"
    synthesize(data, n_train=80, n_test=6, n_states=4, seed=0, progress=False)
    test = pl.read_csv(data / "sample_submission.csv")
    broken = data / "test_images" / test[IMAGE_COLUMNS[BROKEN_VIEW]][BROKEN_ROW]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunConfig, "recipe", quick_recipe(RunConfig.recipe))
        config = RunConfig(data_dir=data, work_dir=root / "work", backbones=BACKBONES, device="cpu", folds=3, workers=0,
                           bad_images="mask", flip=True)
        result = run_pipeline(config, progress=False, log=lambda _: None)
    record = json.loads((root / "work" / "heads" / "default" / "ensemble" / "ensemble.json").read_text())
    assert record["regressor"] and record["decode"]["retrieval_weight"] > 0  # locate must bring the gallery
    return FinishedRun(data, root / "work", list(pl.read_csv(result.submission).iter_rows(named=True)),
                       int(test["sample_id"][BROKEN_ROW]))


def assert_same_answer(state_idx: list[int], lat: float, lon: float, row: dict) -> None:
    want = [row[c] for c in PRED_STATE_COLUMNS]
    assert state_idx + [-1] * (5 - len(state_idx)) == want, (state_idx, want)
    # the submission keeps 6 decimals
    assert abs(lat - row["predicted_latitude"]) < 1e-4 and abs(lon - row["predicted_longitude"]) < 1e-4


def test_locate_gives_each_test_location_its_submission_row(run, tmp_path):
    rows, work = run.rows, run.work
    views = {row["sample_id"]: run.views(row, tmp_path / "copies") for row in rows}
    assert "-" in views[run.broken]  # the run masked that view: locate is told it is missing
    for row in rows[:2]:  # the library function, one location per call, with and without a missing view
        found = locate(work, views[row["sample_id"]], top=5)
        assert_same_answer([s.state_idx for s in found.states], found.latitude, found.longitude, row)
    # the competition's own list of test locations, read as a locations CSV, names the view the run masked
    with pytest.raises(InputError) as refused:
        locate_csv(work, run.data / "sample_submission.csv", images_dir=run.data / "test_images")
    [problem] = refused.value.problems
    assert (problem.line, problem.column) == (BROKEN_ROW + 2, IMAGE_COLUMNS[BROKEN_VIEW])  # + 2: the header, 1-based
    assert "truncated" in problem.message
    csv = tmp_path / "locations.csv"  # paths relative to its folder
    relative = [[v if v == "-" else str(Path(v).relative_to(tmp_path)) for v in vs] for vs in views.values()]
    pl.DataFrame({"sample_id": list(views), **{c: [v[i] for v in relative] for i, c in enumerate(IMAGE_COLUMNS)}}
                 ).write_csv(csv)
    result = runner.invoke(app, ["locate", "--work", str(work), "--csv", str(csv), "--out", str(tmp_path / "out.csv")])
    assert result.exit_code == 0, result.output
    written = pl.read_csv(tmp_path / "out.csv")
    assert written["sample_id"].to_list() == [row["sample_id"] for row in rows]
    for got, row in zip(written.iter_rows(named=True), rows):  # every location, in batches
        assert_same_answer([got[c] for c in PRED_STATE_COLUMNS if got[c] != -1], got["predicted_latitude"],
                           got["predicted_longitude"], row)


def test_the_embedding_is_bitwise_what_the_store_holds(run, tmp_path):
    locator = Locator(run.work)
    locator.flip = True  # whatever the ensemble chose, the mirrored views must come out as extract stored them
    features = locator.embed([parse_views(run.views(row, tmp_path)) for row in run.rows])
    store = read_split(run.work / "store", "test", locator.backbones)
    assert store.sample_id.tolist() == [row["sample_id"] for row in run.rows]
    for name in locator.backbones:
        assert np.array_equal(features.features[name], store.features[name])
        assert np.array_equal(features.flipped[name], store.flipped[name])
        assert np.array_equal(features.masks[name], store.masks[name])
    assert not features.masks[locator.backbones[0]][BROKEN_ROW, BROKEN_VIEW]  # the truncated view, masked by both
    assert features.backbone_fingerprints == store.backbone_fingerprints


def test_json_table_and_card(run, tmp_path):
    data, work = run.data, run.work
    views = run.views(run.rows[0], tmp_path / "copies")
    card = tmp_path / "card" / "where.html"
    result = runner.invoke(app, ["locate", "--work", str(work), *views, "--json", "--top", "3", "--html", str(card)])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert [s["rank"] for s in answer["states"]] == [1, 2, 3]
    probabilities = [s["probability"] for s in answer["states"]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-9
    assert answer["radius_km"]["50%"] <= answer["radius_km"]["90%"]
    neighbours = answer["neighbours"]
    assert len(neighbours) == 5 and [n["similarity"] for n in neighbours] == sorted(
        (n["similarity"] for n in neighbours), reverse=True)
    for n in neighbours:
        assert n["km"] == pytest.approx(float(haversine_km(answer["latitude"], answer["longitude"], n["latitude"],
                                                           n["longitude"])))
    train = pl.read_csv(data / "train_ground_truth.csv")
    first = train.filter(pl.col("sample_id") == neighbours[0]["sample_id"]).row(0, named=True)
    assert first["state_idx"] == neighbours[0]["state_idx"]
    assert first["latitude"] == pytest.approx(neighbours[0]["latitude"])
    assert first["longitude"] == pytest.approx(neighbours[0]["longitude"])
    assert card.exists() and "wrote" in result.stderr
    page = card.read_text()
    assert page.count("<img") == 6 and answer["states"][0]["state"] in page

    plain = runner.invoke(app, ["locate", "--work", str(work), *views])
    assert plain.exit_code == 0 and answer["states"][0]["state"] in plain.stdout and "90% within" in plain.stdout


def test_the_card_map_draws_the_answer_cells_and_borders(run, tmp_path):
    found = locate(run.work, run.views(run.rows[BROKEN_ROW], tmp_path))
    ax = map_figure(found).axes[0]
    gids = {c.get_gid(): c for c in ax.collections}
    assert GID_BORDERS in gids and GID_CELLS in gids
    assert np.allclose(gids[GID_ANSWER].get_offsets(), [[found.longitude, found.latitude]])
    assert "missing" in card_html(found)  # the masked view's tile


def test_probability_radii_are_the_smallest_circles_holding_the_share():
    # cells 0, ~111 and ~333 km north of the answer, holding 40%, 30% and 30% of the probability
    centroids = np.array([[40.0, -100.0], [41.0, -100.0], [43.0, -100.0]])
    logits = np.log([[0.4, 0.3, 0.3]])
    radii = probability_radii(logits, centroids, np.array([40.0]), np.array([-100.0]), shares=(0.4, 0.5, 0.7, 0.9))
    km = haversine_km(40.0, -100.0, centroids[:, 0], centroids[:, 1])
    assert radii[0].tolist() == pytest.approx([km[0], km[1], km[1], km[2]])


# ---------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def weighted_work(tmp_path_factory):
    """A run folder up to its store, with a backbone that loads weights from a file (no heads: the
    backbones are checked before the heads are read)."""
    root = tmp_path_factory.mktemp("weighted")
    data = root / "data"
    synthesize(data, n_train=4, n_test=2, n_states=2, seed=0, progress=False)
    files = {}
    for seed in (1, 2):
        torch.manual_seed(seed)
        files[seed] = root / f"convnext{seed}.safetensors"
        save_file(timm.create_model("test_convnext", num_classes=0).state_dict(), str(files[seed]))
    work = root / "work"
    config = RunConfig(data_dir=data, work_dir=work, backbones=["timm:test_convnext"], device="cpu",
                       weights={"timm:test_convnext": str(files[1])})
    extract(data, work / "store", backbones=config.backbones, weights=config.weights, splits=("train",), device="cpu",
            workers=0, progress=False)
    (work / "config.toml").write_text(config.to_toml())
    image = next((data / "train_images").iterdir())
    return work, files, image


def test_other_weights_are_refused_naming_the_backbone_and_both_fingerprints(weighted_work, tmp_path):
    work, files, image = weighted_work
    with h5py.File(work / "store" / "train.timm~test_convnext.h5") as f:
        stored = f.attrs["backbone_fingerprint"]
    with pytest.raises(WeightsError) as refused:
        locate(work, [image, "-", "-", "-"], weights={"timm:test_convnext": str(files[2])})
    message = str(refused.value)
    digests = [hashlib.sha256(files[s].read_bytes()).hexdigest()[:12] for s in (1, 2)]
    assert "'timm:test_convnext'" in message and stored in message and all(d in message for d in digests)
    # the run's own weights pass the check; this folder has no heads, which is the next thing said
    with pytest.raises(CheckpointError, match="ensemble"):
        locate(work, [image, "-", "-", "-"])
    # the file at the run's path replaced by other weights: refused as well
    moved = tmp_path / "convnext1.safetensors"
    shutil.copyfile(files[2], moved)
    result = runner.invoke(app, ["locate", "--work", str(work), str(image), "-", "-", "-",
                                 "--weights", f"timm:test_convnext={moved}"])
    assert result.exit_code == 1 and stored in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("damage, why", [
    ("missing", "image file not found"),
    ("png", "not a JPEG"),
    ("truncated", "truncated"),
    ("directory", "is a directory"),
])
def test_a_bad_image_is_one_line_naming_the_file(weighted_work, tmp_path, damage, why):
    work, _, image = weighted_work
    bad = tmp_path / "view.jpg"
    if damage == "png":
        from PIL import Image

        Image.new("RGB", (8, 8)).save(bad, format="PNG")
    elif damage == "truncated":
        bad.write_bytes(image.read_bytes()[:300])
    elif damage == "directory":
        bad.mkdir()
    with pytest.raises(ImageError, match=why):
        locate(work, [image, str(bad), "-", "-"])
    result = runner.invoke(app, ["locate", "--work", str(work), str(image), str(bad), "-", "-"])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and str(bad) in line and "east" in line and why in line


def test_the_views_must_be_four_and_not_all_missing(weighted_work):
    work, _, image = weighted_work
    for views, why in (([image, "-", "-"], "give 4 images"), (["-", "-", "-", "-"], "at least one")):
        result = runner.invoke(app, ["locate", "--work", str(work), *map(str, views)])
        assert result.exit_code == 1 and why in result.stderr


def test_a_locations_csv_lists_every_bad_row(weighted_work, tmp_path):
    work, _, image = weighted_work
    shutil.copyfile(image, tmp_path / "good.jpg")
    csv = tmp_path / "rows.csv"
    pl.DataFrame({"image_north": ["good.jpg", "nope.jpg", "-"], "image_east": ["-", str(tmp_path / "good.jpg"), ""],
                  "image_south": ["", "-", "-"], "image_west": ["-", "-", "-"]}).write_csv(csv)
    with pytest.raises(InputError) as listed:
        locate_csv(work, csv)
    problems = [str(p) for p in listed.value.problems]
    assert len(problems) == 2
    assert f"{csv}:3" in problems[0] and "image_north='nope.jpg'" in problems[0] and "not found" in problems[0]
    assert f"{csv}:4" in problems[1] and "at least one" in problems[1]
