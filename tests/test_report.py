"""The run report: a self-contained HTML page built from a fake WORK_DIR that follows the run contract."""

import json
import shutil
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from geoscout.errors import GeoscoutError
from geoscout.geo import haversine_km
from geoscout.metric import METRIC_KEYS, score_predictions
from geoscout.report import build_report, image_paths
from geoscout.states import STATES

N_VAL = 16
PLOT_FILES = ("map.png", "error_cdf.png", "confusion.png", "per_state.png", "alpha_curve.png")
SECTIONS = {
    "scores": "Scores", "map": "Map", "cdf": "CDF", "confusion": "confusion",
    "per-state": "Per-state", "alpha": "α", "worst": "worst",
}
PLOT_SECTIONS = ("map", "cdf", "confusion", "per-state", "alpha")


# ---------------------------------------------------------------- fixture: a WORK_DIR as `geoscout run` leaves it


def fake_predictions(train: pl.DataFrame) -> pl.DataFrame:
    """The first N_VAL training rows as validation: most right, a few in the wrong state, one wild guess in Alaska."""
    rng = np.random.default_rng(0)
    val = train.head(N_VAL)
    truth = val["state_idx"].to_numpy()
    lat, lon = val["latitude"].to_numpy(), val["longitude"].to_numpy()
    others = sorted(set(train["state_idx"].to_list()))
    pred_state = truth.copy()
    pred_lat, pred_lon = lat + rng.normal(0, 0.3, N_VAL), lon + rng.normal(0, 0.3, N_VAL)
    for i in (1, 4, 7, 10):  # wrong state: take the position of a training row of another state
        j = int(np.flatnonzero(train["state_idx"].to_numpy() != truth[i])[i])
        pred_state[i], pred_lat[i], pred_lon[i] = train["state_idx"][j], train["latitude"][j], train["longitude"][j]
    pred_lat[12], pred_lon[12] = 61.2, -149.9  # Anchorage: exercises the Alaska inset
    top5 = np.array([[p, *[s for s in others if s != p][:3], -1] for p in pred_state])
    columns = {
        "sample_id": val["sample_id"].cast(pl.Utf8), "true_state_idx": truth,
        "true_latitude": lat, "true_longitude": lon,
        **{f"pred_state_idx_{k + 1}": top5[:, k] for k in range(5)},
        "pred_latitude": pred_lat, "pred_longitude": pred_lon,
        "km": haversine_km(lat, lon, pred_lat, pred_lon),
    }
    return pl.DataFrame(columns)


def scores_for(val: pl.DataFrame, shift_km: float) -> dict:
    top5 = val.select([f"pred_state_idx_{k}" for k in range(1, 6)]).to_numpy()
    return score_predictions(
        val["true_state_idx"].to_numpy(), val["true_latitude"].to_numpy(), val["true_longitude"].to_numpy(),
        top5, val["pred_latitude"].to_numpy() + shift_km / 111.0, val["pred_longitude"].to_numpy(),
    )


def fake_scores(val: pl.DataFrame) -> dict:
    models = ["classifier-tiny-clip-random", "classifier-tiny-convnext-random", "ensemble"]
    scores = {f"{preset}/{m}": scores_for(val, shift) for preset in ("default", "seed")
              for m, shift in zip(models, (80.0, 40.0, 0.0))}
    scores["baseline"] = scores_for(val, 900.0)
    return scores


def fake_alpha_curve() -> dict:
    alphas = np.linspace(0, 1, 11)
    curve = [{"alpha": float(a), "score": 0.6 + 0.1 * a * (1 - a), "classification_score": 0.55 + 0.1 * a * (1 - a),
              "gps_score": 0.7 + 0.02 * a} for a in alphas]
    return {"chosen_alpha": 0.5, "curve": curve}


def write_work_dir(work: Path, data_dir: Path) -> Path:
    train = pl.read_csv(data_dir / "train_ground_truth.csv").select("sample_id", "state_idx", "latitude", "longitude")
    (work / "eval").mkdir(parents=True)
    (work / "store").mkdir()
    train.with_columns(pl.col("state_idx").alias("class_id")).select(
        "sample_id", "state_idx", "class_id", "latitude", "longitude").write_csv(work / "store" / "train.samples.csv")
    val = fake_predictions(train)
    val.write_csv(work / "eval" / "val_predictions.csv")
    (work / "eval" / "scores.json").write_text(json.dumps(fake_scores(val)))
    (work / "eval" / "alpha_curve.json").write_text(json.dumps(fake_alpha_curve()))
    run = {"data_dir": str(data_dir), "synthetic": True, "random_backbones": True,
           "backbones": ["tiny-clip-random", "tiny-convnext-random"], "presets": ["default", "seed"],
           "final_model": "default/ensemble"}
    (work / "run.json").write_text(json.dumps(run))
    return work


@pytest.fixture(scope="module")
def full_report(synth_master, tmp_path_factory) -> Path:
    work = write_work_dir(tmp_path_factory.mktemp("full") / "work", synth_master)
    return build_report(work)


@pytest.fixture(scope="module")
def degraded_report(synth_master, tmp_path_factory) -> Path:
    """No alpha curve, no seed preset, no training samples, and one image of the worst error missing."""
    root = tmp_path_factory.mktemp("degraded")
    data_dir = Path(shutil.copytree(synth_master, root / "data"))
    work = write_work_dir(root / "work", data_dir)
    (work / "eval" / "alpha_curve.json").unlink()
    (work / "store" / "train.samples.csv").unlink()
    scores = json.loads((work / "eval" / "scores.json").read_text())
    (work / "eval" / "scores.json").write_text(json.dumps({k: v for k, v in scores.items() if not k.startswith("seed/")}))
    worst = pl.read_csv(work / "eval" / "val_predictions.csv").sort("km", descending=True)["sample_id"][0]
    (data_dir / "train_images" / f"img_{worst:06d}_east.jpg").unlink()
    return build_report(work)


# ---------------------------------------------------------------- parsing the page


class PageParser(HTMLParser):
    """Collects per section: heading text, <img> sources, and the scores table's rows and metric columns."""

    def __init__(self):
        super().__init__()
        self.section, self.in_h2 = None, False
        self.headings, self.images, self.svgs = {}, {}, {}
        self.model_rows, self.metric_columns, self.all_src = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.section = attrs["id"]
            self.images[self.section], self.svgs[self.section] = [], 0
        elif tag == "h2":
            self.in_h2 = True
        elif tag == "img":
            self.images[self.section].append(attrs["src"])
        elif tag == "svg":
            self.svgs[self.section] += 1
        elif tag == "tr" and "data-model" in attrs:
            self.model_rows.append(attrs["data-model"])
        elif tag == "th" and "data-metric" in attrs:
            self.metric_columns.append(attrs["data-metric"])
        if "src" in attrs or "href" in attrs:
            self.all_src.append(attrs.get("src") or attrs.get("href"))

    def handle_endtag(self, tag):
        self.in_h2 = self.in_h2 and tag != "h2"

    def handle_data(self, data):
        if self.in_h2:
            self.headings[self.section] = self.headings.get(self.section, "") + data


def parse(page: Path) -> PageParser:
    parser = PageParser()
    parser.feed(page.read_text(encoding="utf-8"))
    parser.close()
    return parser


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# ---------------------------------------------------------------- tests


def test_page_is_self_contained(full_report):
    text = full_report.read_text(encoding="utf-8")
    assert full_report == full_report.parent.parent / "report" / "index.html"
    assert "http://" not in text and "https://" not in text
    sources = parse(full_report).all_src
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)


def test_page_has_every_section_with_one_plot_each(full_report):
    page = parse(full_report)
    for anchor, words in SECTIONS.items():
        assert words.lower() in page.headings[anchor].lower()
    for anchor in PLOT_SECTIONS:
        assert len(page.images[anchor]) + page.svgs[anchor] == 1, anchor


def test_scores_table_has_every_model_and_metric(full_report):
    page = parse(full_report)
    scores = json.loads((full_report.parent.parent / "eval" / "scores.json").read_text())
    assert sorted(page.model_rows) == sorted(scores)
    assert tuple(page.metric_columns) == METRIC_KEYS
    # Presets of one model side by side.
    ensemble_rows = [i for i, key in enumerate(page.model_rows) if key.endswith("/ensemble")]
    assert ensemble_rows == [ensemble_rows[0], ensemble_rows[0] + 1]


def test_page_states_synthetic_data_and_random_backbones(full_report):
    text = full_report.read_text(encoding="utf-8")
    assert "Synthetic data" in text and "Random backbones" in text


def test_plot_files_are_sensible_pngs(full_report):
    for name in PLOT_FILES:
        width, height = png_size(full_report.parent / name)
        assert 300 <= width <= 2500 and 200 <= height <= 3000, (name, width, height)


def test_worst_errors_show_thumbnails_and_state_names(full_report):
    page = parse(full_report)
    assert len(page.images["worst"]) == 8
    width, height = png_size(full_report.parent / "worst_01.png")
    assert (width, height) == (4 * 128, 128)
    val = pl.read_csv(full_report.parent.parent / "eval" / "val_predictions.csv")
    worst = val.sort("km", descending=True).row(0, named=True)
    text = full_report.read_text(encoding="utf-8")
    assert STATES[worst["true_state_idx"]] in text and f"{worst['km']:,.0f}" in text


def test_missing_optional_inputs_are_explained(degraded_report):
    page = parse(degraded_report)
    text = degraded_report.read_text(encoding="utf-8")
    assert page.images["alpha"] == [] and "alpha_curve.json" in text
    assert not (degraded_report.parent / "alpha_curve.png").exists()
    assert "Only the default preset was trained" in text
    assert "train.samples.csv" in text
    assert "1 image(s) could not be read" in text
    assert len(page.images["worst"]) == 8 and len(page.images["map"]) == 1


def test_missing_data_folder_skips_thumbnails(tmp_path):
    paths, why = image_paths({"data_dir": str(tmp_path / "gone")})
    assert paths == {} and "train_ground_truth.csv" in why
    assert image_paths({})[1] is not None


@pytest.mark.parametrize("name", ["eval/scores.json", "eval/val_predictions.csv"])
def test_missing_required_input_names_the_file(synth_master, tmp_path, name):
    work = write_work_dir(tmp_path / "work", synth_master)
    (work / name).unlink()
    with pytest.raises(FileNotFoundError, match=Path(name).name):
        build_report(work)


def test_val_predictions_without_a_column_is_an_error(synth_master, tmp_path):
    work = write_work_dir(tmp_path / "work", synth_master)
    csv = work / "eval" / "val_predictions.csv"
    pl.read_csv(csv).drop("km").write_csv(csv)
    with pytest.raises(GeoscoutError, match="km"):
        build_report(work)


def test_an_ablation_table_gets_its_own_section(synth_master, tmp_path):
    work = write_work_dir(tmp_path / "work", synth_master)
    metric = {k: {"mean": 0.5, "std": 0.01} for k in ("score", "classification_score", "gps_score", "mean_km", "median_km")}
    ablation = {"seeds": 3, "backbones": ["tiny-clip-random", "tiny-convnext-random"], "n_validation": 30, "n_test": None,
                "recipes": [{"name": name, "validation": metric} for name in ("seed", "default - geocells")]}
    (work / "eval" / "ablation.json").write_text(json.dumps(ablation))
    page = parse(build_report(work))
    assert "Ablation" in page.headings["ablation"]
    text = (work / "report" / "index.html").read_text(encoding="utf-8")
    assert "default - geocells" in text and "validation (30 locations)" in text
    assert "ablation" not in parse(build_report(write_work_dir(tmp_path / "plain", synth_master))).headings
