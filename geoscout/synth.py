"""A synthetic dataset in the competition's exact layout, for tests and demos.

Locations are real US populated places (jittered a few km); each of the four views is a
procedurally drawn scene whose palette and texture tell the state, whose continuous cues
(stripe angle and frequency, colour shift, sky tint) tell the position, and whose horizon
and lighting tell the direction, under enough noise that it is not trivial.

A `Difficulty` makes it harder the ways real data is hard: neighbouring states that look alike,
imbalanced states, heavier noise, views that carry no information, and broken image files
(which `extract --bad-images mask` masks). `DIFFICULTIES` names the settings the benchmarks use.
"""

from __future__ import annotations

import colorsys
import csv
import io
import math
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from functools import cache
from importlib.resources import files
from pathlib import Path

import numpy as np
from PIL import Image

from .competition import GROUND_TRUTH_COLUMNS, MAPPING_CSV, SUBMISSION_COLUMNS, TEST_CSV, TEST_TRUTH_CSV, TRAIN_CSV, VIEWS
from .errors import ConfigError
from .geo import haversine_km
from .states import NUM_STATES, STATES, state_index

IMAGE_SIZE = 256
JPEG_QUALITY = 90
JITTER_KM = 4.0
KM_PER_DEGREE = 111.2
# Fixed salt: a state's look is the same for every dataset seed, like a real state's is.
_STYLE_SALT = 20_240_601

# Per direction: horizon height (fraction of the image from the top), left-to-right light slope,
# overall brightness (looking south faces the sun in the northern hemisphere).
_HORIZON = (0.40, 0.47, 0.55, 0.50)
_LIGHT_SLOPE = (0.0, 0.45, 0.0, -0.45)
_BRIGHTNESS = (0.82, 1.0, 1.15, 1.0)


@dataclass(frozen=True)
class Difficulty:
    """How much harder than the plain synthetic set; the defaults are the plain set."""

    lookalike: float = 0.0  # 0..1: each state's look is blended this far toward its nearest chosen neighbour's
    imbalance: float = 0.0  # >= 0: state frequencies also fall as rank**-imbalance (Zipf-like), rank seeded
    noise: float = 1.0  # multiplier of the pixel grain
    blank_views: float = 0.0  # 0..1: share of views that show nothing of the place (an overexposed frame)
    broken_views: float = 0.0  # 0..1: share of views written as truncated JPEG files (to be masked)

    def __post_init__(self) -> None:
        for name in ("lookalike", "blank_views", "broken_views"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"difficulty {name} must be in [0, 1]; got {getattr(self, name)}")
        if self.imbalance < 0 or self.noise < 0:
            raise ConfigError("difficulty imbalance and noise must be non-negative")


DIFFICULTIES = {
    "standard": Difficulty(),
    "lookalike": Difficulty(lookalike=0.9),
    "imbalanced": Difficulty(lookalike=0.9, imbalance=1.2),
    "noisy": Difficulty(lookalike=0.6, noise=4.0, blank_views=0.25, broken_views=0.05),
    "hard": Difficulty(lookalike=0.8, imbalance=0.8, noise=3.0, blank_views=0.15, broken_views=0.03),
}


def difficulty_from(name: str = "standard", **overrides: float | None) -> Difficulty:
    """A named difficulty with some of its fields overridden (None leaves a field as named)."""
    if name not in DIFFICULTIES:
        raise ConfigError(f"unknown difficulty {name!r}; available: {', '.join(DIFFICULTIES)}")
    known = {f.name for f in fields(Difficulty)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown difficulty field(s) {unknown}; known: {sorted(known)}")
    return replace(DIFFICULTIES[name], **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class SynthSummary:
    out_dir: Path
    train_csv: Path
    test_csv: Path
    sample_submission_csv: Path
    state_mapping_csv: Path
    n_train: int
    n_test: int
    n_images: int
    states: tuple[str, ...]
    seconds: float
    difficulty: Difficulty


@dataclass(frozen=True)
class _Places:
    state: np.ndarray  # state_idx per place
    lat: np.ndarray
    lon: np.ndarray
    population: np.ndarray


@dataclass(frozen=True)
class _Location:
    sample_id: int
    state_idx: int
    lat: float
    lon: float


@dataclass(frozen=True)
class _StateStyle:
    sky: np.ndarray  # RGB in [0, 1]
    ground: np.ndarray
    accent: np.ndarray
    stripe_angle: float  # radians
    stripe_freq: float  # cycles per image
    bar_width: int  # pixels
    bar_height: float  # fraction of the image
    bar_density: float
    centre: tuple[float, float]  # mean lat/lon of the state's places
    spread: float  # degrees: scales the position cues to the state's size


@cache
def _load_places() -> _Places:
    """The shipped GeoNames table of US places (see geoscout/resources/README.md)."""
    text = files("geoscout").joinpath("resources", "us_places.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    return _Places(
        state=np.array([state_index(r["state"]) for r in rows], dtype=np.int64),
        lat=np.array([float(r["latitude"]) for r in rows]),
        lon=np.array([float(r["longitude"]) for r in rows]),
        population=np.array([float(r["population"]) for r in rows]),
    )


def choose_states(n_states: int) -> tuple[int, ...]:
    """The n_states states with the most places (ties by name), as sorted state indices."""
    if not 1 <= n_states <= NUM_STATES:
        raise ConfigError(f"n_states must be in 1..{NUM_STATES}, got {n_states}")
    counts = Counter(_load_places().state.tolist())
    ranked = sorted(counts, key=lambda s: (-counts[s], STATES[s]))
    return tuple(sorted(ranked[:n_states]))


def _rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32)


@cache
def _state_style(state_idx: int) -> _StateStyle:
    rng = np.random.default_rng([_STYLE_SALT, state_idx])
    # Golden-ratio hue steps keep the 50 ground hues far apart.
    hue = (state_idx * 0.6180339887) % 1.0
    places = _load_places()
    mine = places.state == state_idx
    lat, lon = places.lat[mine], places.lon[mine]
    return _StateStyle(
        sky=_rgb(0.55 + rng.uniform(-0.08, 0.08), rng.uniform(0.25, 0.6), rng.uniform(0.75, 0.95)),
        ground=_rgb(hue, rng.uniform(0.35, 0.8), rng.uniform(0.45, 0.8)),
        accent=_rgb(hue + rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.9), rng.uniform(0.3, 0.9)),
        stripe_angle=float(rng.uniform(0, math.pi)),
        stripe_freq=float(rng.uniform(4, 16)),
        bar_width=int(rng.integers(6, 28)),
        bar_height=float(rng.uniform(0.08, 0.3)),
        bar_density=float(rng.uniform(0.3, 0.9)),
        centre=(float(lat.mean()), float(lon.mean())),
        spread=max(float(lat.std()), float(lon.std()), 0.5),
    )


def _blend(a: _StateStyle, b: _StateStyle, t: float) -> _StateStyle:
    """a moved a fraction t toward b in every visual trait; its own centre and spread (position cues) stay."""
    mix = lambda x, y: (1 - t) * x + t * y  # noqa: E731
    return replace(
        a, sky=mix(a.sky, b.sky), ground=mix(a.ground, b.ground), accent=mix(a.accent, b.accent),
        stripe_angle=mix(a.stripe_angle, b.stripe_angle), stripe_freq=mix(a.stripe_freq, b.stripe_freq),
        bar_width=max(1, int(round(mix(a.bar_width, b.bar_width)))), bar_height=mix(a.bar_height, b.bar_height),
        bar_density=mix(a.bar_density, b.bar_density),
    )


def state_styles(states: tuple[int, ...], lookalike: float) -> dict[int, _StateStyle]:
    """Each state's look; with `lookalike` > 0, pulled toward the midpoint with its nearest chosen state
    (by centre distance), so geographic neighbours become hard to tell apart, as real ones are."""
    own = {s: _state_style(s) for s in states}
    if lookalike == 0 or len(states) < 2:
        return own
    centres = np.array([own[s].centre for s in states])
    styles = {}
    for i, s in enumerate(states):
        d = haversine_km(centres[i, 0], centres[i, 1], centres[:, 0], centres[:, 1])
        d[i] = np.inf
        neighbour = states[int(np.argmin(d))]
        styles[s] = _blend(own[s], own[neighbour], lookalike / 2)
    return styles


def _sample_locations(
    rng: np.random.Generator, states: tuple[int, ...], n: int, first_id: int, cover_all: bool,
    state_weights: np.ndarray,
) -> list[_Location]:
    places = _load_places()
    candidates = [np.flatnonzero(places.state == s) for s in states]
    # sqrt(population) within a state: street-view coverage grows slower than population.
    place_p = [np.sqrt(places.population[c]) / np.sqrt(places.population[c]).sum() for c in candidates]
    drawn = rng.choice(len(states), size=n, p=state_weights)
    if cover_all and n >= len(states):
        drawn[: len(states)] = np.arange(len(states))  # every chosen state occurs in train
        rng.shuffle(drawn)
    locations = []
    for sample_id, k in enumerate(drawn, first_id):
        place = rng.choice(candidates[k], p=place_p[k])
        lat = places.lat[place] + rng.normal(0, JITTER_KM / KM_PER_DEGREE)
        lon = places.lon[place] + rng.normal(0, JITTER_KM / (KM_PER_DEGREE * math.cos(math.radians(lat))))
        locations.append(_Location(sample_id, states[k], round(float(lat), 6), round(float(lon), 6)))
    return locations


_COORD = np.linspace(0.0, 1.0, IMAGE_SIZE, dtype=np.float32)
_Y, _X = _COORD[:, None], _COORD[None, :]  # broadcast to (rows, columns)
# Uniform noise in [-17, 17] has a std of about 10 grey levels; uniform is cheaper to draw than normal.
_NOISE_AMPLITUDE = 17.0


def _col(rgb: np.ndarray) -> np.ndarray:
    """A colour as (3, 1, 1), to broadcast over a channel-first image."""
    return np.asarray(rgb, dtype=np.float32).reshape(3, 1, 1)


def render_view(style: _StateStyle, lat: float, lon: float, direction: int, rng: np.random.Generator, *,
                noise: float = 1.0) -> np.ndarray:
    """One 256x256 RGB uint8 view (height, width, channel) of a location looking in VIEWS[direction]."""
    # Offsets from the state's centre, squashed to (-1, 1): the in-state position cues.
    du = math.tanh((lat - style.centre[0]) / style.spread)
    dv = math.tanh((lon - style.centre[1]) / style.spread)
    horizon = float(np.clip(_HORIZON[direction] + rng.normal(0, 0.025), 0.3, 0.65))
    h_row = int(round(horizon * IMAGE_SIZE))
    # Channel-first while drawing: per-channel ops then run over contiguous rows, several times faster.
    img = np.empty((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)

    # Sky: tint follows absolute position (warmer west, paler north), brighter towards the horizon.
    sky = style.sky * rng.uniform(0.92, 1.08, 3)
    warm = math.tanh(-(lon + 95.0) / 25.0)
    sky = sky + np.array([0.1, 0.0, -0.1]) * warm - 0.08 * math.tanh((lat - 37.0) / 8.0)
    img[:, :h_row] = _col(sky) * (0.7 + 0.5 * _Y[:h_row] / horizon)

    # Ground: state stripes whose angle and frequency move with the position inside the state.
    angle = style.stripe_angle + 0.6 * dv
    freq = style.stripe_freq * (1.0 + 0.4 * du)
    phase = rng.uniform(0, 2 * math.pi)
    wave = 2 * math.pi * freq * (_X * math.cos(angle) + _Y[h_row:] * math.sin(angle)) + phase
    stripes = 0.5 + 0.5 * np.sin(wave)
    ground = (style.ground + np.array([0.15 * dv, 0.12 * du, -0.15 * dv])) * rng.uniform(0.92, 1.08, 3)
    dark = ground * 0.55 + style.accent * 0.15
    np.multiply(_col(ground - dark), stripes, out=img[:, h_row:])
    img[:, h_row:] += _col(dark)

    # Skyline: bars of the state's width, height and accent colour standing on the horizon.
    n_bars = -(-IMAGE_SIZE // style.bar_width)
    heights = rng.uniform(0.3, 1.0, n_bars) * style.bar_height * (rng.random(n_bars) < style.bar_density)
    columns = np.repeat(heights, style.bar_width)[:IMAGE_SIZE].astype(np.float32)
    shade = rng.uniform(0.7, 1.1, n_bars).repeat(style.bar_width)[:IMAGE_SIZE].astype(np.float32)
    top = max(h_row - int(style.bar_height * IMAGE_SIZE) - 1, 0)
    band = _Y[top:h_row] >= horizon - columns
    img[:, top:h_row] = np.where(band, _col(style.accent) * shade, img[:, top:h_row])

    # Distractor: a random-coloured box on the ground (a car, a sign) that says nothing about the place.
    h, w = rng.integers(10, 60, 2)
    y0, x0 = int(rng.integers(h_row, IMAGE_SIZE - 8)), int(rng.integers(0, IMAGE_SIZE - w))
    img[:, y0 : y0 + h, x0 : x0 + w] = _col(rng.random(3))

    # Light: from one side when looking east/west, overall brighter facing the sun.
    light = _BRIGHTNESS[direction] * rng.uniform(0.9, 1.1) * (1.0 + _LIGHT_SLOPE[direction] * (_X - 0.5))
    img *= 255.0 * light
    # Grain in 2x2 blocks, added in place through a broadcast view: a quarter of the random draws.
    half = IMAGE_SIZE // 2
    amplitude = _NOISE_AMPLITUDE * noise
    grain = rng.random((3, half, 1, half, 1), dtype=np.float32) * (2 * amplitude) - amplitude
    img.reshape(3, half, 2, half, 2)[...] += grain
    np.clip(img, 0, 255, out=img)
    return img.transpose(1, 2, 0).astype(np.uint8, order="C")


def image_name(sample_id: int, direction: str) -> str:
    return f"img_{sample_id:06d}_{direction}.jpg"


def blank_view(rng: np.random.Generator) -> np.ndarray:
    """A view that shows nothing of the place: an overexposed, nearly flat frame with sensor grain."""
    level = rng.uniform(170, 250)
    img = level + rng.normal(0, 12, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _render_location(location: _Location, images_dir: Path, seed: int, style: _StateStyle,
                     difficulty: Difficulty) -> None:
    # One generator per location: output bytes do not depend on thread scheduling.
    rng = np.random.default_rng([seed, location.sample_id])
    # The difficulty's draws come from a stream of their own: the plain set's bytes do not change.
    hard = np.random.default_rng([seed, location.sample_id, 1])
    for d, direction in enumerate(VIEWS):
        if hard.random() < difficulty.blank_views:
            pixels = blank_view(hard)
        else:
            pixels = render_view(style, location.lat, location.lon, d, rng, noise=difficulty.noise)
        path = images_dir / image_name(location.sample_id, direction)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
        data = buffer.getvalue()
        if hard.random() < difficulty.broken_views:
            data = data[: len(data) // 2]  # a download cut short: `validate` reports it, `--bad-images mask` masks it
        path.write_bytes(data)


def _image_columns(sample_id: int) -> list[str]:
    return [image_name(sample_id, d) for d in VIEWS]


def _write_csv(path: Path, header: tuple[str, ...], rows: list[list]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_ground_truth(path: Path, locations: list[_Location]) -> None:
    rows = [
        [loc.sample_id, *_image_columns(loc.sample_id), STATES[loc.state_idx], loc.state_idx,
         f"{loc.lat:.6f}", f"{loc.lon:.6f}"]
        for loc in locations
    ]
    _write_csv(path, GROUND_TRUTH_COLUMNS, rows)


def _write_sample_submission(
    path: Path, test: list[_Location], train: list[_Location], states: tuple[int, ...]
) -> None:
    # Like Kaggle's template: one constant valid guess (the 5 commonest train states, their mean position).
    counts = Counter(loc.state_idx for loc in train)
    top = sorted(states, key=lambda s: (-counts[s], s))[:5]
    top += [-1] * (5 - len(top))
    # Without training locations: the geographic centre of the conterminous US.
    lat = float(np.mean([loc.lat for loc in train])) if train else 39.833333
    lon = float(np.mean([loc.lon for loc in train])) if train else -98.583333
    rows = [[loc.sample_id, *_image_columns(loc.sample_id), *top, f"{lat:.6f}", f"{lon:.6f}"] for loc in test]
    _write_csv(path, SUBMISSION_COLUMNS, rows)


def _state_weights(rng: np.random.Generator, states: tuple[int, ...], imbalance: float) -> np.ndarray:
    places = _load_places()
    # Skewed like the real data: states with more places get more locations.
    weights = np.sqrt([np.count_nonzero(places.state == s) for s in states]).astype(np.float64)
    if imbalance:
        rank = rng.permutation(len(states)) + 1.0  # which states are rare is drawn, not fixed by name
        weights *= rank ** -imbalance
    return weights / weights.sum()


def synthesize(
    out_dir: Path, *, n_train: int, n_test: int, n_states: int = 33, seed: int = 0, progress: bool = True,
    difficulty: Difficulty = Difficulty(),
) -> SynthSummary:
    """Write a competition-layout dataset (plus test_ground_truth.csv for local scoring) to out_dir."""
    if n_train < 0 or n_test < 0:
        raise ConfigError("n_train and n_test must be non-negative")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    states = choose_states(n_states)
    styles = state_styles(states, difficulty.lookalike)
    rng = np.random.default_rng([seed, 0])
    state_weights = _state_weights(np.random.default_rng([seed, 1]), states, difficulty.imbalance)
    # Test sample_ids continue after train's, as in the competition: ids are unique across splits.
    splits = {
        "train": _sample_locations(rng, states, n_train, first_id=0, cover_all=True, state_weights=state_weights),
        "test": _sample_locations(rng, states, n_test, first_id=n_train, cover_all=False, state_weights=state_weights),
    }

    jobs = []
    for split, locations in splits.items():
        images_dir = out_dir / f"{split}_images"
        images_dir.mkdir(parents=True, exist_ok=True)
        jobs += [(loc, images_dir, seed, styles[loc.state_idx], difficulty) for loc in locations]
    # numpy and libjpeg release the GIL, so threads use all cores without pickling.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = [pool.submit(_render_location, *job) for job in jobs]
        for done, future in enumerate(futures, 1):
            future.result()
            if progress and (done % 250 == 0 or done == len(futures)):
                print(f"synth: rendered {done}/{len(futures)} locations", flush=True)

    paths = {name: out_dir / name for name in (TRAIN_CSV, TEST_TRUTH_CSV, TEST_CSV, MAPPING_CSV)}
    _write_ground_truth(paths[TRAIN_CSV], splits["train"])
    _write_ground_truth(paths[TEST_TRUTH_CSV], splits["test"])
    _write_sample_submission(paths[TEST_CSV], splits["test"], splits["train"], states)
    occurring = sorted({loc.state_idx for locs in splits.values() for loc in locs})
    _write_csv(paths[MAPPING_CSV], ("state_idx", "state"), [[s, STATES[s]] for s in occurring])

    return SynthSummary(
        out_dir=out_dir,
        train_csv=paths[TRAIN_CSV],
        test_csv=paths[TEST_TRUTH_CSV],
        sample_submission_csv=paths[TEST_CSV],
        state_mapping_csv=paths[MAPPING_CSV],
        n_train=n_train,
        n_test=n_test,
        n_images=4 * (n_train + n_test),
        states=tuple(STATES[s] for s in occurring),
        seconds=time.perf_counter() - start,
        difficulty=difficulty,
    )
