"""Nearest-neighbour diagnostic on one backbone's features: kNN accuracy, near-duplicates, a sample's neighbours.

Descriptors and search come from the index layer (index.py): the mean of a location's embedded views
minus the training mean, L2-normalised (inner product = cosine), searched exactly with faiss. The store
is read block by block, so no float32 copy of a whole split's views is ever made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from .errors import ConfigError, GeoscoutError
from .extract.catalogue import canonical_name
from .geo import haversine_km, latlon_to_xyz, xyz_to_latlon
from .index import (
    DEFAULT_BLOCK_SIZE,
    UseGpu,
    descriptor_center,
    has_views,
    index_name,
    knn_search,
    location_descriptors,
    pairs_above,
)
from .states import state_name
from .store.features import SplitFeatures
from .store.layout import features_path, samples_path
from .store.reader import StoreError, open_checked, read_manifest, read_samples
from .store.split import load_validation_split, make_validation_split

# A seeded split used only when the caller passes neither a saved split nor a mask.
FALLBACK_VAL_FRACTION = 0.1
FALLBACK_VAL_SEED = 0
# Negative or zero similarities still cast a tiny vote, so a query always gets a prediction.
VOTE_FLOOR = 1e-6
SHOWN_PAIRS = 20  # duplicate pairs printed by format(); to_json() lists all


# ---------------------------------------------------------------------------------------- diagnostics


@dataclass
class KnnScores:
    """kNN state vote and position on held-out rows; rows without any embedded view are left out."""

    k: int
    n_database: int
    n_queries: int
    n_database_without_views: int
    n_queries_without_views: int
    accuracy: float  # similarity-weighted vote of the k neighbours' states
    majority_baseline: float  # accuracy of always answering the database's most frequent state
    mean_km: float  # to the similarity-weighted spherical mean of the winning state's neighbours
    median_km: float


def knn_evaluate(
    *,
    train_desc: np.ndarray,
    train_class: np.ndarray,
    train_latlon: np.ndarray,
    query_desc: np.ndarray,
    query_class: np.ndarray,
    query_latlon: np.ndarray,
    k: int,
    use_gpu: UseGpu = "auto",
) -> KnnScores:
    """Predict each query's class and position from its k nearest training rows, and score them."""
    db_ok, q_ok = has_views(train_desc), has_views(query_desc)
    db_class, db_latlon = np.asarray(train_class)[db_ok], np.asarray(train_latlon)[db_ok]
    q_class, q_latlon = np.asarray(query_class)[q_ok], np.asarray(query_latlon)[q_ok]
    if not q_ok.any():
        raise GeoscoutError("no query row has an embedded view")
    sims, rows = knn_search(database=train_desc[db_ok], queries=query_desc[q_ok], k=k, use_gpu=use_gpu)
    n_q, n_classes = len(rows), int(max(db_class.max(), q_class.max())) + 1
    neighbour_class = db_class[rows]
    weights = np.maximum(sims.astype(np.float64), VOTE_FLOOR)
    flat = (np.arange(n_q)[:, None] * n_classes + neighbour_class).ravel()
    votes = np.bincount(flat, weights.ravel(), minlength=n_q * n_classes).reshape(n_q, n_classes)
    predicted = votes.argmax(axis=1)
    # Averaging only the winning state's neighbours keeps the guess inside that state instead of
    # between two states' clusters.
    w = weights * (neighbour_class == predicted[:, None])
    xyz = latlon_to_xyz(db_latlon[rows, 0], db_latlon[rows, 1])
    lat, lon = xyz_to_latlon((xyz * w[..., None]).sum(axis=1))
    km = haversine_km(lat, lon, q_latlon[:, 0], q_latlon[:, 1])
    majority = np.bincount(db_class).argmax()
    return KnnScores(
        k=rows.shape[1],
        n_database=int(db_ok.sum()),
        n_queries=n_q,
        n_database_without_views=int((~db_ok).sum()),
        n_queries_without_views=int((~q_ok).sum()),
        accuracy=float(np.mean(predicted == q_class)),
        majority_baseline=float(np.mean(q_class == majority)),
        mean_km=float(km.mean()),
        median_km=float(np.median(km)),
    )


def near_duplicates(
    *,
    desc_a: np.ndarray,
    ids_a: np.ndarray,
    desc_b: np.ndarray,
    ids_b: np.ndarray,
    threshold: float,
    same: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> pl.DataFrame:
    """Every pair (a, b) with cosine >= threshold: columns sample_id_a, sample_id_b, similarity, most similar first.

    With `same=True`, a and b are one set (pass it twice): no self pairs, each pair once. Rows
    without views (zero descriptors) never match, as the threshold must be positive.
    """
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"threshold is a cosine in (0, 1]; got {threshold}")
    if same and (desc_a.shape != desc_b.shape or not np.array_equal(ids_a, ids_b)):
        raise ValueError("same=True expects one set passed twice")
    rows_a, rows_b, sims = pairs_above(a=desc_a, b=desc_b, threshold=threshold, same=same, block_size=block_size)
    pairs = pl.DataFrame({
        "sample_id_a": np.asarray(ids_a, dtype=np.int64)[rows_a],
        "sample_id_b": np.asarray(ids_b, dtype=np.int64)[rows_b],
        "similarity": sims.astype(np.float64),
    })
    return pairs.sort(["similarity", "sample_id_a", "sample_id_b"], descending=[True, False, False])


@dataclass
class Neighbour:
    rank: int
    sample_id: int
    state_idx: int
    state: str
    latitude: float
    longitude: float
    similarity: float
    km: float | None  # from the query's own position; None when the query is unlabelled


def query_neighbours(
    *,
    query_id: int,
    query_desc: np.ndarray,
    query_latlon: np.ndarray | None,
    db_ids: np.ndarray,
    db_desc: np.ndarray,
    db_state_idx: np.ndarray,
    db_latlon: np.ndarray,
    k: int,
    use_gpu: UseGpu = "auto",
) -> list[Neighbour]:
    """The k database rows most similar to one query; the query itself (same sample_id) is skipped."""
    if not has_views(query_desc[None])[0]:
        raise GeoscoutError(f"sample {query_id} has no embedded view: it has no neighbours")
    db_ok = has_views(db_desc) & (np.asarray(db_ids) != query_id)
    ok_rows = np.flatnonzero(db_ok)
    sims, rows = knn_search(database=db_desc[db_ok], queries=query_desc[None], k=k, use_gpu=use_gpu)
    found = []
    for rank, (sim, row) in enumerate(zip(sims[0], ok_rows[rows[0]]), 1):
        lat, lon = (float(x) for x in db_latlon[row])
        km = None if query_latlon is None else float(haversine_km(query_latlon[0], query_latlon[1], lat, lon))
        idx = int(db_state_idx[row])
        found.append(Neighbour(rank, int(db_ids[row]), idx, state_name(idx), lat, lon, float(sim), km))
    return found


# ---------------------------------------------------------------------------------------- the store


@dataclass
class _SplitDescriptors:
    split: str
    sample_id: np.ndarray
    state_idx: np.ndarray | None
    class_id: np.ndarray | None
    latlon: np.ndarray | None
    desc: np.ndarray
    center: np.ndarray  # the training mean subtracted before normalising


def _read_split_descriptors(
    store_dir: Path, split: str, backbone: str, manifest: dict, block_size: int, center: np.ndarray | None = None
) -> _SplitDescriptors:
    """Descriptors of one split, centred on `center` (the training mean, computed here for train)."""
    table = read_samples(store_dir, split)
    sample_id = table["sample_id"].to_numpy().astype(np.int64)
    with open_checked(store_dir, split, backbone, manifest=manifest, sample_id=sample_id) as f:
        if center is None:
            center = descriptor_center(f["features"], f["mask"], block_size=block_size)
        desc = location_descriptors(f["features"], f["mask"], center=center, block_size=block_size)
    if table["class_id"].null_count():  # the test split: no labels
        return _SplitDescriptors(split, sample_id, None, None, None, desc, center)
    return _SplitDescriptors(
        split, sample_id, table["state_idx"].to_numpy().astype(np.int64), table["class_id"].to_numpy().astype(np.int64),
        table.select("latitude", "longitude").to_numpy().astype(np.float64), desc, center)


def _validation_mask(train: _SplitDescriptors, manifest: dict, split_file: Path | None,
                     val_mask: np.ndarray | None) -> tuple[np.ndarray, str]:
    if split_file is not None and val_mask is not None:
        raise ValueError("pass either split_file or val_mask, not both")
    if val_mask is not None:
        if len(val_mask) != len(train.sample_id):
            raise ValueError(f"val_mask has {len(val_mask)} rows; train has {len(train.sample_id)}")
        return np.asarray(val_mask, dtype=bool), "the given validation rows"
    if split_file is not None:
        # load_validation_split checks the split against these rows and dataset; features are not needed
        rows = SplitFeatures(split="train", sample_id=train.sample_id, features={}, masks={},
                             classes=np.asarray(manifest["classes"], dtype=np.int64), class_id=train.class_id,
                             latlon=train.latlon, dataset_fingerprint=manifest["dataset_fingerprint"])
        return load_validation_split(split_file, rows), f"saved split {split_file}"
    mask = make_validation_split(train.class_id, FALLBACK_VAL_FRACTION, FALLBACK_VAL_SEED)
    return mask, f"a seeded {FALLBACK_VAL_FRACTION:.0%} split per state (seed {FALLBACK_VAL_SEED})"


@dataclass
class KnnReport:
    backbone: str
    k: int
    threshold: float
    device: str  # the index the searches ran on, in words
    validation: str  # where the validation rows came from
    n_train: int
    n_test: int | None  # None when the store has no test features for this backbone
    train_without_views: list[int]  # sample_ids with no embedded view: left out of everything
    test_without_views: list[int]
    scores: KnnScores
    train_test_duplicates: pl.DataFrame | None  # sample_id_a = train, sample_id_b = test
    within_train_duplicates: pl.DataFrame
    pairs_across_validation: int  # within-train pairs with one side validation, one side database
    query: dict | None = None  # sample_id, split, state, position of the asked-for sample
    neighbours: list[Neighbour] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {key: getattr(self, key) for key in (
            "backbone", "k", "threshold", "device", "validation", "n_train", "n_test",
            "train_without_views", "test_without_views", "pairs_across_validation", "query")}
        out["scores"] = asdict(self.scores)
        out["train_test_duplicates"] = None if self.train_test_duplicates is None else (
            self.train_test_duplicates.rename({"sample_id_a": "train", "sample_id_b": "test"}).to_dicts())
        out["within_train_duplicates"] = self.within_train_duplicates.to_dicts()
        out["neighbours"] = [asdict(n) for n in self.neighbours]
        return out

    def format(self) -> str:
        s = self.scores
        lines = [
            f"kNN diagnostic: backbone {self.backbone}, k={s.k}, search: {self.device}",
            f"train {self.n_train:,} locations ({len(self.train_without_views)} without any embedded view, left out)"
            + ("" if self.n_test is None else
               f"; test {self.n_test:,} ({len(self.test_without_views)} without any embedded view)"),
            f"validation ({self.validation}): {s.n_queries:,} queries against {s.n_database:,} training rows",
            f"  state accuracy  {s.accuracy:.4f}   (always the most frequent state: {s.majority_baseline:.4f})",
            f"  position error  mean {s.mean_km:,.1f} km, median {s.median_km:,.1f} km",
            f"near-duplicates (cosine >= {self.threshold}):",
        ]
        if self.train_test_duplicates is None:
            lines.append("  train vs test: no test features in this store")
        else:
            lines += _format_pairs("train vs test", self.train_test_duplicates, "train", "test")
        lines += _format_pairs("within train", self.within_train_duplicates, "train", "train")
        if self.pairs_across_validation:
            lines.append(f"  {self.pairs_across_validation} within-train pair(s) straddle the validation split: "
                         "they inflate validation scores")
        if self.query is not None:
            q = self.query
            where = "" if q["latitude"] is None else f", {q['state']} ({q['latitude']:.4f}, {q['longitude']:.4f})"
            lines.append(f"neighbours of sample {q['sample_id']} ({q['split']}{where}) among train:")
            for n in self.neighbours:
                km = "" if n.km is None else f"  {n.km:,.1f} km away"
                lines.append(f"  {n.rank:>3}. sample {n.sample_id:<8} {n.state:<15} ({n.latitude:.4f}, "
                             f"{n.longitude:.4f})  cosine {n.similarity:.4f}{km}")
        return "\n".join(lines)


def _format_pairs(title: str, pairs: pl.DataFrame, name_a: str, name_b: str) -> list[str]:
    lines = [f"  {title}: {len(pairs)} pair(s)"]
    for a, b, sim in pairs.head(SHOWN_PAIRS).iter_rows():
        lines.append(f"    {name_a} {a:<8} {name_b} {b:<8} cosine {sim:.4f}")
    if len(pairs) > SHOWN_PAIRS:
        lines.append(f"    ... and {len(pairs) - SHOWN_PAIRS} more (--json lists all)")
    return lines


def _query_report(sample_id: int, train: _SplitDescriptors, test: _SplitDescriptors | None, *, k: int,
                  use_gpu: UseGpu) -> tuple[dict, list[Neighbour]]:
    for part in (train, test):
        if part is None:
            continue
        rows = np.flatnonzero(part.sample_id == sample_id)
        if len(rows):
            row = rows[0]
            latlon = None if part.latlon is None else part.latlon[row]
            query = {
                "sample_id": int(sample_id), "split": part.split,
                "state": None if part.state_idx is None else state_name(int(part.state_idx[row])),
                "latitude": None if latlon is None else float(latlon[0]),
                "longitude": None if latlon is None else float(latlon[1]),
            }
            neighbours = query_neighbours(
                query_id=sample_id, query_desc=part.desc[row], query_latlon=latlon, db_ids=train.sample_id,
                db_desc=train.desc, db_state_idx=train.state_idx, db_latlon=train.latlon, k=k, use_gpu=use_gpu)
            return query, neighbours
    raise ConfigError(f"sample_id {sample_id} is in neither the train nor the test split of this store")


def run_knn(
    store_dir: Path,
    *,
    backbone: str,
    k: int = 10,
    threshold: float = 0.98,
    query: int | None = None,
    use_gpu: UseGpu = "auto",
    split_file: Path | None = None,
    val_mask: np.ndarray | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> KnnReport:
    """How well do plain nearest neighbours on one backbone's features locate a street view, and are there duplicates?

    Each location becomes one descriptor (the normalised mean of its embedded views); locations with
    no embedded view are listed and left out. kNN: every validation row (the saved split when
    `split_file` is given, else `val_mask`, else a seeded 10% per state) votes among its k most
    similar remaining training rows, weighted by cosine; the report gives the state accuracy (next
    to the always-most-frequent-state baseline) and the mean and median km from the true position to
    the weighted mean position of the winning state's neighbours. A score far above the heads' is a
    hint to check them; one near the baseline says the backbone carries little location signal.
    Near-duplicates: every train/test and train/train pair with cosine >= `threshold`, by sample_id;
    the same place seen twice in train and test, or across the validation split, inflates validation
    scores and hides overfitting (the count of within-train pairs that straddle the validation split
    is given). With `query`, a sample's k nearest training locations are listed with state,
    position, cosine and distance in km from the sample's own position (when known). Searches are
    exact; they run on the GPU when faiss has one and `use_gpu` allows it ("auto"), else on the CPU.
    """
    store_dir = Path(store_dir)
    try:  # `tiny-clip` finds the store extract wrote as `tiny-clip-random`
        backbone = canonical_name(backbone)
    except ConfigError:
        pass  # not a backbone name geoscout knows: a store file written under that name as it is
    manifest = read_manifest(store_dir)
    train = _read_split_descriptors(store_dir, "train", backbone, manifest, block_size)
    if train.class_id is None:
        raise StoreError(f"{samples_path(store_dir, 'train')} has no labels")
    test = (_read_split_descriptors(store_dir, "test", backbone, manifest, block_size, center=train.center)
            if features_path(store_dir, "test", backbone).exists() else None)
    is_val, validation = _validation_mask(train, manifest, split_file, val_mask)
    if not is_val.any():
        raise GeoscoutError(f"the validation split ({validation}) holds no rows: too few training locations per state")
    device = index_name(use_gpu)

    scores = knn_evaluate(
        train_desc=train.desc[~is_val], train_class=train.class_id[~is_val], train_latlon=train.latlon[~is_val],
        query_desc=train.desc[is_val], query_class=train.class_id[is_val], query_latlon=train.latlon[is_val],
        k=k, use_gpu=use_gpu)
    within = near_duplicates(desc_a=train.desc, ids_a=train.sample_id, desc_b=train.desc, ids_b=train.sample_id,
                             threshold=threshold, same=True, block_size=block_size)
    val_ids = train.sample_id[is_val]
    across = int((np.isin(within["sample_id_a"].to_numpy(), val_ids)
                  != np.isin(within["sample_id_b"].to_numpy(), val_ids)).sum())
    train_test = None if test is None else near_duplicates(
        desc_a=train.desc, ids_a=train.sample_id, desc_b=test.desc, ids_b=test.sample_id, threshold=threshold,
        block_size=block_size)
    query_info, neighbours = (None, []) if query is None else _query_report(
        query, train, test, k=k, use_gpu=use_gpu)
    return KnnReport(
        backbone=backbone, k=k, threshold=threshold, device=device, validation=validation,
        n_train=len(train.sample_id), n_test=None if test is None else len(test.sample_id),
        train_without_views=train.sample_id[~has_views(train.desc)].tolist(),
        test_without_views=[] if test is None else test.sample_id[~has_views(test.desc)].tolist(),
        scores=scores, train_test_duplicates=train_test, within_train_duplicates=within,
        pairs_across_validation=across, query=query_info, neighbours=neighbours,
    )
