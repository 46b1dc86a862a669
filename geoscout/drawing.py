"""Drawing pieces shared by the run report and the locate card: state colours, lon/lat map frames with
the state borders, PNG encoding, and view tiles that never raise for a bad picture.

Figures use matplotlib's object API (no pyplot), so no global backend is touched.
"""

from __future__ import annotations

import base64
import colorsys
import io
import math
import warnings
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from .borders import border_lines
from .data import resolve_image
from .images import ImageError, decode_rgb
from .states import STATES

DPI = 110
THUMB_PX = 128
# Plain lon/lat frames (lon_min, lon_max, lat_min, lat_max): the lower 48, and insets for the rest.
Frame = tuple[float, float, float, float]
LOWER48: Frame = (-125.5, -66.0, 23.5, 50.0)
INSETS: dict[str, Frame] = {"Alaska": (-170.0, -129.0, 51.0, 71.5), "Hawaii": (-160.5, -154.5, 18.5, 22.5)}
BORDER_STYLE = {"colors": "0.62", "linewidths": 0.6, "zorder": 1.5}  # above the faint background, below the points
GID_BORDERS = "state-borders"  # the artist id a reader of a figure (the tests) looks up


def state_colour(state_idx: int) -> tuple[float, float, float]:
    """A fixed colour per state_idx, the same in every plot: golden-ratio hue steps, three tones."""
    hue = (state_idx * 0.618033988749895) % 1.0
    saturation, value = ((0.80, 0.85), (0.55, 0.70), (0.95, 0.55))[state_idx % 3]
    return colorsys.hsv_to_rgb(hue, saturation, value)


def state_label(state_idx: int) -> str:
    return STATES[state_idx] if 0 <= state_idx < len(STATES) else f"#{state_idx}"


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    fig.set_layout_engine("constrained")
    return fig


def tidy(ax: Axes) -> None:
    """No chart junk: drop the top and right frame lines."""
    ax.spines[["top", "right"]].set_visible(False)


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return buffer.getvalue()


def image_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """PNG bytes as an inline image source: a page that needs no file beside it."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def in_frame(frame: Frame, lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
    lon0, lon1, lat0, lat1 = frame
    return (lons >= lon0) & (lons <= lon1) & (lats >= lat0) & (lats <= lat1)


def set_lonlat_frame(ax: Axes, frame: Frame) -> None:
    """Plain lon/lat with aspect 1/cos(mid latitude): east-west distances look right near that latitude."""
    lon0, lon1, lat0, lat1 = frame
    ax.set_xlim(lon0, lon1)
    ax.set_ylim(lat0, lat1)
    ax.set_aspect(1.0 / math.cos(math.radians((lat0 + lat1) / 2)))


def draw_borders(ax: Axes, scale: float = 1.0) -> None:
    """The 50 states' outlines (US Census cartographic boundaries; see geoscout/borders.py)."""
    style = {**BORDER_STYLE, "linewidths": BORDER_STYLE["linewidths"] * scale}
    ax.add_collection(LineCollection(border_lines(), gid=GID_BORDERS, **style), autolim=False)


def view_tile(path: Path, size: int = THUMB_PX) -> tuple[Image.Image | None, str | None]:
    """One picture as a size x size tile, or None and why not; never raises for a bad file.

    decode_rgb turns PIL's OSError/SyntaxError/ValueError into ImageError. A picture over PIL's pixel
    limit is not decoded: the limit's warning counts as the error.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            pixels = decode_rgb(path)
    except ImageError as exc:
        return None, str(exc)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, f"more pixels than PIL's decompression-bomb limit ({Image.MAX_IMAGE_PIXELS:,})"
    return Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR), None


def read_tile(images_dir: Path, name: str, size: int = THUMB_PX) -> tuple[Image.Image | None, str | None]:
    """`view_tile` of an image named as a competition CSV names it (names that escape the folder are refused)."""
    try:
        path = resolve_image(images_dir, name)
    except ImageError as exc:
        return None, str(exc)
    return view_tile(path, size)


def grey_tile(size: int = THUMB_PX, text: str = "not shown") -> Image.Image:
    tile = Image.new("RGB", (size, size), (200, 200, 200))
    ImageDraw.Draw(tile).text((size // 2, size // 2), text, fill=(90, 90, 90),
                              font=ImageFont.load_default(size=14), anchor="mm")
    return tile


def tile_strip(tiles: list[Image.Image], size: int = THUMB_PX) -> bytes:
    """Tiles side by side, as one PNG."""
    strip = Image.new("RGB", (size * len(tiles), size), "white")
    for i, tile in enumerate(tiles):
        strip.paste(tile, (i * size, 0))
    return image_png(strip)
