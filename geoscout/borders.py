"""US state outlines for maps, in plain longitude/latitude.

The shapes are the US Census Bureau's 2017 cartographic boundaries (public domain) as simplified
by the us-atlas package (states-10m.json, ISC licence); scripts/make_us_states.py turned them into
geoscout/resources/us_states.geojson. Source, version and licence: geoscout/resources/README.md.
Shipped with the package, so maps draw offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

import numpy as np

STATES_GEOJSON = ("resources", "us_states.geojson")


@dataclass(frozen=True)
class StateOutline:
    state_idx: int
    name: str
    rings: tuple[np.ndarray, ...]  # each (K, 2) lon/lat, closed; outer boundaries and holes alike


def _ring(coordinates: list) -> np.ndarray:
    ring = np.asarray(coordinates, dtype=np.float64)
    # The Aleutians reach past the 180th meridian; west of it they join the rest of Alaska on a plain lon/lat map.
    ring[:, 0] = np.where(ring[:, 0] > 0, ring[:, 0] - 360.0, ring[:, 0])
    ring.flags.writeable = False
    return ring


@lru_cache(maxsize=1)
def state_outlines() -> tuple[StateOutline, ...]:
    """The 50 states in state_idx order, read once per process."""
    collection = json.loads(files("geoscout").joinpath(*STATES_GEOJSON).read_text(encoding="utf-8"))
    outlines = []
    for feature in collection["features"]:
        polygons = feature["geometry"]["coordinates"]
        outlines.append(StateOutline(
            state_idx=int(feature["properties"]["state_idx"]),
            name=feature["properties"]["name"],
            rings=tuple(_ring(ring) for polygon in polygons for ring in polygon),
        ))
    return tuple(sorted(outlines, key=lambda o: o.state_idx))


def border_lines() -> list[np.ndarray]:
    """Every state's rings, ready for a matplotlib LineCollection (a shared border is drawn by both states)."""
    return [ring for outline in state_outlines() for ring in outline.rings]
