"""The run report: a self-contained HTML page built from a fake WORK_DIR that follows the run contract.

The figures are checked for what they draw (markers at the right places, counts, bar lengths,
state borders), not only for being PNGs of some size.
"""

import json
import shutil
import struct
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from geoscout import report
from geoscout.borders import border_lines, state_outlines
from geoscout.errors import GeoscoutError
from geoscout.geo import haversine_km
from geoscout.metric import METRIC_KEYS, score_predictions
from geoscout.report import (
    GID_BORDERS,
    GID_ERRORS,
    GID_PRED,
    GID_TRUTH,
    INSETS,
    LOWER48,
    TEST_SPLIT_LABEL,
    build_report,
    confusion_figure,
    ensemble_figure,
    find_artist,
    load_inputs,
    map_figure,
    map_points,
    per_state_figure,
    per_state_stats,
    read_tile,
    state_confusion,
    train_images,
    worst_map_figure,
)
from geoscout.states import STATES

N_VAL = 16
PLOT_FILES = ("map.png", "error_cdf.png", "confusion.png", "per_state.png", "ensemble.png")
SECTIONS = {
    "scores": "Scores", "map": "Map", "cdf": "CDF", "confusion": "confusion",
    "per-state": "Per-state", "ensemble": "Ensemble members", "worst": "worst",
}
PLOT_SECTIONS = ("map", "cdf", "confusion", "per-state", "ensemble")
# The USA in plain lon/lat, Aleutians west of the 180th meridian included (see geoscout/borders.py).
US_LON, US_LAT = (-190.0, -66.0), (18.0, 72.0)


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


def fake_scores(val: pl.DataFrame, extra_km: float = 0.0) -> dict:
    models = ["classifier-tiny-clip-random", "classifier-tiny-convnext-random", "ensemble"]
    scores = {f"{preset}/{m}": scores_for(val, shift + extra_km) for preset in ("default", "seed")
              for m, shift in zip(models, (80.0, 40.0, 0.0))}
    scores["baseline"] = scores_for(val, 900.0 + extra_km)
    return scores


def fake_member(name: str, kind: str, weight: float, score: float) -> dict:
    return {"name": name, "kind": kind, "backbones": [name.split("-", 1)[1]], "weight": weight, "temperature": 1.2,
            "oof": {"score": score, "top1_accuracy": score - 0.1, "mean_km": 400 * (1 - score), "nll": 1 - score}}


def fake_ensemble(n_members: int = 3) -> dict:
    """Weights out of order on purpose: the section sorts them."""
    kinds = ("classifier", "probe")
    weights = np.random.default_rng(n_members).dirichlet(np.ones(n_members))
    members = [fake_member(f"{kinds[i % 2]}-backbone{i}", kinds[i % 2], round(float(w), 4), 0.80 + 0.02 * i)
               for i, w in enumerate(weights)]
    return {"members": members, "oof": {"score": 0.93, "top1_accuracy": 0.85, "mean_km": 30.0, "nll": 0.3},
            "regressor": True, "retrieval_weight": 0.25, "folds": 5,
            "flip_tta_note": "not available: the store has no mirrored views (extract with --flip)"}


def write_work_dir(work: Path, data_dir: Path) -> Path:
    """Everything a run writes, test-split scores and ensemble included."""
    train = pl.read_csv(data_dir / "train_ground_truth.csv").select("sample_id", "state_idx", "latitude", "longitude")
    (work / "eval").mkdir(parents=True)
    (work / "store").mkdir()
    train.with_columns(pl.col("state_idx").alias("class_id")).select(
        "sample_id", "state_idx", "class_id", "latitude", "longitude").write_csv(work / "store" / "train.samples.csv")
    val = fake_predictions(train)
    val.write_csv(work / "eval" / "val_predictions.csv")
    (work / "eval" / "scores.json").write_text(json.dumps(fake_scores(val)))
    (work / "eval" / "test_scores.json").write_text(json.dumps(fake_scores(val, extra_km=30.0)))
    (work / "eval" / "ensemble.json").write_text(json.dumps(fake_ensemble()))
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
    """No ensemble, no test scores, no seed preset, no training samples, and the worst error's east view missing."""
    root = tmp_path_factory.mktemp("degraded")
    data_dir = Path(shutil.copytree(synth_master, root / "data"))
    work = write_work_dir(root / "work", data_dir)
    for name in ("eval/ensemble.json", "eval/test_scores.json", "store/train.samples.csv"):
        (work / name).unlink()
    scores = json.loads((work / "eval" / "scores.json").read_text())
    (work / "eval" / "scores.json").write_text(json.dumps({k: v for k, v in scores.items() if not k.startswith("seed/")}))
    worst = pl.read_csv(work / "eval" / "val_predictions.csv").sort("km", descending=True)["sample_id"][0]
    (data_dir / "train_images" / f"img_{worst:06d}_east.jpg").unlink()
    return build_report(work)


@pytest.fixture(scope="module")
def full_inputs(full_report):
    return load_inputs(full_report.parent.parent)


# ---------------------------------------------------------------- parsing the page


class PageParser(HTMLParser):
    """Collects per section: heading text, <img> sources, and the tables' rows."""

    def __init__(self):
        super().__init__()
        self.section, self.in_h2 = None, False
        self.headings, self.images, self.svgs = {}, {}, {}
        self.score_rows, self.metric_columns, self.all_src, self.members = [], [], [], []

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
            self.score_rows.append((attrs["data-model"], attrs["data-split"]))
        elif tag == "tr" and "data-member" in attrs:
            self.members.append(attrs["data-member"])
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


def axes_with_gid(fig, gid: str):
    found = [ax for ax in fig.axes if ax.get_gid() == gid]
    assert len(found) == 1, [ax.get_gid() for ax in fig.axes]
    return found[0]


def points(ax, gid: str) -> np.ndarray:
    artist = find_artist(ax, gid)
    assert artist is not None, gid
    return np.asarray(artist.get_offsets())


def segments(ax, gid: str) -> list[np.ndarray]:
    artist = find_artist(ax, gid)
    assert artist is not None, gid
    return [np.asarray(s) for s in artist.get_segments()]


def same_points(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal as sets of rows (drawing order is free)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return a.shape == b.shape and np.allclose(a[np.lexsort(a.T[::-1])], b[np.lexsort(b.T[::-1])])


# ---------------------------------------------------------------- the page


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


def test_page_states_synthetic_data_and_random_backbones(full_report):
    text = full_report.read_text(encoding="utf-8")
    assert "Synthetic data" in text and "Random backbones" in text


def test_plot_files_are_pngs_with_something_drawn(full_report):
    for name in PLOT_FILES:
        width, height = png_size(full_report.parent / name)
        assert 300 <= width <= 2500 and 200 <= height <= 3000, (name, width, height)
        pixels = np.asarray(Image.open(full_report.parent / name).convert("L"))
        assert (pixels < 200).mean() > 0.01, f"{name} is nearly blank"


# ---------------------------------------------------------------- scores


def test_scores_table_has_every_model_and_metric_with_test_rows_under_validation(full_report):
    page = parse(full_report)
    eval_dir = full_report.parent.parent / "eval"
    scores = json.loads((eval_dir / "scores.json").read_text())
    test_scores = json.loads((eval_dir / "test_scores.json").read_text())
    rows = page.score_rows
    assert sorted(m for m, split in rows if split == "validation") == sorted(scores)
    assert sorted(m for m, split in rows if split == "test") == sorted(test_scores)
    assert tuple(page.metric_columns) == METRIC_KEYS
    for model in test_scores:  # each test row right below the same model's validation row
        assert rows.index((model, "test")) == rows.index((model, "validation")) + 1
    # Presets of one model side by side.
    ensemble_rows = [i for i, (key, split) in enumerate(rows) if key.endswith("/ensemble") and split == "validation"]
    assert ensemble_rows == [ensemble_rows[0], ensemble_rows[0] + 2]
    text = full_report.read_text(encoding="utf-8")
    assert TEST_SPLIT_LABEL in text
    assert "held out from every fit and every choice" in text and "out-of-fold predictions of the training rows" in text
    # The test rows show the test numbers: the ensemble's test mean km is in the page.
    assert f"{test_scores['default/ensemble']['mean_km']:,.0f}" in text


def test_without_test_scores_there_is_no_test_row_or_label(degraded_report):
    page = parse(degraded_report)
    text = degraded_report.read_text(encoding="utf-8")
    assert {split for _, split in page.score_rows} == {"validation"}
    assert TEST_SPLIT_LABEL not in text and ">Split<" not in text


# ---------------------------------------------------------------- map and borders


def test_borders_are_the_50_states_from_real_boundaries():
    outlines = state_outlines()
    assert [o.name for o in outlines] == list(STATES)
    for outline in outlines:
        assert outline.rings and all(np.allclose(r[0], r[-1]) and len(r) >= 4 for r in outline.rings), outline.name
    # The Four Corners: one vertex shared by Colorado, Utah, Arizona and New Mexico.
    corner = np.array([-109.045, 36.999])
    for name in ("Colorado", "Utah", "Arizona", "New Mexico"):
        rings = np.concatenate(outlines[STATES.index(name)].rings)
        assert np.abs(rings - corner).max(axis=1).min() < 0.01, name
    colorado = np.concatenate(outlines[STATES.index("Colorado")].rings)
    assert np.allclose([*colorado.min(axis=0), *colorado.max(axis=0)], [-109.06, 36.99, -102.04, 41.0], atol=0.05)
    hawaii = np.concatenate(outlines[STATES.index("Hawaii")].rings)
    lon0, lon1, lat0, lat1 = INSETS["Hawaii"]
    assert lon0 < hawaii[:, 0].min() and hawaii[:, 0].max() < lon1 and lat0 < hawaii[:, 1].min() and hawaii[:, 1].max() < lat1


def assert_borders_drawn(ax) -> None:
    drawn = segments(ax, GID_BORDERS)
    assert len(drawn) == len(border_lines()) > 50
    vertices = np.concatenate(drawn)
    assert US_LON[0] <= vertices[:, 0].min() and vertices[:, 0].max() <= US_LON[1]
    assert US_LAT[0] <= vertices[:, 1].min() and vertices[:, 1].max() <= US_LAT[1]


def test_map_has_one_truth_and_one_prediction_marker_per_validation_row_and_the_borders(full_inputs):
    fig, insets = map_figure(map_points(full_inputs))
    ax = axes_with_gid(fig, "map")
    val = full_inputs.val
    truth = val.select("true_longitude", "true_latitude").to_numpy()
    pred = val.select("pred_longitude", "pred_latitude").to_numpy()
    assert same_points(points(ax, GID_TRUTH), truth)
    assert same_points(points(ax, GID_PRED), pred)
    errors = segments(ax, GID_ERRORS)
    assert same_points(np.array([s[0] for s in errors]), truth) and same_points(np.array([s[1] for s in errors]), pred)
    assert_borders_drawn(ax)
    assert (ax.get_xlim(), ax.get_ylim()) == (LOWER48[:2], LOWER48[2:])
    # The Anchorage prediction opens the Alaska inset, which has the borders too; nothing falls in Hawaii.
    assert insets == ["Alaska"]
    (inset,) = [child for child in ax.child_axes if child.get_gid() == "inset-Alaska"]
    assert_borders_drawn(inset)
    assert [-149.9, 61.2] in points(inset, GID_PRED).round(1).tolist()


def test_map_draws_only_the_sampled_rows(full_inputs, monkeypatch):
    monkeypatch.setattr(report, "MAP_MAX_POINTS", 5)
    drawn = map_points(full_inputs)
    assert drawn.val.height == 5
    fig, _ = map_figure(drawn)
    ax = axes_with_gid(fig, "map")
    assert same_points(points(ax, GID_TRUTH), drawn.val.select("true_longitude", "true_latitude").to_numpy())
    assert len(points(ax, GID_PRED)) == 5


# ---------------------------------------------------------------- confusion and per-state


def test_confusion_counts_sum_to_the_validation_rows_per_true_state(full_inputs):
    val = full_inputs.val
    confusion = state_confusion(val)
    per_state = dict(val.group_by("true_state_idx").len().iter_rows())
    hits = dict(val.filter(pl.col("pred_state_idx_1") == pl.col("true_state_idx")).group_by("true_state_idx").len().iter_rows())
    assert confusion.counts.sum() == val.height
    for i, state in enumerate(confusion.states):
        assert confusion.counts[i].sum() == per_state.get(state, 0)
        assert confusion.counts[i, i] == hits.get(state, 0)
    assert confusion.counts.sum(axis=0).tolist() == [int((val["pred_state_idx_1"] == s).sum()) for s in confusion.states]
    fig = confusion_figure(confusion)
    drawn = np.asarray(fig.axes[0].images[0].get_array())
    assert np.allclose(drawn.sum(axis=1)[confusion.counts.sum(axis=1) > 0], 1.0)
    assert np.allclose(drawn, confusion.fractions)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == [f"{STATES[s]} ({per_state.get(s, 0)})" for s in confusion.states]


def test_per_state_bars_match_per_state_accuracy(full_inputs):
    val = full_inputs.val
    fig = per_state_figure(per_state_stats(val))
    ax = axes_with_gid(fig, "accuracy")
    labels = [t.get_text() for t in ax.get_yticklabels()]
    widths = [p.get_width() for p in ax.patches]
    assert len(widths) == len(labels) == val["true_state_idx"].n_unique()
    for label, width in zip(labels, widths):
        rows = val.filter(pl.col("true_state_idx") == STATES.index(label))
        assert width == pytest.approx((rows["pred_state_idx_1"] == rows["true_state_idx"]).mean())
    assert widths == sorted(widths, reverse=True)
    km_ax = axes_with_gid(fig, "mean-km")
    for label, patch in zip([t.get_text() for t in km_ax.get_yticklabels()], km_ax.patches):
        assert patch.get_width() == pytest.approx(val.filter(pl.col("true_state_idx") == STATES.index(label))["km"].mean())


# ---------------------------------------------------------------- ensemble


@pytest.mark.parametrize("n_members", [1, 3, 7])
def test_ensemble_figure_has_one_bar_per_member_with_its_weight_and_oof_score(n_members):
    ensemble = fake_ensemble(n_members)
    fig = ensemble_figure(ensemble)
    weights_ax, scores_ax = axes_with_gid(fig, "weights"), axes_with_gid(fig, "oof-scores")
    by_name = {m["name"]: m for m in ensemble["members"]}
    names = [t.get_text() for t in weights_ax.get_yticklabels()]
    assert sorted(names) == sorted(by_name)
    assert [p.get_width() for p in weights_ax.patches] == pytest.approx([by_name[n]["weight"] for n in names])
    assert [by_name[n]["weight"] for n in names] == sorted((m["weight"] for m in ensemble["members"]), reverse=True)
    dots = points(scores_ax, "member-oof")
    assert dots[:, 0].tolist() == pytest.approx([by_name[n]["oof"]["score"] for n in names])
    (line,) = [ln for ln in scores_ax.lines if ln.get_gid() == "ensemble-oof"]
    assert line.get_xdata()[0] == pytest.approx(ensemble["oof"]["score"])


def test_ensemble_section_lists_members_and_says_what_oof_means(full_report):
    page = parse(full_report)
    ensemble = json.loads((full_report.parent.parent / "eval" / "ensemble.json").read_text())
    assert sorted(page.members) == sorted(m["name"] for m in ensemble["members"])
    text = full_report.read_text(encoding="utf-8")
    assert "slightly optimistic" in text and "touched by no choice" in text and "5-fold" in text
    assert "0.25 of the position belief" in text
    assert "Flip test-time augmentation: not available: the store has no mirrored views" in text


def test_without_ensemble_json_the_section_is_one_note(degraded_report):
    page = parse(degraded_report)
    assert page.images["ensemble"] == [] and page.members == []
    assert "a run with one head has no ensemble" in degraded_report.read_text(encoding="utf-8")
    assert not (degraded_report.parent / "ensemble.png").exists()


def test_an_ensemble_without_members_names_the_file(synth_master, tmp_path):
    work = write_work_dir(tmp_path / "work", synth_master)
    (work / "eval" / "ensemble.json").write_text(json.dumps({"members": []}))
    with pytest.raises(GeoscoutError, match="ensemble.json"):
        build_report(work)


# ---------------------------------------------------------------- worst errors


def test_worst_errors_show_a_map_and_the_views_with_state_names(full_report):
    page = parse(full_report)
    assert len(page.images["worst"]) == 2 * 8
    assert png_size(full_report.parent / "worst_views_01.png") == (4 * 128, 128)
    val = pl.read_csv(full_report.parent.parent / "eval" / "val_predictions.csv")
    worst = val.sort("km", descending=True).row(0, named=True)
    text = full_report.read_text(encoding="utf-8")
    assert STATES[worst["true_state_idx"]] in text and f"{worst['km']:,.0f}" in text
    # The views are the sample's pictures, not placeholders: the first tile is the north view, resized.
    strip = np.asarray(Image.open(full_report.parent / "worst_views_01.png").convert("RGB"), dtype=float)
    north = Image.open(Path(json.loads((full_report.parent.parent / "run.json").read_text())["data_dir"])
                       / "train_images" / f"img_{worst['sample_id']:06d}_north.jpg").convert("RGB")
    expected = np.asarray(north.resize((128, 128), Image.Resampling.BILINEAR), dtype=float)
    assert np.abs(strip[:, :128] - expected).mean() < 2.0


def test_each_worst_error_map_shows_its_two_points_and_the_borders(full_inputs):
    for row in full_inputs.val.sort("km", descending=True).head(3).iter_rows(named=True):
        ax = axes_with_gid(worst_map_figure(row), "map")
        truth, pred = (row["true_longitude"], row["true_latitude"]), (row["pred_longitude"], row["pred_latitude"])
        assert points(ax, GID_TRUTH).tolist() == [list(truth)]
        assert points(ax, GID_PRED).tolist() == [list(pred)]
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        for x, y in (truth, pred):
            assert x0 < x < x1 and y0 < y < y1
        assert_borders_drawn(ax)


def test_missing_optional_inputs_are_explained(degraded_report):
    page = parse(degraded_report)
    text = degraded_report.read_text(encoding="utf-8")
    assert "Only the default preset was trained" in text
    assert "train.samples.csv" in text
    assert "1 view(s) could not be shown" in text and "east" in text and "image file not found" in text
    assert len(page.images["worst"]) == 16 and len(page.images["map"]) == 1


def test_missing_data_folder_skips_thumbnails(tmp_path):
    images, why = train_images({"data_dir": str(tmp_path / "gone")})
    assert images is None and "train_ground_truth.csv" in why
    assert train_images({})[1] is not None


# ---------------------------------------------------------------- bad pictures: a grey tile and a note, never a crash


@pytest.fixture
def one_view(synth_dir) -> tuple[Path, str]:
    images = synth_dir / "train_images"
    return images, min(p.name for p in images.glob("*.jpg"))


@pytest.mark.parametrize("limit, why", [(100, "too large to decode safely"), (40_000, "decompression-bomb limit")])
def test_a_picture_over_the_pixel_limit_is_a_grey_tile(one_view, monkeypatch, limit, why):
    """256x256 views: over twice the limit PIL raises; over the limit it warns, which must not escape either."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tile, reason = read_tile(*one_view)
    assert tile is None and why in reason
    assert caught == []


def test_a_syntax_error_from_pil_is_a_grey_tile(one_view, monkeypatch):
    from PIL import JpegImagePlugin

    def broken(self):
        raise SyntaxError("broken JPEG marker")

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", broken)
    tile, reason = read_tile(*one_view)
    assert tile is None and "broken JPEG marker" in reason


@pytest.mark.parametrize("damage, why", [
    (lambda p: p.write_bytes(p.read_bytes()[:600]), "truncated"),
    (lambda p: p.write_text("not a picture"), "not an image"),
    (lambda p: p.unlink(), "not found"),
])
def test_an_unreadable_picture_is_a_grey_tile(one_view, damage, why):
    images, name = one_view
    damage(images / name)
    tile, reason = read_tile(images, name)
    assert tile is None and why in reason


def test_a_name_outside_the_images_folder_is_refused(one_view):
    images, _ = one_view
    tile, reason = read_tile(images, "../train_ground_truth.csv")  # a real file, but not an image of the folder
    assert tile is None and ".." in reason


def test_a_report_with_bad_pictures_is_still_written(synth_master, tmp_path, monkeypatch):
    data_dir = Path(shutil.copytree(synth_master, tmp_path / "data"))
    work = write_work_dir(tmp_path / "work", data_dir)
    worst = pl.read_csv(work / "eval" / "val_predictions.csv").sort("km", descending=True)["sample_id"].to_list()
    (data_dir / "train_images" / f"img_{worst[0]:06d}_north.jpg").write_bytes(b"\xff\xd8\xff")  # cut after the header
    (data_dir / "train_images" / f"img_{worst[1]:06d}_west.jpg").write_text("<html>")
    with monkeypatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)  # every view is now over the limit: warned, not decoded
        warnings.simplefilter("always")
        page = build_report(work)
    assert [w.message for w in caught] == []
    text = page.read_text(encoding="utf-8")
    assert "32 view(s) could not be shown" in text
    strip = np.asarray(Image.open(page.parent / "worst_views_01.png").convert("RGB"))
    assert (strip[64, :] == [200, 200, 200]).all(axis=1).mean() > 0.5  # grey tiles


# ---------------------------------------------------------------- inputs


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


def test_an_ablation_table_gets_its_own_section(synth_master, tmp_path, degraded_report):
    work = write_work_dir(tmp_path / "work", synth_master)
    metric = {k: {"mean": 0.5, "std": 0.01} for k in ("score", "classification_score", "gps_score", "mean_km", "median_km")}
    ablation = {"seeds": 3, "backbones": ["tiny-clip-random", "tiny-convnext-random"], "n_validation": 30, "n_test": None,
                "recipes": [{"name": name, "validation": metric} for name in ("seed", "default - geocells")]}
    (work / "eval" / "ablation.json").write_text(json.dumps(ablation))
    page = parse(build_report(work))
    assert "Ablation" in page.headings["ablation"]
    text = (work / "report" / "index.html").read_text(encoding="utf-8")
    assert "default - geocells" in text and "validation (30 locations)" in text
    assert "ablation" not in parse(degraded_report).headings
