"""`geoscout report WORK_DIR`: one self-contained, offline HTML page about a finished run.

Reads what `geoscout run` leaves in WORK_DIR and writes WORK_DIR/report/index.html with every plot
inline as a base64 PNG, plus the same PNGs beside it. The inputs (see load_inputs):

    run.json                    data folder, synthetic/random flags, backbones, presets, final model
    eval/scores.json            {"PRESET/MODEL" | "baseline": {metric: value}} on the validation rows
    eval/test_scores.json       optional, same shape, on the test split (only synthetic data has test truth)
    eval/val_predictions.csv    the final model's validation predictions (VAL_COLUMNS)
    eval/ensemble.json          optional: members with weights, temperatures and out-of-fold scores
    eval/ablation.json          optional: `geoscout ablate --work WORK`
    store/train.samples.csv     optional: training locations, the map's background

Each plot is built by a function that returns its matplotlib Figure (object API, no pyplot, so no
global backend is touched), which the section then saves; tests inspect the figures themselves.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.metrics import confusion_matrix

from .competition import IMAGE_COLUMNS, IMAGE_DIRS, TRAIN_CSV, VIEWS
from .drawing import (  # noqa: F401 (GID_BORDERS: re-exported for readers of the figures)
    BORDER_STYLE,
    GID_BORDERS,
    INSETS,
    LOWER48,
    Frame,
    data_uri,
    draw_borders,
    figure_png,
    grey_tile,
    in_frame,
    new_figure,
    read_tile,
    set_lonlat_frame,
    state_colour,
    state_label,
    tidy,
    tile_strip,
)
from .errors import GeoscoutError, MissingFileError
from .metric import DISTANCE_THRESHOLDS_KM, METRIC_KEYS

REPORT_DIR = "report"
WORST_COUNT = 8
MAP_MAX_POINTS = 2000
PRED_STATE_COLUMNS = tuple(f"pred_state_idx_{k}" for k in range(1, 6))
VAL_COLUMNS = (
    "sample_id", "true_state_idx", "true_latitude", "true_longitude",
    *PRED_STATE_COLUMNS, "pred_latitude", "pred_longitude", "km",
)
TEST_SPLIT_LABEL = "test split (synthetic data only: the competition keeps its test truth)"
# Label, number format, and whether higher is better (None: not ranked) per metric key.
METRIC_FORMATS: dict[str, tuple[str, str, bool | None]] = {
    "score": ("Score", "{:.4f}", True),
    "classification_score": ("Classif.", "{:.4f}", True),
    "gps_score": ("GPS", "{:.4f}", True),
    "top1_accuracy": ("Top-1", "{:.3f}", True),
    "top5_accuracy": ("Top-5", "{:.3f}", True),
    "mean_km": ("Mean km", "{:,.0f}", False),
    "median_km": ("Median km", "{:,.0f}", False),
    **{f"acc_{t}km": (f"≤{t:,} km", "{:.3f}", True) for t in DISTANCE_THRESHOLDS_KM},
    "geoscore": ("GeoScore", "{:,.0f}", True),
    "n": ("n", "{:,.0f}", None),
}
assert tuple(METRIC_FORMATS) == METRIC_KEYS
# Inset rectangles in the main map's axes fraction: bottom left, over the Pacific and Mexico.
INSET_BOXES = {"Alaska": (0.0, 0.0, 0.24, 0.27), "Hawaii": (0.25, 0.0, 0.13, 0.13)}
# Artist ids: what a reader of a figure (the tests) looks up.
GID_TRUTH, GID_PRED, GID_ERRORS = "truth", "prediction", "error-lines"


@dataclass(frozen=True)
class RunInputs:
    work_dir: Path
    run: dict  # run.json; {} when absent
    scores: dict[str, dict[str, float]]  # validation
    test_scores: dict[str, dict[str, float]] | None  # test split, synthetic data only
    val: pl.DataFrame
    ensemble: dict | None
    train: pl.DataFrame | None
    ablation: dict | None  # eval/ablation.json from `geoscout ablate --work WORK`


@dataclass(frozen=True)
class Plot:
    """A rendered figure: its PNG file in the report folder and the same bytes as a data URI."""

    path: Path
    data_uri: str


def build_report(work_dir: Path) -> Path:
    """Write WORK_DIR/report/index.html (and its PNGs) from a finished run; return the HTML path."""
    inputs = load_inputs(Path(work_dir))
    out_dir = inputs.work_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.png"):  # a previous report's plots must not outlive it (e.g. worst_map_08.png)
        stale.unlink()
    sections = [
        scores_section(inputs),
        map_section(inputs, out_dir),
        cdf_section(inputs, out_dir),
        confusion_section(inputs, out_dir),
        per_state_section(inputs, out_dir),
        ensemble_section(inputs, out_dir),
        worst_section(inputs, out_dir),
        *([ablation_section(inputs.ablation)] if inputs.ablation else []),
    ]
    page = out_dir / "index.html"
    page.write_text(render_page(inputs, sections), encoding="utf-8")
    return page


# ---------------------------------------------------------------- inputs


def load_inputs(work_dir: Path) -> RunInputs:
    eval_dir = work_dir / "eval"
    return RunInputs(
        work_dir=work_dir,
        run=_read_optional_json(work_dir / "run.json") or {},
        scores=_read_required_json(eval_dir / "scores.json"),
        test_scores=_read_optional_json(eval_dir / "test_scores.json"),
        val=read_val_predictions(eval_dir / "val_predictions.csv"),
        ensemble=read_ensemble(eval_dir / "ensemble.json"),
        train=_read_train_samples(work_dir / "store" / "train.samples.csv"),
        ablation=_read_optional_json(eval_dir / "ablation.json"),
    )


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise MissingFileError(f"{path}: file not found; the report needs it (run `geoscout run` first)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GeoscoutError(f"{path}: not valid JSON ({exc})") from None


def _read_required_json(path: Path) -> dict:
    _require_file(path)
    return _read_json(path)


def _read_optional_json(path: Path) -> dict | None:
    return _read_json(path) if path.is_file() else None


def read_val_predictions(path: Path) -> pl.DataFrame:
    _require_file(path)
    val = pl.read_csv(path, schema_overrides={"sample_id": pl.Utf8})
    missing = [c for c in VAL_COLUMNS if c not in val.columns]
    if missing:
        raise GeoscoutError(f"{path}: missing column(s) {missing}; found {val.columns}")
    if val.height == 0:
        raise GeoscoutError(f"{path}: no rows; the report needs validation predictions")
    return val


def read_ensemble(path: Path) -> dict | None:
    """eval/ensemble.json, checked for what the section draws: every member's name and weight."""
    ensemble = _read_optional_json(path)
    if ensemble is None:
        return None
    members = ensemble.get("members")
    if not isinstance(members, list) or not members:
        raise GeoscoutError(f"{path}: 'members' must be a non-empty list")
    for i, member in enumerate(members):
        for key in ("name", "weight"):
            if key not in member:
                raise GeoscoutError(f"{path}: members[{i}] has no {key!r}")
    return ensemble


def _read_train_samples(path: Path) -> pl.DataFrame | None:
    if not path.is_file():
        return None
    return pl.read_csv(path, columns=["state_idx", "latitude", "longitude"]).drop_nulls()


# ---------------------------------------------------------------- shared helpers


def save_plot(fig: Figure, out_dir: Path, name: str) -> Plot:
    return save_png_bytes(figure_png(fig), out_dir, name)


def save_png_bytes(png: bytes, out_dir: Path, name: str) -> Plot:
    path = out_dir / name
    path.write_bytes(png)
    return Plot(path, data_uri(png))


def img_tag(plot: Plot, alt: str) -> str:
    return f'<img src="{plot.data_uri}" alt="{html.escape(alt)}">'


def section(anchor: str, title: str, *body: str) -> str:
    return f'<section id="{anchor}">\n<h2>{html.escape(title)}</h2>\n' + "\n".join(body) + "\n</section>"


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def true_states(val: pl.DataFrame) -> np.ndarray:
    return val["true_state_idx"].to_numpy()


def top1_states(val: pl.DataFrame) -> np.ndarray:
    return val["pred_state_idx_1"].to_numpy()


def find_artist(ax: Axes, gid: str):
    """The collection an id was given to (see the GID_ names), or None."""
    return next((c for c in ax.collections if c.get_gid() == gid), None)


# ---------------------------------------------------------------- 1. scores tables


def split_model_key(key: str) -> tuple[str, str]:
    """'default/ensemble' -> ('default', 'ensemble'); a key without a preset ('baseline') -> ('', key)."""
    preset, _, model = key.rpartition("/")
    return preset, model


def score_rows_order(keys, presets: list[str]) -> list[str]:
    """Ensemble first, heads by name, baseline last; presets of one model side by side, in run order."""
    def rank(key: str) -> tuple:
        preset, model = split_model_key(key)
        group = 0 if model == "ensemble" else 2 if model == "baseline" else 1
        preset_rank = presets.index(preset) if preset in presets else len(presets)
        return group, model, preset_rank, preset
    return sorted(keys, key=rank)


def best_values(scores: dict) -> dict[str, float]:
    """The best value of each ranked metric over all models, to highlight in the table."""
    best = {}
    for key, (_, _, higher) in METRIC_FORMATS.items():
        values = [row[key] for row in scores.values() if row.get(key) is not None]
        if higher is not None and values:
            best[key] = max(values) if higher else min(values)
    return best


def format_metric(key: str, value: float | None) -> str:
    return "–" if value is None else METRIC_FORMATS[key][1].format(value)


def score_row_html(key: str, split: str | None, metrics: dict, best: dict[str, float], final_model: str) -> str:
    """One model's row; `split` is None when the table has only validation rows (no split column)."""
    preset, model = split_model_key(key)
    cells = []
    for metric in METRIC_KEYS:
        value = metrics.get(metric)
        is_best = value is not None and metric in best and math.isclose(value, best[metric], rel_tol=1e-9)
        cells.append(f'<td class="{"best" if is_best else ""}">{format_metric(metric, value)}</td>')
    classes = " ".join(c for c in ("final" if key == final_model else "", split or "") if c)
    split_cell = f'<td class="split">{split}</td>' if split else ""
    marker = " ★" if key == final_model else ""
    return (f'<tr class="{classes}" data-model="{html.escape(key)}" data-split="{split or "validation"}">'
            f'<th scope="row">{html.escape(model)}{marker}</th>'
            f"<td>{html.escape(preset or '–')}</td>{split_cell}" + "".join(cells) + "</tr>")


def scores_table(inputs: RunInputs) -> str:
    """Validation rows; with test scores, each model's test row right below its validation row."""
    splits = {"validation": inputs.scores, **({"test": inputs.test_scores} if inputs.test_scores else {})}
    best = {split: best_values(scores) for split, scores in splits.items()}
    final_model = inputs.run.get("final_model", "")
    keys = score_rows_order(set().union(*splits.values()), list(inputs.run.get("presets", [])))
    with_split = len(splits) > 1
    header = "".join(
        f'<th data-metric="{key}" title="{key}">{html.escape(label)}</th>' for key, (label, _, _) in METRIC_FORMATS.items()
    )
    rows = [
        score_row_html(key, split if with_split else None, scores[key], best[split], final_model)
        for key in keys for split, scores in splits.items() if key in scores
    ]
    split_header = '<th class="split">Split</th>' if with_split else ""
    return ('<div class="scroll"><table class="scores">\n<thead><tr><th>Model</th><th>Preset</th>' + split_header
            + header + "</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table></div>")


def presets_note(inputs: RunInputs) -> str:
    presets = {split_model_key(key)[0] for key in inputs.scores} - {""}
    if len(presets) > 1:
        return "Each model's presets sit side by side in consecutive rows."
    only = next(iter(presets), "no")
    return f"Only the {only} preset was trained, so there is no second preset to compare with."


def scores_section(inputs: RunInputs) -> str:
    explain = note(
        "All models scored on the same validation locations. Score = 0.70 × classification + 0.30 × GPS; "
        "the baseline predicts the most frequent state and its centroid. Best value per column in bold; "
        "★ marks the final model. " + presets_note(inputs)
    )
    held_out = note(
        "The validation rows were held out from every fit and every choice: ensemble weights, temperatures, "
        "the retrieval share and the keep-or-drop decisions were made on out-of-fold predictions of the "
        "training rows."
    )
    body = [explain, held_out]
    if inputs.test_scores:
        body.append(f'<p class="test-label"><strong>Rows marked “test”: {html.escape(TEST_SPLIT_LABEL)}.</strong> '
                    "No fit and no choice saw those locations; each sits right below the same model's validation row.</p>")
    return section("scores", "Scores", *body, scores_table(inputs))


# ---------------------------------------------------------------- 2. map


@dataclass(frozen=True)
class MapPoints:
    val: pl.DataFrame  # the validation rows drawn (a fixed sample when there are many)
    train: pl.DataFrame | None


def map_points(inputs: RunInputs) -> MapPoints:
    """At most MAP_MAX_POINTS validation rows: beyond that, dots and lines hide one another."""
    val = inputs.val
    if val.height > MAP_MAX_POINTS:
        val = val.sample(n=MAP_MAX_POINTS, seed=0)
    return MapPoints(val, inputs.train)


def draw_training_background(ax: Axes, train: pl.DataFrame, marker_scale: float) -> None:
    colours = [state_colour(s) for s in train["state_idx"].to_list()]
    # Fainter as points grow denser: state shapes should show, not a solid blot.
    alpha = float(np.clip(12.0 / math.sqrt(train.height), 0.08, 0.4))
    ax.scatter(train["longitude"], train["latitude"], s=5 * marker_scale, c=colours,
               alpha=alpha, linewidths=0, rasterized=True, zorder=1)


def draw_pairs(ax: Axes, val: pl.DataFrame, marker_scale: float, line_alpha: float = 0.55,
               colours: tuple[str, str] | None = None) -> None:
    """Error lines, truth dots and predicted crosses; coloured by true and top-1 state unless `colours` are given."""
    true_xy = np.column_stack([val["true_longitude"], val["true_latitude"]])
    pred_xy = np.column_stack([val["pred_longitude"], val["pred_latitude"]])
    lines = np.stack([true_xy, pred_xy], axis=1)
    ax.add_collection(LineCollection(lines, colors="0.15", linewidths=0.6 * marker_scale, alpha=line_alpha, zorder=2,
                                     gid=GID_ERRORS),
                      autolim=False)
    true_c, pred_c = colours or ([state_colour(s) for s in true_states(val)], [state_colour(s) for s in top1_states(val)])
    ax.scatter(true_xy[:, 0], true_xy[:, 1], s=16 * marker_scale, c=true_c,
               edgecolors="black", linewidths=0.4, zorder=3, gid=GID_TRUTH)
    ax.scatter(pred_xy[:, 0], pred_xy[:, 1], s=22 * marker_scale, marker="x", c=pred_c, linewidths=1.1, zorder=4,
               gid=GID_PRED)


def draw_locations(ax: Axes, points: MapPoints, marker_scale: float) -> None:
    """Training background (state-coloured, faint), state borders, then the validation pairs."""
    if points.train is not None:
        draw_training_background(ax, points.train, marker_scale)
    draw_borders(ax, scale=marker_scale)
    draw_pairs(ax, points.val, marker_scale)


def map_legend(fig: Figure, val: pl.DataFrame) -> None:
    shown = sorted(set(true_states(val)) | set(top1_states(val)))
    keys = [
        Line2D([], [], marker="o", ls="", color="0.6", markeredgecolor="black", label="truth"),
        Line2D([], [], marker="x", ls="", color="0.3", label="prediction (top-1 colour)"),
        Line2D([], [], color="0.15", alpha=0.55, lw=0.8, label="error"),
        Line2D([], [], color=BORDER_STYLE["colors"], lw=0.8, label="state border"),
    ]
    states = [Line2D([], [], marker="s", ls="", color=state_colour(s), label=state_label(s)) for s in shown]
    # Below the map, so the map keeps the full width.
    fig.legend(handles=keys + states, loc="outside lower center", fontsize=8, frameon=False, ncol=7)


def all_coordinates(points: MapPoints) -> tuple[np.ndarray, np.ndarray]:
    val = points.val
    lat_parts = [val["true_latitude"].to_numpy(), val["pred_latitude"].to_numpy()]
    lon_parts = [val["true_longitude"].to_numpy(), val["pred_longitude"].to_numpy()]
    if points.train is not None:
        lat_parts.append(points.train["latitude"].to_numpy())
        lon_parts.append(points.train["longitude"].to_numpy())
    return np.concatenate(lat_parts), np.concatenate(lon_parts)


def add_insets(ax: Axes, points: MapPoints) -> list[str]:
    """Small frames for Alaska and Hawaii, only where some location falls in them; returns their names."""
    lats, lons = all_coordinates(points)
    drawn = []
    for name, frame in INSETS.items():
        if not in_frame(frame, lats, lons).any():
            continue
        inset = ax.inset_axes(INSET_BOXES[name])
        inset.set_gid(f"inset-{name}")
        inset.set_facecolor("white")
        draw_locations(inset, points, marker_scale=0.6)
        set_lonlat_frame(inset, frame)
        inset.set_xticks([])
        inset.set_yticks([])
        inset.set_title(name, fontsize=8, pad=2)
        drawn.append(name)
    return drawn


def outside_count(val: pl.DataFrame, frames: list[Frame]) -> int:
    """Predictions that fall in none of the drawn frames (drawn off the map)."""
    lats, lons = val["pred_latitude"].to_numpy(), val["pred_longitude"].to_numpy()
    inside = np.zeros(len(lats), dtype=bool)
    for frame in frames:
        inside |= in_frame(frame, lats, lons)
    return int((~inside).sum())


def map_figure(points: MapPoints) -> tuple[Figure, list[str]]:
    """The lower 48 with state borders, plus Alaska/Hawaii insets where needed; returns the insets drawn."""
    fig = new_figure(12, 8.2)
    ax = fig.add_subplot()
    ax.set_gid("map")
    draw_locations(ax, points, marker_scale=1.0)
    set_lonlat_frame(ax, LOWER48)
    ax.set_xlabel("longitude (°)")
    ax.set_ylabel("latitude (°)")
    ax.set_title(f"Validation predictions vs truth ({points.val.height:,} locations)")
    tidy(ax)
    insets = add_insets(ax, points)
    map_legend(fig, points.val)
    return fig, insets


def map_caption(inputs: RunInputs, points: MapPoints, insets: list[str]) -> str:
    texts = ["Dots: true locations; crosses: predictions; dark lines join them; grey outlines: state borders."]
    if points.val.height < inputs.val.height:
        texts.append(f"A fixed random sample of {points.val.height:,} of the {inputs.val.height:,} locations is drawn.")
    texts.append("Faint background: training locations, coloured by state." if points.train is not None
                 else "Training locations are missing (store/train.samples.csv), so there is no background.")
    if insets:
        texts.append(f"Insets: {' and '.join(insets)}.")
    off_map = outside_count(points.val, [LOWER48, *(INSETS[name] for name in insets)])
    if off_map:
        texts.append(f"{off_map} drawn prediction(s) fall outside every frame.")
    return " ".join(texts)


def map_section(inputs: RunInputs, out_dir: Path) -> str:
    points = map_points(inputs)
    fig, insets = map_figure(points)
    plot = save_plot(fig, out_dir, "map.png")
    return section("map", "Map of validation predictions", note(map_caption(inputs, points, insets)), img_tag(plot, "map"))


# ---------------------------------------------------------------- 3. error CDF


def cdf_figure(km: np.ndarray) -> Figure:
    floor = 0.1  # a log axis has no zero: exact hits sit at 0.1 km
    xs = np.sort(np.maximum(km, floor))
    ys = np.arange(1, len(xs) + 1) / len(xs)
    fig = new_figure(9, 4.6)
    ax = fig.add_subplot()
    ax.step(np.concatenate([[floor], xs]), np.concatenate([[0.0], ys]), where="post", color="#1f5fa8", lw=1.8)
    for t in DISTANCE_THRESHOLDS_KM:
        reached = float((km <= t).mean())
        ax.axvline(t, color="0.6", ls=":", lw=1)
        ax.plot([t], [reached], "o", color="#c0392b", ms=5)
        # Vertical along each mark: the marks are too close on a log axis for level labels.
        ax.annotate(f"≤{t:,} km: {reached:.0%}", (t, 0.02), xytext=(3, 0), textcoords="offset points",
                    rotation=90, va="bottom", fontsize=9, bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1})
    ax.set_xscale("log")
    upper = max(5000.0, float(xs[-1]) * 1.2)
    ticks = [10.0**k for k in range(-1, int(math.log10(upper)) + 1)]
    ax.set_xticks(ticks, [f"{t:,g}" for t in ticks])
    ax.set_xlim(floor, upper)
    ax.set_ylim(0, 1.04)
    ax.set_xlabel("error (km, log scale)")
    ax.set_ylabel("fraction of locations within")
    ax.set_title(f"Error CDF: median {np.median(km):,.0f} km, mean {km.mean():,.0f} km")
    ax.grid(axis="y", color="0.92")
    tidy(ax)
    return fig


def cdf_section(inputs: RunInputs, out_dir: Path) -> str:
    plot = save_plot(cdf_figure(inputs.val["km"].to_numpy()), out_dir, "error_cdf.png")
    return section("cdf", "Error distance CDF", img_tag(plot, "error CDF"))


# ---------------------------------------------------------------- 4. confusion matrix


@dataclass(frozen=True)
class Confusion:
    states: list[int]  # the order of rows and columns: every state that is true or predicted
    counts: np.ndarray  # (S, S) rows truth, columns top-1 prediction

    @property
    def fractions(self) -> np.ndarray:
        """Each row normalised to its true state's locations (0 for a state never true)."""
        totals = self.counts.sum(axis=1, keepdims=True)
        return np.divide(self.counts, totals, out=np.zeros(self.counts.shape), where=totals > 0)


def state_confusion(val: pl.DataFrame) -> Confusion:
    truth, pred = true_states(val), top1_states(val)
    states = sorted(set(truth.tolist()) | set(pred.tolist()))
    return Confusion(states, confusion_matrix(truth, pred, labels=states))


def annotate_cells(ax: Axes, matrix: np.ndarray) -> None:
    for (row, col), value in np.ndenumerate(matrix):
        if value >= 0.005:
            ax.text(col, row, f"{value * 100:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if value > 0.55 else "black")


def confusion_figure(confusion: Confusion) -> Figure:
    states, matrix = confusion.states, confusion.fractions
    side = 3.0 + 0.3 * len(states)
    fig = new_figure(side + 1.5, side)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    if len(states) <= 24:  # numbers stay legible up to about this size
        annotate_cells(ax, matrix)
    ax.set_xticks(range(len(states)), [state_label(s) for s in states], rotation=90, fontsize=8)
    row_counts = confusion.counts.sum(axis=1)
    ax.set_yticks(range(len(states)), [f"{state_label(s)} ({n})" for s, n in zip(states, row_counts)], fontsize=8)
    ax.set_xlabel("predicted state (top-1)")
    ax.set_ylabel("true state (validation count)")
    ax.set_title("State confusion, each row normalised (%)")
    fig.colorbar(image, ax=ax, shrink=0.6, label="fraction of the true state's locations")
    return fig


def confusion_section(inputs: RunInputs, out_dir: Path) -> str:
    plot = save_plot(confusion_figure(state_confusion(inputs.val)), out_dir, "confusion.png")
    return section("confusion", "State confusion matrix", img_tag(plot, "confusion matrix"))


# ---------------------------------------------------------------- 5. per-state accuracy and distance


@dataclass(frozen=True)
class StateStats:
    state_idx: np.ndarray
    count: np.ndarray
    accuracy: np.ndarray  # top-1
    mean_km: np.ndarray


def per_state_stats(val: pl.DataFrame) -> StateStats:
    stats = (
        val.with_columns((pl.col("pred_state_idx_1") == pl.col("true_state_idx")).cast(pl.Float64).alias("hit"))
        .group_by("true_state_idx")
        .agg(pl.len().alias("count"), pl.col("hit").mean().alias("accuracy"), pl.col("km").mean().alias("mean_km"))
        .sort("true_state_idx")
    )
    return StateStats(*(stats[c].to_numpy() for c in ("true_state_idx", "count", "accuracy", "mean_km")))


def state_bars(ax: Axes, stats: StateStats, values: np.ndarray, order: np.ndarray, text: str) -> None:
    """Horizontal bars in `order` (first on top), state-coloured, each labelled with its value and count."""
    positions = np.arange(len(order))
    ax.barh(positions, values[order], color=[state_colour(s) for s in stats.state_idx[order]])
    ax.set_yticks(positions, [state_label(s) for s in stats.state_idx[order]], fontsize=8)
    ax.invert_yaxis()
    for y, i in zip(positions, order):
        ax.annotate(text.format(values[i], int(stats.count[i])), (values[i], y), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=7)
    tidy(ax)


def per_state_figure(stats: StateStats) -> Figure:
    fig = new_figure(12, 1.6 + 0.26 * len(stats.state_idx))
    left, right = fig.subplots(1, 2)
    left.set_gid("accuracy")
    right.set_gid("mean-km")
    state_bars(left, stats, stats.accuracy, np.argsort(-stats.accuracy, kind="stable"), "{:.0%}  n={}")
    left.set_xlim(0, 1.18)  # room for the labels beyond a full bar
    left.set_xlabel("top-1 accuracy")
    left.set_title("Top-1 accuracy per true state")
    state_bars(right, stats, stats.mean_km, np.argsort(stats.mean_km, kind="stable"), "{:,.0f} km  n={}")
    right.set_xlim(0, max(float(stats.mean_km.max()), 1.0) * 1.3)
    right.set_xlabel("mean error (km)")
    right.set_title("Mean error per true state")
    return fig


def per_state_section(inputs: RunInputs, out_dir: Path) -> str:
    plot = save_plot(per_state_figure(per_state_stats(inputs.val)), out_dir, "per_state.png")
    return section("per-state", "Per-state accuracy and error", img_tag(plot, "per-state accuracy and mean km"))


# ---------------------------------------------------------------- 6. ensemble members

KIND_COLOURS = {"classifier": "#1f5fa8", "probe": "#e08a1e"}
OOF_KEYS = (("score", "OOF score"), ("top1_accuracy", "OOF top-1"), ("mean_km", "OOF mean km"), ("nll", "OOF NLL"))


def members_by_weight(ensemble: dict) -> list[dict]:
    return sorted(ensemble["members"], key=lambda m: -float(m["weight"]))


def ensemble_figure(ensemble: dict) -> Figure:
    """Left: each member's weight (bars, heaviest on top). Right: each member's out-of-fold score, and the ensemble's."""
    members = members_by_weight(ensemble)
    positions = np.arange(len(members))
    fig = new_figure(11, 1.5 + 0.36 * len(members))
    weights_ax, scores_ax = fig.subplots(1, 2, sharey=True, width_ratios=[1.25, 1])
    weights_ax.set_gid("weights")
    scores_ax.set_gid("oof-scores")
    weights = np.array([float(m["weight"]) for m in members])
    weights_ax.barh(positions, weights, color=[KIND_COLOURS.get(m.get("kind"), "0.5") for m in members])
    for y, w in zip(positions, weights):
        weights_ax.annotate(f"{w:.2f}", (w, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    weights_ax.set_yticks(positions, [m["name"] for m in members], fontsize=8)
    weights_ax.invert_yaxis()
    weights_ax.set_xlim(0, max(float(weights.max()), 1e-9) * 1.2)
    weights_ax.set_xlabel("weight in the ensemble")
    weights_ax.set_title("Member weights (blue: classifier, orange: probe)", fontsize=10)
    tidy(weights_ax)

    scored = [(y, float(m["oof"]["score"])) for y, m in zip(positions, members) if "score" in m.get("oof", {})]
    if scored:
        ys, values = zip(*scored)
        scores_ax.scatter(values, ys, color="#1f5fa8", zorder=3, gid="member-oof")
        for y, v in scored:
            scores_ax.annotate(f"{v:.4f}", (v, y), xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)
    ensemble_score = ensemble.get("oof", {}).get("score")
    if ensemble_score is not None:
        scores_ax.axvline(ensemble_score, color="#c0392b", lw=1.5, gid="ensemble-oof")
        scores_ax.annotate(f"ensemble {ensemble_score:.4f}", (ensemble_score, 1.0), xycoords=("data", "axes fraction"),
                           xytext=(4, -2), textcoords="offset points", va="top", fontsize=8, color="#c0392b")
    every = [v for _, v in scored] + ([ensemble_score] if ensemble_score is not None else [])
    if every:
        low, high = min(every), max(every)
        pad = max(high - low, 0.01) * 0.25
        scores_ax.set_xlim(low - pad, high + 2 * pad)  # room on the right for the labels
    scores_ax.set_xlabel("out-of-fold score (training rows)")
    scores_ax.set_title("Out-of-fold score per member; red: the ensemble", fontsize=10)
    scores_ax.grid(axis="x", color="0.92")
    tidy(scores_ax)
    return fig


def _format_optional(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def ensemble_table(ensemble: dict) -> str:
    formats = {"score": "{:.4f}", "top1_accuracy": "{:.3f}", "mean_km": "{:,.0f}", "nll": "{:.3f}"}
    header = "".join(f"<th>{label}</th>" for _, label in OOF_KEYS)

    def oof_cells(oof: dict) -> str:
        return "".join(f"<td>{_format_optional(oof.get(k), formats[k])}</td>" for k, _ in OOF_KEYS)

    rows = [
        f'<tr data-member="{html.escape(m["name"])}"><td>{html.escape(m["name"])}</td>'
        f"<td>{html.escape(str(m.get('kind', '–')))}</td><td>{html.escape(', '.join(m.get('backbones', [])) or '–')}</td>"
        f"<td>{float(m['weight']):.3f}</td><td>{_format_optional(m.get('temperature'), '{:.2f}')}</td>"
        + oof_cells(m.get("oof", {})) + "</tr>"
        for m in members_by_weight(ensemble)
    ]
    total = sum(float(m["weight"]) for m in ensemble["members"])
    rows.append(f'<tr class="final"><td>ensemble</td><td></td><td></td><td>{total:.3f}</td><td></td>'
                + oof_cells(ensemble.get("oof", {})) + "</tr>")
    return ('<div class="scroll"><table class="scores members"><thead><tr><th>Member</th><th>Kind</th><th>Backbones</th>'
            f"<th>Weight</th><th>Temperature</th>{header}</tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table></div>")


def ensemble_note(ensemble: dict) -> str:
    folds = ensemble.get("folds")
    fold_text = f"{folds}-fold " if folds else ""
    texts = [(
        f"Weights and temperatures were chosen on {fold_text}out-of-fold predictions of the training rows. "
        "Out-of-fold numbers are slightly optimistic: each fold's model stopped early on that fold's rows. "
        "The validation rows (Scores above) were touched by no choice."
    )]
    if "regressor" in ensemble:
        texts.append("Coordinates: the residual GPS regressor was " + ("kept." if ensemble["regressor"] else "dropped."))
    if ensemble.get("retrieval_weight") is not None:
        texts.append(f"Retrieval share: {float(ensemble['retrieval_weight']):.2f} of the position belief goes to the "
                     "nearest training locations.")
    if ensemble.get("flip_tta_note"):
        texts.append(f"Flip test-time augmentation: {ensemble['flip_tta_note']}.")
    return " ".join(texts)


def ensemble_section(inputs: RunInputs, out_dir: Path) -> str:
    title = "Ensemble members"
    if inputs.ensemble is None:
        return section("ensemble", title, note(
            "No eval/ensemble.json: no ensemble was fitted (a run with one head has no ensemble)."))
    plot = save_plot(ensemble_figure(inputs.ensemble), out_dir, "ensemble.png")
    return section("ensemble", title, note(ensemble_note(inputs.ensemble)), img_tag(plot, "ensemble member weights"),
                   ensemble_table(inputs.ensemble))


# ---------------------------------------------------------------- ablation (optional)

ABLATION_KEYS = ("score", "classification_score", "gps_score", "mean_km", "median_km")


def ablation_section(ablation: dict) -> str:
    """The `geoscout ablate` table: mean ± std over seeds per recipe, on each split it was scored on."""
    splits = [s for s in ("test", "validation") if s in ablation["recipes"][0]]
    header = "".join(f"<th>{html.escape(METRIC_FORMATS[k][0])}</th>" for k in ABLATION_KEYS)
    tables = []
    for split in splits:
        rows = []
        for recipe in ablation["recipes"]:
            cells = "".join(
                f"<td>{METRIC_FORMATS[k][1].format(recipe[split][k]['mean'])} ± "
                f"{METRIC_FORMATS[k][1].format(recipe[split][k]['std'])}</td>" for k in ABLATION_KEYS)
            rows.append(f"<tr><td>{html.escape(recipe['name'])}</td>{cells}</tr>")
        size = ablation.get(f"n_{split}")
        tables.append(f"<h3>{split} ({size} locations)</h3>" if size else f"<h3>{split}</h3>")
        tables.append('<div class="scroll"><table class="scores"><thead><tr><th>Recipe</th>' + header
                      + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")
    explain = note(
        f"Each recipe trained with {ablation['seeds']} seeds on the same cached features ({', '.join(ablation['backbones'])}); "
        "mean ± std over the seeds. Test rows (synthetic data only) were seen by no fit and no choice."
    )
    return section("ablation", "Ablation: the seed recipe, the default, and the default without each addition", explain, *tables)


# ---------------------------------------------------------------- 7. worst errors

WORST_MAP_ASPECT = 1.45  # width / height of each worst error's small map
WORST_MAP_COLOURS = ("#1f5fa8", "#d62728")  # truth, prediction: fixed, as a pale state colour would vanish


@dataclass(frozen=True)
class TrainImages:
    images_dir: Path
    names: dict[str, list[str]]  # sample_id -> the four image names, N/E/S/W, as the CSV gives them


def train_images(run: dict) -> tuple[TrainImages | None, str | None]:
    """The training images' folder and names per sample, or None and why no thumbnails can be shown."""
    if "data_dir" not in run:
        return None, "run.json does not name the data folder, so no thumbnails are shown."
    data_dir = Path(run["data_dir"]).expanduser()
    table = data_dir / TRAIN_CSV
    if not table.is_file():
        return None, f"{table} is not available, so no thumbnails are shown."
    rows = pl.read_csv(table, columns=["sample_id", *IMAGE_COLUMNS], infer_schema=False)
    names = {sid: list(views) for sid, *views in rows.iter_rows()}
    return TrainImages(data_dir / IMAGE_DIRS["train"], names), None


def thumbnail_strip(images_dir: Path, names: list[str]) -> tuple[bytes, list[str | None]]:
    """The four views side by side as one PNG, and per view why it is a grey tile (None: shown)."""
    tiles, problems = zip(*(read_tile(images_dir, name) for name in names))
    return tile_strip([tile if tile is not None else grey_tile() for tile in tiles]), list(problems)


def pair_frame(row: dict) -> Frame:
    """A frame around the true and predicted points, at least a few states wide, shaped WORST_MAP_ASPECT."""
    lats = (row["true_latitude"], row["pred_latitude"])
    lons = (row["true_longitude"], row["pred_longitude"])
    mid_lat, mid_lon = (min(lats) + max(lats)) / 2, (min(lons) + max(lons)) / 2
    k = math.cos(math.radians(mid_lat))
    height = max((max(lats) - min(lats)) * 1.35, (max(lons) - min(lons)) * k * 1.35 / WORST_MAP_ASPECT, 7.0)
    width = height * WORST_MAP_ASPECT / k
    return (mid_lon - width / 2, mid_lon + width / 2, mid_lat - height / 2, mid_lat + height / 2)


def worst_map_figure(row: dict) -> Figure:
    """One error on a small map with the state borders: truth dot, predicted cross, the line between."""
    fig = Figure(figsize=(2.6, 2.6 / WORST_MAP_ASPECT))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))  # no labels to lay out: the frame fills the figure
    ax.set_gid("map")
    draw_borders(ax, scale=0.8)
    draw_pairs(ax, pl.DataFrame([row]), marker_scale=2.0, line_alpha=0.9, colours=WORST_MAP_COLOURS)
    set_lonlat_frame(ax, pair_frame(row))
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def worst_row_html(rank: int, row: dict, images: TrainImages | None, out_dir: Path) -> tuple[str, list[str]]:
    """One table row; returns it and what could not be shown, one sentence per view."""
    map_plot = save_plot(worst_map_figure(row), out_dir, f"worst_map_{rank:02d}.png")
    cells = [
        f"<td>{rank}</td>", f"<td>{html.escape(row['sample_id'])}</td>",
        f"<td>{html.escape(state_label(row['true_state_idx']))}</td>",
        f"<td>{html.escape(state_label(row['pred_state_idx_1']))}</td>",
        f"<td class=\"num\">{row['km']:,.0f}</td>",
        f'<td class="pair-map">{img_tag(map_plot, "map of sample " + row["sample_id"])}</td>',
    ]
    problems = []
    if images is not None:
        names = images.names.get(row["sample_id"])
        if names is None:
            cells.append(f"<td>not in {TRAIN_CSV}</td>")
            problems.append(f"sample {row['sample_id']}: not in {TRAIN_CSV}")
        else:
            png, whys = thumbnail_strip(images.images_dir, names)
            plot = save_png_bytes(png, out_dir, f"worst_views_{rank:02d}.png")
            cells.append(f'<td class="thumbs">{img_tag(plot, "views of sample " + row["sample_id"])}</td>')
            problems += [f"sample {row['sample_id']} {view} ({name}): {why}"
                         for view, name, why in zip(VIEWS, names, whys) if why]
    return "<tr>" + "".join(cells) + "</tr>", problems


def worst_section(inputs: RunInputs, out_dir: Path) -> str:
    worst = inputs.val.sort("km", descending=True).head(WORST_COUNT)
    images, why_none = train_images(inputs.run)
    rows, problems = [], []
    for rank, row in enumerate(worst.iter_rows(named=True), 1):
        row_html, row_problems = worst_row_html(rank, row, images, out_dir)
        rows.append(row_html)
        problems += row_problems
    header = ("<th>#</th><th>sample_id</th><th>true state</th><th>predicted state</th><th>error km</th>"
              '<th>map: <span style="color:#1f5fa8">● truth</span> <span style="color:#d62728">× prediction</span></th>')
    header += "<th>views: north · east · south · west</th>" if images else ""
    table = f'<table class="worst"><thead><tr>{header}</tr></thead><tbody>\n' + "\n".join(rows) + "\n</tbody></table>"
    notes = [note(why_none)] if why_none else []
    if problems:
        items = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
        notes.append(note(f"{len(problems)} view(s) could not be shown; grey tiles stand in for them:")
                     + f'<ul class="note">{items}</ul>')
    return section("worst", f"The {worst.height} worst errors", *notes, table)


# ---------------------------------------------------------------- page


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1260px; margin: 24px auto; padding: 0 20px; }
h1 { font-size: 26px; margin-bottom: 4px; }
h2 { font-size: 20px; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 36px; }
img { max-width: 100%; height: auto; }
.note { color: #555; }
ul.note { margin-top: -8px; font-size: 13px; }
.test-label { background: #f3f0fa; border-left: 4px solid #7a5cc0; padding: 6px 14px; }
.warning { background: #fff4e0; border-left: 4px solid #e69500; padding: 8px 14px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12px; }
th, td { padding: 3px 5px; border-bottom: 1px solid #eee; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f4f4f4; position: sticky; top: 0; }
table.scores td:nth-child(2) { text-align: left; color: #666; }
table.members td:nth-child(-n+3), table.members th:nth-child(-n+3) { text-align: left; }
table.members td:nth-child(3) { color: #666; }
td.split, th.split { text-align: left; color: #666; }
tr.test td, tr.test th { background: #f3f0fa; }
tr.test td.split { color: #5a3fa0; font-weight: 600; }
td.best { font-weight: 700; }
tbody th { font-weight: 500; }
tr.final { background: #eef5ff; }
table.worst td, table.worst th { text-align: left; vertical-align: middle; }
table.worst td.num { text-align: right; }
td.thumbs img, td.pair-map img { display: block; }
dl.run { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; margin: 8px 0; }
dl.run dt { color: #666; } dl.run dd { margin: 0; }
"""


def data_warnings(run: dict) -> list[str]:
    """Plain words on what the numbers do not mean, from run.json's flags."""
    if not run:
        return ["run.json was not found: whether the data was synthetic or the backbones random is unknown."]
    warnings_ = []
    if run.get("synthetic"):
        warnings_.append("Synthetic data: the images were drawn by `geoscout synth`, not taken from street views. "
                         "These numbers test the pipeline; they say nothing about real-world accuracy.")
    if run.get("random_backbones"):
        warnings_.append("Random backbones: the feature extractors ran with random weights (no pretrained weights "
                         "were loaded), so the features carry no learned visual knowledge.")
    return warnings_


def run_summary(inputs: RunInputs) -> str:
    run = inputs.run
    items = {
        "work folder": str(inputs.work_dir),
        "data": run.get("data_dir", "unknown"),
        "backbones": ", ".join(run.get("backbones", [])) or "unknown",
        "presets": ", ".join(run.get("presets", [])) or "unknown",
        "final model": run.get("final_model", "unknown"),
        "validation locations": f"{inputs.val.height:,}",
    }
    if inputs.test_scores:
        sizes = {int(row["n"]) for row in inputs.test_scores.values() if row.get("n") is not None}
        items["test locations"] = ", ".join(f"{n:,}" for n in sorted(sizes)) + " (synthetic test truth)"
    return '<dl class="run">' + "".join(
        f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items.items()) + "</dl>"


def render_page(inputs: RunInputs, sections: list[str]) -> str:
    warnings_ = "".join(f'<p class="warning">{html.escape(w)}</p>' for w in data_warnings(inputs.run))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>geoscout report: {html.escape(inputs.work_dir.name)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>geoscout report</h1>\n{run_summary(inputs)}\n{warnings_}\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )
