"""`geoscout report WORK_DIR`: one self-contained, offline HTML page about a finished run.

Reads what `geoscout run` leaves in WORK_DIR (run.json, eval/, store/train.samples.csv) and writes
WORK_DIR/report/index.html with every plot inline as a base64 PNG, plus the same PNGs beside it.
Plots use matplotlib's object API (Figure, no pyplot), so no global backend is touched.
"""

from __future__ import annotations

import base64
import colorsys
import html
import io
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
from PIL import Image, ImageDraw

from .competition import IMAGE_COLUMNS, VIEWS
from .errors import GeoscoutError, MissingFileError
from .metric import DISTANCE_THRESHOLDS_KM, METRIC_KEYS
from .states import STATES

REPORT_DIR = "report"
DPI = 110
WORST_COUNT = 8
MAP_MAX_POINTS = 2000
THUMB_PX = 128
PRED_STATE_COLUMNS = tuple(f"pred_state_idx_{k}" for k in range(1, 6))
VAL_COLUMNS = (
    "sample_id", "true_state_idx", "true_latitude", "true_longitude",
    *PRED_STATE_COLUMNS, "pred_latitude", "pred_longitude", "km",
)
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
# Plain lon/lat frames (lon_min, lon_max, lat_min, lat_max): the lower 48, and insets for the rest.
LOWER48 = (-125.5, -66.0, 23.5, 50.0)
INSETS = {"Alaska": (-170.0, -129.0, 51.0, 71.5), "Hawaii": (-160.5, -154.5, 18.5, 22.5)}
# Inset rectangles in the main map's axes fraction: bottom left, over the Pacific and Mexico.
INSET_BOXES = {"Alaska": (0.0, 0.0, 0.24, 0.27), "Hawaii": (0.25, 0.0, 0.13, 0.13)}


@dataclass(frozen=True)
class RunInputs:
    work_dir: Path
    run: dict  # run.json; {} when absent
    scores: dict[str, dict[str, float]]
    val: pl.DataFrame
    alpha: dict | None
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
    for stale in out_dir.glob("*.png"):  # a previous report's plots must not outlive it (e.g. worst_08.png)
        stale.unlink()
    sections = [
        scores_section(inputs),
        map_section(inputs, out_dir),
        cdf_section(inputs, out_dir),
        confusion_section(inputs, out_dir),
        per_state_section(inputs, out_dir),
        alpha_section(inputs, out_dir),
        worst_section(inputs, out_dir),
        *([ablation_section(inputs.ablation)] if inputs.ablation else []),
    ]
    page = out_dir / "index.html"
    page.write_text(render_page(inputs, sections), encoding="utf-8")
    return page


# ---------------------------------------------------------------- inputs


def load_inputs(work_dir: Path) -> RunInputs:
    return RunInputs(
        work_dir=work_dir,
        run=_read_optional_json(work_dir / "run.json") or {},
        scores=_read_required_json(work_dir / "eval" / "scores.json"),
        val=read_val_predictions(work_dir / "eval" / "val_predictions.csv"),
        alpha=_read_optional_json(work_dir / "eval" / "alpha_curve.json"),
        train=_read_train_samples(work_dir / "store" / "train.samples.csv"),
        ablation=_read_optional_json(work_dir / "eval" / "ablation.json"),
    )


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise MissingFileError(f"{path}: file not found; the report needs it (run `geoscout run` first)")


def _read_required_json(path: Path) -> dict:
    _require_file(path)
    return json.loads(path.read_text(encoding="utf-8"))


def _read_optional_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_val_predictions(path: Path) -> pl.DataFrame:
    _require_file(path)
    val = pl.read_csv(path, schema_overrides={"sample_id": pl.Utf8})
    missing = [c for c in VAL_COLUMNS if c not in val.columns]
    if missing:
        raise GeoscoutError(f"{path}: missing column(s) {missing}; found {val.columns}")
    if val.height == 0:
        raise GeoscoutError(f"{path}: no rows; the report needs validation predictions")
    return val


def _read_train_samples(path: Path) -> pl.DataFrame | None:
    if not path.is_file():
        return None
    return pl.read_csv(path, columns=["state_idx", "latitude", "longitude"]).drop_nulls()


# ---------------------------------------------------------------- shared helpers


def state_colour(state_idx: int) -> tuple[float, float, float]:
    """A fixed colour per state_idx, the same in every plot: golden-ratio hue steps, three tones."""
    hue = (state_idx * 0.618033988749895) % 1.0
    saturation, value = ((0.80, 0.85), (0.55, 0.70), (0.95, 0.55))[state_idx % 3]
    return colorsys.hsv_to_rgb(hue, saturation, value)


def state_label(state_idx: int) -> str:
    return STATES[state_idx] if 0 <= state_idx < len(STATES) else f"#{state_idx}"


def save_plot(fig: Figure, out_dir: Path, name: str) -> Plot:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return save_png_bytes(buffer.getvalue(), out_dir, name)


def save_png_bytes(png: bytes, out_dir: Path, name: str) -> Plot:
    path = out_dir / name
    path.write_bytes(png)
    return Plot(path, "data:image/png;base64," + base64.b64encode(png).decode("ascii"))


def img_tag(plot: Plot, alt: str) -> str:
    return f'<img src="{plot.data_uri}" alt="{html.escape(alt)}">'


def section(anchor: str, title: str, *body: str) -> str:
    return f'<section id="{anchor}">\n<h2>{html.escape(title)}</h2>\n' + "\n".join(body) + "\n</section>"


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    fig.set_layout_engine("constrained")
    return fig


def tidy(ax: Axes) -> None:
    """No chart junk: drop the top and right frame lines."""
    ax.spines[["top", "right"]].set_visible(False)


def true_states(val: pl.DataFrame) -> np.ndarray:
    return val["true_state_idx"].to_numpy()


def top1_states(val: pl.DataFrame) -> np.ndarray:
    return val["pred_state_idx_1"].to_numpy()


# ---------------------------------------------------------------- 1. scores table


def split_model_key(key: str) -> tuple[str, str]:
    """'default/ensemble' -> ('default', 'ensemble'); a key without a preset ('baseline') -> ('', key)."""
    preset, _, model = key.rpartition("/")
    return preset, model


def score_rows_order(scores: dict, presets: list[str]) -> list[str]:
    """Ensemble first, heads by name, baseline last; presets of one model side by side, in run order."""
    def rank(key: str) -> tuple:
        preset, model = split_model_key(key)
        group = 0 if model == "ensemble" else 2 if model == "baseline" else 1
        preset_rank = presets.index(preset) if preset in presets else len(presets)
        return group, model, preset_rank, preset
    return sorted(scores, key=rank)


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


def score_row_html(key: str, metrics: dict, best: dict[str, float], final_model: str) -> str:
    preset, model = split_model_key(key)
    cells = []
    for metric in METRIC_KEYS:
        value = metrics.get(metric)
        is_best = value is not None and metric in best and math.isclose(value, best[metric], rel_tol=1e-9)
        cells.append(f'<td class="{"best" if is_best else ""}">{format_metric(metric, value)}</td>')
    final = ' class="final"' if key == final_model else ""
    marker = " ★" if key == final_model else ""
    return (f'<tr{final} data-model="{html.escape(key)}"><th scope="row">{html.escape(model)}{marker}</th>'
            f"<td>{html.escape(preset or '–')}</td>" + "".join(cells) + "</tr>")


def scores_table(inputs: RunInputs) -> str:
    best = best_values(inputs.scores)
    final_model = inputs.run.get("final_model", "")
    header = "".join(
        f'<th data-metric="{key}" title="{key}">{html.escape(label)}</th>' for key, (label, _, _) in METRIC_FORMATS.items()
    )
    rows = [
        score_row_html(key, inputs.scores[key], best, final_model)
        for key in score_rows_order(inputs.scores, list(inputs.run.get("presets", [])))
    ]
    return ('<div class="scroll"><table class="scores">\n<thead><tr><th>Model</th><th>Preset</th>' + header
            + "</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table></div>")


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
    return section("scores", "Scores", explain, scores_table(inputs))


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


def frame_has_points(frame: tuple[float, float, float, float], lats: np.ndarray, lons: np.ndarray) -> bool:
    lon0, lon1, lat0, lat1 = frame
    return bool(np.any((lons >= lon0) & (lons <= lon1) & (lats >= lat0) & (lats <= lat1)))


def set_lonlat_frame(ax: Axes, frame: tuple[float, float, float, float]) -> None:
    """Plain lon/lat with aspect 1/cos(mid latitude): east-west distances look right near that latitude."""
    lon0, lon1, lat0, lat1 = frame
    ax.set_xlim(lon0, lon1)
    ax.set_ylim(lat0, lat1)
    ax.set_aspect(1.0 / math.cos(math.radians((lat0 + lat1) / 2)))


def draw_training_background(ax: Axes, train: pl.DataFrame, marker_scale: float) -> None:
    colours = [state_colour(s) for s in train["state_idx"].to_list()]
    # Fainter as points grow denser: state shapes should show, not a solid blot.
    alpha = float(np.clip(12.0 / math.sqrt(train.height), 0.08, 0.4))
    ax.scatter(train["longitude"], train["latitude"], s=5 * marker_scale, c=colours,
               alpha=alpha, linewidths=0, rasterized=True, zorder=1)


def draw_locations(ax: Axes, points: MapPoints, marker_scale: float) -> None:
    """Training background (state-coloured, faint), error lines, truth dots and predicted crosses."""
    val = points.val
    if points.train is not None:
        draw_training_background(ax, points.train, marker_scale)
    true_xy = np.column_stack([val["true_longitude"], val["true_latitude"]])
    pred_xy = np.column_stack([val["pred_longitude"], val["pred_latitude"]])
    lines = np.stack([true_xy, pred_xy], axis=1)
    ax.add_collection(LineCollection(lines, colors="0.25", linewidths=0.5, alpha=0.45, zorder=2))
    ax.scatter(true_xy[:, 0], true_xy[:, 1], s=16 * marker_scale, c=[state_colour(s) for s in true_states(val)],
               edgecolors="black", linewidths=0.4, zorder=3)
    ax.scatter(pred_xy[:, 0], pred_xy[:, 1], s=22 * marker_scale, marker="x",
               c=[state_colour(s) for s in top1_states(val)], linewidths=1.1, zorder=4)


def map_legend(fig: Figure, val: pl.DataFrame) -> None:
    shown = sorted(set(true_states(val)) | set(top1_states(val)))
    keys = [
        Line2D([], [], marker="o", ls="", color="0.6", markeredgecolor="black", label="truth"),
        Line2D([], [], marker="x", ls="", color="0.3", label="prediction (top-1 colour)"),
        Line2D([], [], color="0.25", lw=0.8, label="error"),
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
        if not frame_has_points(frame, lats, lons):
            continue
        inset = ax.inset_axes(INSET_BOXES[name])
        draw_locations(inset, points, marker_scale=0.6)
        set_lonlat_frame(inset, frame)
        inset.set_xticks([])
        inset.set_yticks([])
        inset.set_title(name, fontsize=8, pad=2)
        inset.set_facecolor("white")
        drawn.append(name)
    return drawn


def outside_count(val: pl.DataFrame, frames: list[tuple[float, float, float, float]]) -> int:
    """Predictions that fall in none of the drawn frames (drawn off the map)."""
    lats, lons = val["pred_latitude"].to_numpy(), val["pred_longitude"].to_numpy()
    inside = np.zeros(len(lats), dtype=bool)
    for lon0, lon1, lat0, lat1 in frames:
        inside |= (lons >= lon0) & (lons <= lon1) & (lats >= lat0) & (lats <= lat1)
    return int((~inside).sum())


def map_caption(inputs: RunInputs, points: MapPoints, insets: list[str]) -> str:
    texts = ["Dots: true locations; crosses: predictions; grey lines join them."]
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
    fig = new_figure(12, 8.2)
    ax = fig.add_subplot()
    draw_locations(ax, points, marker_scale=1.0)
    set_lonlat_frame(ax, LOWER48)
    ax.set_xlabel("longitude (°)")
    ax.set_ylabel("latitude (°)")
    ax.set_title(f"Validation predictions vs truth ({points.val.height:,} locations)")
    tidy(ax)
    insets = add_insets(ax, points)
    map_legend(fig, points.val)
    plot = save_plot(fig, out_dir, "map.png")
    return section("map", "Map of validation predictions", note(map_caption(inputs, points, insets)), img_tag(plot, "map"))


# ---------------------------------------------------------------- 3. error CDF


def cdf_section(inputs: RunInputs, out_dir: Path) -> str:
    km = inputs.val["km"].to_numpy()
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
                    rotation=90, va="bottom", fontsize=9, bbox=dict(fc="white", ec="none", alpha=0.8, pad=1))
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
    plot = save_plot(fig, out_dir, "error_cdf.png")
    return section("cdf", "Error distance CDF", img_tag(plot, "error CDF"))


# ---------------------------------------------------------------- 4. confusion matrix


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, states: list[int]) -> np.ndarray:
    """Counts, rows truth and columns top-1 prediction, over the given state order."""
    position = {s: i for i, s in enumerate(states)}
    counts = np.zeros((len(states), len(states)))
    np.add.at(counts, ([position[s] for s in truth], [position[s] for s in pred]), 1)
    return counts


def row_normalise(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def annotate_cells(ax: Axes, matrix: np.ndarray) -> None:
    for (row, col), value in np.ndenumerate(matrix):
        if value >= 0.005:
            ax.text(col, row, f"{value * 100:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if value > 0.55 else "black")


def confusion_section(inputs: RunInputs, out_dir: Path) -> str:
    truth, pred = true_states(inputs.val), top1_states(inputs.val)
    states = sorted(set(truth) | set(pred))
    counts = confusion_matrix(truth, pred, states)
    matrix = row_normalise(counts)
    side = 3.0 + 0.3 * len(states)
    fig = new_figure(side + 1.5, side)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    if len(states) <= 24:  # numbers stay legible up to about this size
        annotate_cells(ax, matrix)
    ax.set_xticks(range(len(states)), [state_label(s) for s in states], rotation=90, fontsize=8)
    ax.set_yticks(range(len(states)), [f"{state_label(s)} ({int(n)})" for s, n in zip(states, counts.sum(axis=1))],
                  fontsize=8)
    ax.set_xlabel("predicted state (top-1)")
    ax.set_ylabel("true state (validation count)")
    ax.set_title("State confusion, each row normalised (%)")
    fig.colorbar(image, ax=ax, shrink=0.6, label="fraction of the true state's locations")
    plot = save_plot(fig, out_dir, "confusion.png")
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


def per_state_section(inputs: RunInputs, out_dir: Path) -> str:
    stats = per_state_stats(inputs.val)
    fig = new_figure(12, 1.6 + 0.26 * len(stats.state_idx))
    left, right = fig.subplots(1, 2)
    state_bars(left, stats, stats.accuracy, np.argsort(-stats.accuracy, kind="stable"), "{:.0%}  n={}")
    left.set_xlim(0, 1.18)  # room for the labels beyond a full bar
    left.set_xlabel("top-1 accuracy")
    left.set_title("Top-1 accuracy per true state")
    state_bars(right, stats, stats.mean_km, np.argsort(stats.mean_km, kind="stable"), "{:,.0f} km  n={}")
    right.set_xlim(0, max(float(stats.mean_km.max()), 1.0) * 1.3)
    right.set_xlabel("mean error (km)")
    right.set_title("Mean error per true state")
    plot = save_plot(fig, out_dir, "per_state.png")
    return section("per-state", "Per-state accuracy and error", img_tag(plot, "per-state accuracy and mean km"))


# ---------------------------------------------------------------- 6. ensemble alpha curve


def alpha_section(inputs: RunInputs, out_dir: Path) -> str:
    title = "Ensemble α curve"
    if inputs.alpha is None:
        return section("alpha", title, note(
            "No eval/alpha_curve.json: no ensemble α was fitted (a run with one backbone has none)."))
    curve = inputs.alpha["curve"]
    chosen = float(inputs.alpha["chosen_alpha"])
    alphas = np.array([row["alpha"] for row in curve])
    fig = new_figure(9, 4.4)
    ax = fig.add_subplot()
    for key, label, style in (("score", "score", "-"), ("classification_score", "classification", "--"),
                              ("gps_score", "GPS", ":")):
        ax.plot(alphas, [row[key] for row in curve], style, lw=2 if key == "score" else 1.3, label=label)
    chosen_score = float(np.interp(chosen, alphas, [row["score"] for row in curve]))
    ax.axvline(chosen, color="#c0392b", lw=1)
    ax.annotate(f"chosen α = {chosen:.2f}\nscore {chosen_score:.4f}", (chosen, chosen_score), xytext=(8, -30),
                textcoords="offset points", fontsize=9, color="#c0392b")
    ax.set_xlabel("α (weight of the first ensemble member's logits)")
    ax.set_ylabel("validation score")
    ax.set_xlim(0, 1)
    ax.set_title("Competition score vs ensemble α")
    ax.legend(frameon=False, fontsize=9)
    tidy(ax)
    plot = save_plot(fig, out_dir, "alpha_curve.png")
    return section("alpha", title, img_tag(plot, "alpha curve"))


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
        "mean ± std over the seeds. Validation rows also chose α, temperatures and the retrieval weight; "
        "test rows (synthetic data only) were never seen."
    )
    return section("ablation", "Ablation: the seed recipe, the default, and the default without each addition", explain, *tables)


# ---------------------------------------------------------------- 7. worst errors


def image_paths(run: dict) -> tuple[dict[str, list[Path]], str | None]:
    """sample_id -> the four training image paths (N, E, S, W), or an empty map and why."""
    if "data_dir" not in run:
        return {}, "run.json does not name the data folder, so no thumbnails are shown."
    data_dir = Path(run["data_dir"]).expanduser()
    table = data_dir / "train_ground_truth.csv"
    if not table.is_file():
        return {}, f"{table} is not available, so no thumbnails are shown."
    columns = ["sample_id", *IMAGE_COLUMNS]
    rows = pl.read_csv(table, columns=columns, infer_schema=False)
    images = data_dir / "train_images"
    return {sid: [images / name for name in names] for sid, *names in rows.iter_rows()}, None


def thumbnail_strip(paths: list[Path]) -> tuple[bytes, int]:
    """The four views side by side as one PNG, and how many were missing (drawn as grey tiles)."""
    strip = Image.new("RGB", (THUMB_PX * len(paths), THUMB_PX), "white")
    missing = 0
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as view:
                tile = view.convert("RGB").resize((THUMB_PX, THUMB_PX), Image.Resampling.BILINEAR)
        except OSError:  # absent or unreadable: a placeholder keeps the N/E/S/W order
            tile = Image.new("RGB", (THUMB_PX, THUMB_PX), (200, 200, 200))
            ImageDraw.Draw(tile).text((THUMB_PX // 2 - 20, THUMB_PX // 2 - 5), "missing", fill=(90, 90, 90))
            missing += 1
        strip.paste(tile, (i * THUMB_PX, 0))
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue(), missing


def worst_row_html(rank: int, row: dict, paths: dict[str, list[Path]], out_dir: Path) -> tuple[str, int]:
    """One table row; returns it and the number of missing images."""
    cells = [
        f"<td>{rank}</td>", f"<td>{html.escape(row['sample_id'])}</td>",
        f"<td>{html.escape(state_label(row['true_state_idx']))}</td>",
        f"<td>{html.escape(state_label(row['pred_state_idx_1']))}</td>",
        f"<td class=\"num\">{row['km']:,.0f}</td>",
    ]
    missing = 0
    if paths:
        views = paths.get(row["sample_id"])
        if views is None:
            cells.append("<td>not in train_ground_truth.csv</td>")
            missing = len(VIEWS)
        else:
            png, missing = thumbnail_strip(views)
            plot = save_png_bytes(png, out_dir, f"worst_{rank:02d}.png")
            alt = f"views of sample {row['sample_id']}"
            cells.append(f'<td class="thumbs">{img_tag(plot, alt)}</td>')
    return "<tr>" + "".join(cells) + "</tr>", missing


def worst_section(inputs: RunInputs, out_dir: Path) -> str:
    worst = inputs.val.sort("km", descending=True).head(WORST_COUNT)
    paths, why_none = image_paths(inputs.run)
    rows, missing = [], 0
    for rank, row in enumerate(worst.iter_rows(named=True), 1):
        row_html, row_missing = worst_row_html(rank, row, paths, out_dir)
        rows.append(row_html)
        missing += row_missing
    header = "<th>#</th><th>sample_id</th><th>true state</th><th>predicted state</th><th>error km</th>"
    header += "<th>views: north · east · south · west</th>" if paths else ""
    table = f'<table class="worst"><thead><tr>{header}</tr></thead><tbody>\n' + "\n".join(rows) + "\n</tbody></table>"
    notes = [why_none] if why_none else []
    if missing:
        notes.append(f"{missing} image(s) could not be read; grey tiles stand in for them.")
    return section("worst", f"The {worst.height} worst errors", *(note(t) for t in notes), table)


# ---------------------------------------------------------------- page


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1260px; margin: 24px auto; padding: 0 20px; }
h1 { font-size: 26px; margin-bottom: 4px; }
h2 { font-size: 20px; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 36px; }
img { max-width: 100%; height: auto; }
.note { color: #555; }
.warning { background: #fff4e0; border-left: 4px solid #e69500; padding: 8px 14px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12.5px; }
th, td { padding: 3px 6px; border-bottom: 1px solid #eee; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f4f4f4; position: sticky; top: 0; }
table.scores td:nth-child(2) { text-align: left; color: #666; }
td.best { font-weight: 700; }
tbody th { font-weight: 500; }
tr.final { background: #eef5ff; }
table.worst td, table.worst th { text-align: left; vertical-align: middle; }
table.worst td.num { text-align: right; }
td.thumbs img { display: block; }
dl.run { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; margin: 8px 0; }
dl.run dt { color: #666; } dl.run dd { margin: 0; }
"""


def data_warnings(run: dict) -> list[str]:
    """Plain words on what the numbers do not mean, from run.json's flags."""
    if not run:
        return ["run.json was not found: whether the data was synthetic or the backbones random is unknown."]
    warnings = []
    if run.get("synthetic"):
        warnings.append("Synthetic data: the images were drawn by `geoscout synth`, not taken from street views. "
                        "These numbers test the pipeline; they say nothing about real-world accuracy.")
    if run.get("random_backbones"):
        warnings.append("Random backbones: the feature extractors ran with random weights (no pretrained weights "
                        "were loaded), so the features carry no learned visual knowledge.")
    return warnings


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
    return '<dl class="run">' + "".join(
        f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items.items()) + "</dl>"


def render_page(inputs: RunInputs, sections: list[str]) -> str:
    warnings = "".join(f'<p class="warning">{html.escape(w)}</p>' for w in data_warnings(inputs.run))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>geoscout report: {html.escape(inputs.work_dir.name)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>geoscout report</h1>\n{run_summary(inputs)}\n{warnings}\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )
