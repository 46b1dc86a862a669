"""`geoscout locate --html`: one self-contained page about one location (images inline, works offline).

The four photos, a map of the answer with the state borders (the ensemble's geocells sized by their
probability, the circles holding 50% and 90% of it, the nearest training locations), the top states'
probabilities and the neighbours' table.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .atomic import atomic_write_text
from .competition import VIEWS
from .drawing import (
    data_uri,
    draw_borders,
    figure_png,
    grey_tile,
    image_png,
    new_figure,
    set_lonlat_frame,
    state_colour,
    tidy,
    view_tile,
)
from .geo import circle_latlon
from .locate import Location, format_km

PHOTO_PX = 224
MIN_FRAME_DEG = 8.0  # the map is at least this many degrees of latitude tall: a few states around the answer
FRAME_ASPECT = 1.4  # width / height on the page
SHOWN_CELL_PROBABILITY = 1e-3  # cells below this are not drawn
GID_ANSWER, GID_CELLS, GID_NEIGHBOURS, GID_RADII = "answer", "cells", "neighbours", "radii"


def map_frame(location: Location) -> tuple[float, float, float, float]:
    """(lon0, lon1, lat0, lat1) around the answer holding its 90% circle and its neighbours, FRAME_ASPECT wide."""
    lats = [location.latitude] + [n.latitude for n in location.neighbours]
    lons = [location.longitude] + [n.longitude for n in location.neighbours]
    ring_lat, ring_lon = circle_latlon(location.latitude, location.longitude, max(location.radius_km.values()))
    lats, lons = np.concatenate([lats, ring_lat]), np.concatenate([lons, ring_lon])
    mid_lat, mid_lon = (lats.min() + lats.max()) / 2, (lons.min() + lons.max()) / 2
    k = math.cos(math.radians(mid_lat))
    height = max((lats.max() - lats.min()) * 1.15, (lons.max() - lons.min()) * k * 1.15 / FRAME_ASPECT, MIN_FRAME_DEG)
    width = height * FRAME_ASPECT / k
    return (mid_lon - width / 2, mid_lon + width / 2, mid_lat - height / 2, mid_lat + height / 2)


def map_figure(location: Location) -> Figure:
    fig = new_figure(7.0, 7.0 / FRAME_ASPECT + 0.6)
    ax = fig.add_subplot()
    ax.set_gid("map")
    draw_borders(ax)
    shown = location.cell_probability >= SHOWN_CELL_PROBABILITY
    cells = location.cell_latlon[shown]
    ax.scatter(cells[:, 1], cells[:, 0], s=900 * location.cell_probability[shown], alpha=0.45, linewidths=0,
               c=[state_colour(int(s)) for s in location.cell_state_idx[shown]], zorder=2, gid=GID_CELLS)
    for (share, km), style in zip(location.radius_km.items(), ("--", ":")):
        ring_lat, ring_lon = circle_latlon(location.latitude, location.longitude, km)
        ax.plot(ring_lon, ring_lat, style, color="0.2", lw=1.0, zorder=3, gid=f"{GID_RADII}-{share:.0%}",
                label=f"{share:.0%} of the probability ({format_km(km)} km)")
    if location.neighbours:
        ax.scatter([n.longitude for n in location.neighbours], [n.latitude for n in location.neighbours], s=22,
                   c="white", edgecolors="black", linewidths=0.8, zorder=4, gid=GID_NEIGHBOURS,
                   label="nearest training locations")
        for n in location.neighbours:
            ax.annotate(str(n.rank), (n.longitude, n.latitude), xytext=(3, 3), textcoords="offset points", fontsize=7)
    ax.scatter([location.longitude], [location.latitude], marker="x", s=90, c="#d62728", linewidths=2.2, zorder=5,
               gid=GID_ANSWER, label="answer")
    set_lonlat_frame(ax, map_frame(location))
    ax.set_xlabel("longitude (°)")
    ax.set_ylabel("latitude (°)")
    ax.legend(loc="lower left", fontsize=7, framealpha=0.85)
    tidy(ax)
    return fig


def states_figure(location: Location) -> Figure:
    """The top states' probabilities as bars, most probable on top."""
    states = location.states
    fig = new_figure(4.2, 0.45 * len(states) + 0.8)
    ax = fig.add_subplot()
    ax.set_gid("states")
    y = np.arange(len(states))[::-1]
    ax.barh(y, [s.probability for s in states], color=[state_colour(s.state_idx) for s in states])
    ax.set_yticks(y, [f"{s.state} ({s.state_idx})" for s in states])
    for yi, s in zip(y, states):
        ax.text(min(s.probability, 1.0) + 0.01, yi, f"{s.probability:.1%}", va="center", fontsize=8)
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("probability")
    tidy(ax)
    return fig


def _photo(path: Path | None) -> tuple[str, str]:
    """(an <img> of the view, its caption's note): a grey tile where there is none or it cannot be read."""
    tile, why = (None, "missing") if path is None else view_tile(path, PHOTO_PX)
    tile = tile if tile is not None else grey_tile(PHOTO_PX, "missing" if path is None else "unreadable")
    return f'<img src="{data_uri(image_png(tile))}" alt="photo">', html.escape(why or path.name)


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1100px; margin: 24px auto; padding: 0 20px; }
h1 { font-size: 24px; margin-bottom: 2px; }
.answer { font-size: 18px; margin: 4px 0 14px; }
.note { color: #555; font-size: 13px; }
.warning { background: #fff4e0; border-left: 4px solid #e69500; padding: 6px 12px; }
.photos { display: flex; gap: 8px; flex-wrap: wrap; }
figure { margin: 0; text-align: center; font-size: 13px; color: #555; }
.plots { display: flex; gap: 16px; flex-wrap: wrap; align-items: flex-start; margin-top: 14px; }
img { max-width: 100%; height: auto; }
table { border-collapse: collapse; font-size: 13px; margin-top: 8px; }
th, td { padding: 3px 8px; border-bottom: 1px solid #eee; text-align: right; }
th:nth-child(3), td:nth-child(3) { text-align: left; }
"""


def card_html(location: Location) -> str:
    top = location.states[0]
    radii = ", ".join(f"{share:.0%} within {format_km(km)} km" for share, km in location.radius_km.items())
    photos = "".join(f"<figure>{img}<figcaption>{view}: {caption}</figcaption></figure>"
                     for view, (img, caption) in zip(VIEWS, (_photo(p) for p in location.views)))
    rows = "".join(
        f"<tr><td>{n.rank}</td><td>{n.sample_id}</td><td>{html.escape(n.state)}</td><td>{n.latitude:.4f}</td>"
        f"<td>{n.longitude:.4f}</td><td>{n.similarity:.3f}</td><td>{n.km:,.0f}</td></tr>" for n in location.neighbours)
    model = location.model
    warning = ""
    if model.get("random_backbones"):
        warning = (f'<p class="warning">Random backbones ({html.escape(", ".join(model["random_backbones"]))}): '
                   "the features carry no learned visual knowledge; this answer tests the pipeline only.</p>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>geoscout locate: {html.escape(top.state)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(top.state)} ({top.probability:.1%})</h1>\n"
        f'<p class="answer">latitude {location.latitude:.5f}, longitude {location.longitude:.5f}; '
        f"the model's probability: {radii}</p>\n{warning}\n"
        f'<div class="photos">{photos}</div>\n'
        f'<div class="plots"><img src="{data_uri(figure_png(map_figure(location)))}" alt="map">'
        f'<img src="{data_uri(figure_png(states_figure(location)))}" alt="top states"></div>\n'
        f'<p class="note">Map: the answer (red cross); the ensemble\'s geocells as discs sized by their probability, '
        "coloured by state; the smallest circles around the answer whose cells (counted at their centroids) hold 50% "
        "and 90% of the probability; the nearest training locations, numbered.</p>\n"
        "<h2>Nearest training locations</h2>\n"
        '<p class="note">Cosine of the location descriptors (mean of the embedded views, centred on the training '
        "mean, every backbone of the model); km from the answer.</p>\n"
        "<table><thead><tr><th>#</th><th>sample_id</th><th>state</th><th>latitude</th><th>longitude</th>"
        f"<th>cosine</th><th>km</th></tr></thead><tbody>{rows}</tbody></table>\n"
        f'<p class="note">Model: {html.escape(model.get("work_dir", ""))}, preset '
        f'{html.escape(model.get("preset", ""))}, backbones {html.escape(", ".join(model.get("backbones", [])))}.</p>\n'
        "</body>\n</html>\n"
    )


def write_card(location: Location, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, card_html(location))
    return path
