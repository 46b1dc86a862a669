"""Derive geoscout/resources/us_states.geojson from the us-atlas package's states-10m.json (run once, by hand).

    python scripts/make_us_states.py                     # fetches us-atlas@3.0.1 with `npm pack`
    python scripts/make_us_states.py us-atlas-3.0.1.tgz  # or reads a tarball you already have

us-atlas (ISC licence) redistributes the US Census Bureau's 2017 cartographic boundary files
(public domain) as quantized, simplified, unprojected TopoJSON. The report only needs the state
outlines, so this keeps the 50 states (no DC, no territories), decodes the topology into plain
GeoJSON polygons in longitude/latitude, and drops the TopoJSON machinery from the run-time code.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from geoscout.states import STATES

PACKAGE = "us-atlas@3.0.1"
MEMBER = "package/states-10m.json"
# The file as published in us-atlas 3.0.1: a different one would need a new look at the output.
EXPECTED_SHA256 = "d76b391ccfa8bff601d51e3e3da5d43a89fa46cd5caca72ce731b383be5596d0"
DECIMALS = 4  # the source's quantization step is 0.0036° x 0.00086°: four decimals keep every vertex
OUT_PATH = Path(__file__).resolve().parents[1] / "geoscout" / "resources" / "us_states.geojson"


def read_topology(tarball: Path) -> tuple[dict, str]:
    with tarfile.open(tarball) as tar:
        raw = tar.extractfile(MEMBER).read()
    return json.loads(raw), hashlib.sha256(raw).hexdigest()


def fetch_tarball(folder: Path) -> Path:
    name = subprocess.run(["npm", "pack", PACKAGE], cwd=folder, check=True, capture_output=True, text=True).stdout
    return folder / name.strip().splitlines()[-1]


def decode_arcs(topology: dict) -> list[list[tuple[float, float]]]:
    """TopoJSON arcs are delta-encoded integer positions; the transform maps them back to lon/lat."""
    (sx, sy), (tx, ty) = topology["transform"]["scale"], topology["transform"]["translate"]
    arcs = []
    for arc in topology["arcs"]:
        x = y = 0
        points = []
        for dx, dy in arc:
            x, y = x + dx, y + dy
            points.append((round(x * sx + tx, DECIMALS), round(y * sy + ty, DECIMALS)))
        arcs.append(points)
    return arcs


def ring(arc_ids: list[int], arcs: list[list[tuple[float, float]]]) -> list[list[float]]:
    """A closed ring from arc references; a negative id ~i means arc i reversed. Joined arcs share an end point."""
    points: list[tuple[float, float]] = []
    for i in arc_ids:
        arc = arcs[i] if i >= 0 else arcs[~i][::-1]
        points.extend(arc if not points else arc[1:])
    return [list(p) for p in points]


def polygons(geometry: dict, arcs) -> list[list[list[list[float]]]]:
    """GeoJSON polygons; a ring the simplification left with under 4 positions (no area) is dropped, as GeoJSON requires."""
    parts = geometry["arcs"] if geometry["type"] == "MultiPolygon" else [geometry["arcs"]]
    out = []
    for polygon in parts:
        rings = [ring(r, arcs) for r in polygon]
        if len(rings[0]) >= 4:  # a polygon whose outer ring collapsed is gone with its holes
            out.append([r for r in rings if len(r) >= 4])
    return out


def state_features(topology: dict) -> list[dict]:
    arcs = decode_arcs(topology)
    by_name = {g["properties"]["name"]: g for g in topology["objects"]["states"]["geometries"]}
    missing = set(STATES) - set(by_name)
    if missing:
        raise SystemExit(f"{MEMBER} has no shape for {sorted(missing)}")
    return [
        {"type": "Feature", "properties": {"name": name, "state_idx": idx},
         "geometry": {"type": "MultiPolygon", "coordinates": polygons(by_name[name], arcs)}}
        for idx, name in enumerate(STATES)
    ]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tarball = Path(sys.argv[1]) if len(sys.argv) > 1 else fetch_tarball(Path(tmp))
        topology, digest = read_topology(tarball)
    if digest != EXPECTED_SHA256:
        print(f"note: {MEMBER} has sha256 {digest}, not the {PACKAGE} file this was written for", file=sys.stderr)
    collection = {
        "type": "FeatureCollection",
        "source": f"{PACKAGE} {MEMBER} (sha256 {digest}), from the US Census Bureau's 2017 cartographic "
                  "boundary files; the 50 states; see resources/README.md",
        "features": state_features(topology),
    }
    OUT_PATH.write_text(json.dumps(collection, separators=(",", ":")) + "\n", encoding="utf-8")
    points = sum(len(r) for f in collection["features"] for p in f["geometry"]["coordinates"] for r in p)
    print(f"wrote {len(collection['features'])} states, {points} vertices, {OUT_PATH.stat().st_size:,} bytes to {OUT_PATH}")


if __name__ == "__main__":
    main()
