"""`geoscout locate`: where are these four photos? A finished run's final model, on new images.

The views go through what `extract` stored the run's features with: the same decoding and resize
(extract.dataset.decode_view), the same backbones with the same weights, precision and float16
rounding (extract.runner.embed_batch). Before any image is embedded, each backbone as loaded here is
fingerprinted as the store fingerprints it and refused when the fingerprints differ: the heads were
trained on the store's features. The final preset's ensemble then answers as `predict` does for the
test split, with the training split as its retrieval gallery, so a copy of a test location's four
files gets its submission row. Backbones run eagerly (not compiled): where the run's extraction was
compiled on a GPU, features agree to the precision's rounding rather than bit for bit.

Besides the answer, a location gets the state probabilities (the ensemble's geocell probabilities
summed per state), how far the model's belief spreads (`probability_radii`) and its nearest training
locations (the index layer's descriptors over the ensemble's backbones, as retrieval builds them).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from .competition import IMAGE_COLUMNS, NO_PREDICTION, PRED_COORD_COLUMNS, VIEWS
from .csvio import read_csv_as_text
from .data import SplitTable
from .device import resolve_device, resolve_precision
from .errors import ConfigError, MissingFileError
from .extract.backbones import LoadedBackbone, get_spec, load_backbone
from .extract.dataset import DECODE_SIZE, decode_view
from .extract.runner import backbone_identity, default_batch_size, embed_batch
from .extract.weights import WeightsError
from .geo import haversine_km
from .heads.api import ensemble_outputs, read_ensemble
from .host import usable_cpus
from .images import ImageError, check_jpeg
from .index import descriptor_center, has_views, knn_search, location_descriptors
from .knn import Neighbour
from .problems import InputError, Problem, csv_line
from .run import CONFIG_FILE, RunConfig
from .stages import HeadPaths, StoreData
from .states import state_name
from .store.features import SplitFeatures
from .store.layout import FEATURES_DATASET, FLIP_DATASET, features_path
from .store.reader import StoreError, read_manifest, read_store_attrs

MISSING_VIEW = "-"  # stands for a view there is no photo of
SHARES = (0.5, 0.9)  # of the model's probability, for `probability_radii`
DEFAULT_TOP = 5
DEFAULT_NEIGHBOURS = 5
DECODE_THREADS = 8

Views = tuple[Path | None, ...]  # N/E/S/W; None: a missing view


def format_km(km: float) -> str:
    return f"{km:,.1f}" if km < 10 else f"{km:,.0f}"


@dataclass(frozen=True)
class StateGuess:
    state_idx: int  # the competition's
    state: str
    probability: float


@dataclass
class Location:
    """The answer for one location and what explains it."""

    views: Views
    states: list[StateGuess]  # the top-k, the competition's top-5 order first
    latitude: float
    longitude: float
    radius_km: dict[float, float]  # share of the model's probability -> km around (latitude, longitude)
    neighbours: list[Neighbour]  # nearest training locations; km from (latitude, longitude)
    model: dict  # work folder, preset, backbones
    # the ensemble's belief, for maps: geocell centroids (K, 2), their probabilities (K,), their state_idx (K,)
    cell_latlon: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 2)))
    cell_probability: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    cell_state_idx: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=np.int64))

    def to_json(self) -> dict:
        return {
            "views": {view: None if path is None else str(path) for view, path in zip(VIEWS, self.views)},
            "states": [{"rank": rank, **asdict(s)} for rank, s in enumerate(self.states, 1)],
            "latitude": self.latitude,
            "longitude": self.longitude,
            "radius_km": {f"{share:.0%}": km for share, km in self.radius_km.items()},
            "neighbours": [asdict(n) for n in self.neighbours],
            "model": self.model,
        }

    def table(self) -> str:
        """A short plain-text answer."""
        shown = " · ".join(f"{view} {'(missing)' if path is None else path.name}"
                           for view, path in zip(VIEWS, self.views))
        lines = [f"views: {shown}", "", f"{'#':>2}  {'state':<16}{'state_idx':>9}  {'probability':>11}"]
        lines += [f"{rank:>2}  {s.state:<16}{s.state_idx:>9}  {s.probability:>11.4f}"
                  for rank, s in enumerate(self.states, 1)]
        radii = ", ".join(f"{share:.0%} within {format_km(km)} km" for share, km in self.radius_km.items())
        lines += ["", f"latitude {self.latitude:.6f}, longitude {self.longitude:.6f}",
                  f"the model's probability around it: {radii}"]
        if self.neighbours:
            header = f"{'#':>2}  {'sample_id':>9}  {'state':<16}{'latitude':>10}{'longitude':>12}{'cosine':>8}{'km':>8}"
            lines += ["", "nearest training locations (cosine of the view descriptors; km from the position):", header]
            lines += [f"{n.rank:>2}  {n.sample_id:>9}  {n.state:<16}{n.latitude:>10.4f}{n.longitude:>12.4f}"
                      f"{n.similarity:>8.3f}{n.km:>8,.0f}" for n in self.neighbours]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ input


def parse_views(items: Sequence[str | Path | None], *, base: Path | None = None) -> Views:
    """Four items, north, east, south, west: a path (relative to `base` when given), or '-', '' or None
    for a missing view. At least one view is needed."""
    if len(items) != len(VIEWS):
        raise ConfigError(f"give {len(VIEWS)} images in the order {', '.join(VIEWS)} ('{MISSING_VIEW}' for a missing "
                          f"view); got {len(items)}")
    views = tuple(None if item is None or str(item).strip() in ("", MISSING_VIEW) else Path(str(item).strip())
                  for item in items)
    if all(v is None for v in views):
        raise ConfigError("every view is missing: at least one of the four images is needed")
    return tuple(v if v is None or base is None or v.is_absolute() else base / v for v in views)


def check_views(views: Views) -> None:
    """Refuse a view that is missing on disk, a folder, not a JPEG, or cut short, naming it."""
    for view, path in zip(VIEWS, views):
        if path is not None:
            try:
                check_jpeg(path)
            except ImageError as exc:
                raise ImageError(f"{view} image {path}: {exc}") from None


def read_locations_csv(path: Path, images_dir: Path | None = None) -> tuple[list[Views], pl.DataFrame]:
    """The rows of a locations CSV (columns image_north, image_east, image_south, image_west; paths relative
    to `images_dir`, by default the CSV's folder, or absolute; empty or '-' for a missing view), every image
    checked first: all problems are listed at once, by line, column and file. The competition's
    sample_submission.csv is one, with images_dir its test_images/."""
    path = Path(path)
    base = Path(images_dir) if images_dir is not None else path.parent
    table = read_csv_as_text(path)
    problems = [Problem(str(path), f"missing required column {c!r}; found {table.columns}", column=c)
                for c in IMAGE_COLUMNS if c not in table.columns]
    if problems:
        raise InputError(problems, str(path))
    if table.height == 0:
        raise InputError([Problem(str(path), "the CSV has a header but no rows")], str(path))
    locations: list[Views] = []
    for i, row in enumerate(table.select(IMAGE_COLUMNS).iter_rows()):
        try:
            locations.append(parse_views(row, base=base))
        except ConfigError as exc:
            problems.append(Problem(str(path), str(exc), line=csv_line(i)))
            locations.append((None,) * len(VIEWS))
    checks = [(i, v, p) for i, views in enumerate(locations) for v, p in enumerate(views) if p is not None]

    def check(item) -> str | None:
        try:
            check_jpeg(item[2])
        except ImageError as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(DECODE_THREADS) as pool:  # PIL releases the GIL while decoding
        for (i, v, p), why in zip(checks, pool.map(check, checks)):
            if why is not None:
                problems.append(Problem(str(path), f"{p}: {why}", line=csv_line(i), column=IMAGE_COLUMNS[v],
                                        value=table[IMAGE_COLUMNS[v]][i]))
    if problems:
        raise InputError(sorted(problems, key=lambda p: p.line or 0), str(path))
    return locations, table


# ------------------------------------------------------------------------------------------ the model


def _describe_weights(identity: dict | None) -> str:
    if not identity:
        return "no recorded weights"
    if identity.get("random_init"):
        return f"random weights (seed {identity.get('seed')})"
    files = ", ".join(f"{name} sha256 {digest[:12]}" for name, digest in sorted(identity.get("files", {}).items()))
    source = f" from {identity['repo_id']}@{identity.get('revision')}" if identity.get("repo_id") else ""
    return (files or "no files") + source


def _check_fingerprint(name: str, loaded: LoadedBackbone, attrs: dict, precision: str, weights: str | None,
                       store_file: Path) -> str:
    """The backbone's fingerprint as the store computes it; refused, saying what differs, unless it is the store's."""
    spec, preprocessing, fingerprint = backbone_identity(loaded, precision)
    stored = str(attrs["backbone_fingerprint"])
    if fingerprint == stored:
        return fingerprint
    stored_weights = json.loads(attrs.get("weights_identity") or "null")
    content = {k: v for k, v in (loaded.weights_identity or {}).items() if k not in ("repo_id", "revision")}
    if content != {k: v for k, v in (stored_weights or {}).items() if k not in ("repo_id", "revision")}:
        given = f" at {weights}" if weights else ""
        raise WeightsError(
            f"backbone {name!r}: the weights{given} ({_describe_weights(loaded.weights_identity)}) give fingerprint "
            f"{fingerprint}, but the run's features in {store_file} were embedded with fingerprint {stored} "
            f"({_describe_weights(stored_weights)}) and its heads were trained on those; pass --weights "
            f"{name}=PATH with the weights the run used"
        )
    differs = [what for what, mine, theirs in (
        ("architecture", spec, json.loads(attrs.get("backbone_spec") or "{}")),
        ("preprocessing", preprocessing, json.loads(attrs.get("preprocessing") or "{}")),
    ) if mine != theirs]
    raise StoreError(
        f"backbone {name!r}: the same weights, but its {' and '.join(differs) or 'settings'} as built here "
        f"(fingerprint {fingerprint}) differ from what embedded the run's features in {store_file} (fingerprint "
        f"{stored}); the installed timm/open_clip may build it differently from the run's"
    )


def _describe(centers: dict[str, np.ndarray], features: SplitFeatures) -> np.ndarray:
    """Each backbone's centred, unit mean view side by side, scaled so an inner product is their mean cosine."""
    parts = [location_descriptors(features.features[b], features.masks[b], center=c) for b, c in centers.items()]
    return np.concatenate(parts, axis=1) / np.sqrt(len(parts))


@dataclass
class _Gallery:
    """The training locations as neighbour search sees them."""

    centers: dict[str, np.ndarray]
    descriptors: np.ndarray  # (M, D) of the rows with a view
    sample_id: np.ndarray
    state_idx: np.ndarray
    latlon: np.ndarray

    @classmethod
    def of(cls, train: SplitFeatures, backbones: list[str]) -> "_Gallery":
        centers = {b: descriptor_center(train.features[b], train.masks[b]) for b in backbones}
        descriptors = _describe(centers, train)
        keep = has_views(descriptors)  # a location without any embedded view is no one's neighbour
        return cls(centers, descriptors[keep], train.sample_id[keep], train.classes[train.class_id[keep]],
                   train.latlon[keep])

    def describe(self, features: SplitFeatures) -> np.ndarray:
        return _describe(self.centers, features)

    def nearest(self, queries: np.ndarray, latlon: np.ndarray, k: int) -> list[list[Neighbour]]:
        if k <= 0 or len(self.descriptors) == 0:
            return [[] for _ in queries]
        similarity, rows = knn_search(database=self.descriptors, queries=queries, k=k)
        found = []
        for q in range(len(queries)):
            row = rows[q]
            km = haversine_km(latlon[q, 0], latlon[q, 1], self.latlon[row, 0], self.latlon[row, 1])
            found.append([Neighbour(rank, int(self.sample_id[r]), int(idx), state_name(int(idx)),
                                    float(self.latlon[r, 0]), float(self.latlon[r, 1]), float(sim), float(d))
                          for rank, (r, idx, sim, d) in enumerate(zip(row, self.state_idx[row], similarity[q], km), 1)])
        return found


def probability_radii(cell_logits: np.ndarray, centroids: np.ndarray, lat: np.ndarray, lon: np.ndarray,
                      shares: Sequence[float] = SHARES) -> np.ndarray:
    """(N, len(shares)) km: per row, the smallest radius around (lat, lon) whose geocells (each counted at its
    centroid) hold at least that share of the ensemble's probability."""
    probability = torch.softmax(torch.as_tensor(cell_logits, dtype=torch.float64), dim=1).numpy()
    km = haversine_km(lat[:, None], lon[:, None], centroids[None, :, 0], centroids[None, :, 1])
    order = np.argsort(km, axis=1, kind="stable")
    near = np.take_along_axis(km, order, axis=1)
    held = np.cumsum(np.take_along_axis(probability, order, axis=1), axis=1)
    held /= held[:, -1:]  # the softmax sums to 1 up to rounding: the last cell holds all of it
    at = np.stack([(held < share).sum(axis=1) for share in shares], axis=1)
    return np.take_along_axis(near, np.minimum(at, near.shape[1] - 1), axis=1)


class Locator:
    """A run's final model, ready to place new locations: backbones loaded once and checked against the store."""

    def __init__(self, work_dir: Path, *, device: str | None = None, weights: dict[str, str] | None = None,
                 progress: bool = False):
        self.work_dir = Path(work_dir)
        config_path = self.work_dir / CONFIG_FILE
        if not config_path.is_file():
            raise MissingFileError(f"{self.work_dir} is not the work folder of a finished `geoscout run` "
                                   f"(no {CONFIG_FILE})")
        self.config = RunConfig.from_toml(config_path)
        store = self.work_dir / "store"
        self.manifest = read_manifest(store)
        self.backbones = list(self.config.backbones)
        self.device = resolve_device(device or self.config.device)
        overrides = {get_spec(name).name: value for name, value in (weights or {}).items()}
        unknown = sorted(set(overrides) - set(self.backbones))
        if unknown:
            raise ConfigError(f"--weights given for {unknown}; the run's backbones are {self.backbones}")
        # the backbones first: weights that differ from the run's are the likeliest mistake, and are named
        self.runners, self.fingerprints, self.precisions = {}, {}, {}
        for name in self.backbones:
            store_file = features_path(store, "train", name)
            attrs = read_store_attrs(store_file)
            precision = resolve_precision(str(attrs["precision"]), self.device)
            layers = json.loads(attrs.get("backbone_spec") or "{}").get("layers", 0)
            given = overrides.get(name, self.config.weights.get(name))
            loaded = load_backbone(name, given, self.device, precision=precision, layers=layers)
            self.fingerprints[name] = _check_fingerprint(name, loaded, attrs, precision, given, store_file)
            self.runners[name], self.precisions[name] = loaded.embedder, precision
        self.preset = self.config.presets[0]
        self.ensemble_dir = HeadPaths(self.work_dir / "heads", self.preset).ensemble
        record = read_ensemble(self.ensemble_dir)
        unknown = sorted(set(record["backbones"]) - set(self.backbones))
        if unknown:
            raise ConfigError(f"the ensemble in {self.ensemble_dir} reads {unknown}, which the run in {self.work_dir} "
                              f"did not extract (its backbones: {self.backbones})")
        self.flip = record["flip_tta"] != "none"  # the members then also read the mirrored views
        data = StoreData(store, self.backbones)
        self.train = data.train
        self.fit_rows = data.protocol(self.config.folds, self.config.seed).folds.fit_rows
        self.gallery = _Gallery.of(self.train, self.backbones)
        self.locations_per_batch = max(1, (self.config.batch_size or default_batch_size(self.device)) // len(VIEWS))
        self.progress = progress

    @property
    def about(self) -> dict:
        random = [b for b in self.backbones if get_spec(b).random_init]
        return {"work_dir": str(self.work_dir), "preset": self.preset, "backbones": self.backbones,
                "random_backbones": random}

    def embed(self, locations: list[Views], *, source: str = "locate") -> SplitFeatures:
        """The locations' features as the store would hold them; a view that is None is masked."""
        n = len(locations)
        table = SplitTable(name=source, csv_path=Path(source), images_dir=Path("."), sample_id=np.arange(n),
                           image_names=np.array([[str(p or "") for p in views] for views in locations], dtype=str))
        features = {b: np.zeros((n, len(VIEWS), self.runners[b].spec.embed_dim), np.float16) for b in self.runners}
        flipped = {b: np.zeros_like(f) for b, f in features.items()} if self.flip else {}
        masks = np.zeros((n, len(VIEWS)), dtype=bool)
        bar = tqdm(total=n, desc=f"locate [{','.join(self.runners)}]", unit="location", disable=not self.progress)
        with ThreadPoolExecutor(min(DECODE_THREADS, max(1, usable_cpus()))) as pool:
            for start in range(0, n, self.locations_per_batch):
                rows = np.arange(start, min(n, start + self.locations_per_batch))
                images, ok = self._decode([locations[r] for r in rows], pool)
                images = images.to(self.device)
                for name, runner in self.runners.items():  # one backbone at a time: each at its store's precision
                    arrays = embed_batch({name: runner}, images, ok, rows, table, precision=self.precisions[name],
                                         flip=self.flip)[name]
                    features[name][rows] = arrays[FEATURES_DATASET]
                    if self.flip:
                        flipped[name][rows] = arrays[FLIP_DATASET]
                masks[rows] = ok.numpy()
                bar.update(len(rows))
        bar.close()
        return SplitFeatures(
            split=source, sample_id=np.arange(n), features=features, masks={b: masks.copy() for b in features},
            classes=np.asarray(self.manifest["classes"], dtype=np.int64),
            dataset_fingerprint=self.manifest["dataset_fingerprint"], backbone_fingerprints=dict(self.fingerprints),
            flipped=flipped,
        )

    @staticmethod
    def _decode(locations: list[Views], pool: ThreadPoolExecutor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 4, 3, S, S) uint8 views and (B, 4) ok, decoded as extract decodes them; a bad file names itself."""
        images = np.zeros((len(locations), len(VIEWS), DECODE_SIZE, DECODE_SIZE, 3), dtype=np.uint8)
        ok = np.zeros((len(locations), len(VIEWS)), dtype=bool)
        jobs = [(i, v, path) for i, views in enumerate(locations) for v, path in enumerate(views) if path is not None]

        def decode(job) -> np.ndarray:
            i, v, path = job
            try:
                return decode_view(path)
            except ImageError as exc:
                raise ImageError(f"{VIEWS[v]} image {path}: {exc}") from None

        for (i, v, _), pixels in zip(jobs, pool.map(decode, jobs)):
            images[i, v], ok[i, v] = pixels, True
        return torch.from_numpy(images).permute(0, 1, 4, 2, 3), torch.from_numpy(ok)

    def locate(self, locations: list[Views], *, top: int = DEFAULT_TOP, neighbours: int = DEFAULT_NEIGHBOURS,
               source: str = "locate") -> list[Location]:
        """Every location's answer: the ensemble's top-`top` states, position, probability radii and neighbours."""
        if top < 1:
            raise ConfigError(f"--top {top}: give at least 1")
        features = self.embed(locations, source=source)
        out = ensemble_outputs(features, self.ensemble_dir, device=str(self.device), gallery=self.train,
                               fit_rows=self.fit_rows)
        pred, geocells = out.prediction, out.geocells
        lat, lon = np.asarray(pred.lat, dtype=np.float64), np.asarray(pred.lon, dtype=np.float64)
        joint = torch.as_tensor(out.joint, dtype=torch.float64)
        state_probability = torch.softmax(geocells.class_logits(joint), dim=1).numpy()
        cell_probability = torch.softmax(joint, dim=1).numpy()
        radii = probability_radii(out.joint, geocells.centroids, lat, lon)
        near = self.gallery.nearest(self.gallery.describe(features), np.stack([lat, lon], axis=1), neighbours)
        classes = features.classes
        located = []
        for i, views in enumerate(locations):
            ranked = [int(c) for c in pred.top5[i] if c != NO_PREDICTION]  # the submission's order comes first
            ranked += [int(c) for c in np.argsort(-state_probability[i], kind="stable") if c not in ranked]
            located.append(Location(
                views=views,
                states=[StateGuess(int(classes[c]), state_name(int(classes[c])), float(state_probability[i, c]))
                        for c in ranked[:top]],
                latitude=float(lat[i]), longitude=float(lon[i]),
                radius_km={share: float(km) for share, km in zip(SHARES, radii[i])},
                neighbours=near[i], model=self.about,
                cell_latlon=geocells.centroids, cell_probability=cell_probability[i],
                cell_state_idx=classes[geocells.cell_class],
            ))
        return located


# ------------------------------------------------------------------------------------------ entry points


def locate(work_dir: Path, images: Sequence[str | Path | None], *, top: int = DEFAULT_TOP,
           neighbours: int = DEFAULT_NEIGHBOURS, device: str | None = None,
           weights: dict[str, str] | None = None) -> Location:
    """Where are these four photos (north, east, south, west; None or '-' for a missing view)? The answer of the
    run in `work_dir`: its final preset's ensemble, on the images embedded as its store was."""
    views = parse_views(images)
    check_views(views)  # before the backbones load: a typo costs nothing
    return Locator(work_dir, device=device, weights=weights).locate([views], top=top, neighbours=neighbours)[0]


def default_predictions_path(csv_path: Path) -> Path:
    csv_path = Path(csv_path)
    return csv_path.with_name(f"{csv_path.stem}.located.csv")


def locate_csv(work_dir: Path, csv_path: Path, out: Path | None = None, *, images_dir: Path | None = None,
               top: int = DEFAULT_TOP, device: str | None = None, weights: dict[str, str] | None = None,
               progress: bool = True) -> tuple[Path, pl.DataFrame]:
    """Every row of a locations CSV (see `read_locations_csv`), written as one CSV of predictions (see
    `predictions_frame`) to `out` (default: NAME.located.csv beside it)."""
    locations, table = read_locations_csv(csv_path, images_dir)
    located = Locator(work_dir, device=device, weights=weights, progress=progress).locate(
        locations, top=top, neighbours=1, source=str(csv_path))
    frame = predictions_frame(table, located, top)
    out = Path(out) if out is not None else default_predictions_path(csv_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    frame.write_csv(tmp, float_precision=6)
    os.replace(tmp, out)
    return out, frame


def predictions_frame(table: pl.DataFrame, located: list[Location], top: int) -> pl.DataFrame:
    """The input's columns, then predicted_state_idx_K, predicted_state_K and probability_K for K = 1..top
    (the competition's top-5 columns first), predicted_latitude, predicted_longitude, radius_50_km,
    radius_90_km, and the nearest training location (nearest_sample_id, nearest_km from the position)."""
    columns: dict[str, list] = {}
    for k in range(top):
        rows = [loc.states[k] if k < len(loc.states) else None for loc in located]
        columns[f"predicted_state_idx_{k + 1}"] = [NO_PREDICTION if s is None else s.state_idx for s in rows]
        columns[f"predicted_state_{k + 1}"] = ["" if s is None else s.state for s in rows]
        columns[f"probability_{k + 1}"] = [0.0 if s is None else s.probability for s in rows]
    columns[PRED_COORD_COLUMNS[0]] = [loc.latitude for loc in located]
    columns[PRED_COORD_COLUMNS[1]] = [loc.longitude for loc in located]
    for share in SHARES:
        columns[f"radius_{share * 100:.0f}_km"] = [loc.radius_km[share] for loc in located]
    columns["nearest_sample_id"] = [loc.neighbours[0].sample_id if loc.neighbours else None for loc in located]
    columns["nearest_km"] = [loc.neighbours[0].km if loc.neighbours else None for loc in located]
    kept = table.drop([c for c in columns if c in table.columns])
    return pl.concat([kept, pl.DataFrame(columns)], how="horizontal")
