import json

import faiss
import h5py
import numpy as np
import polars as pl
import pytest

from geoscout.errors import ConfigError
from geoscout.index import descriptor_center, has_views, knn_search, location_descriptors, resolve_gpu
from geoscout.knn import knn_evaluate, near_duplicates, run_knn
from geoscout.store.layout import MANIFEST, SCHEMA_VERSION, features_path, samples_path
from geoscout.store.split import make_validation_split, save_validation_split
from geoscout.testing import make_planted_features

HAS_GPU = faiss.get_num_gpus() > 0


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def nudged(rng: np.random.Generator, row: np.ndarray, scale: float) -> np.ndarray:
    x = row + scale * rng.normal(size=row.shape).astype(np.float32)
    return x / np.linalg.norm(x)


# ------------------------------------------------------------------------------------ descriptors


def test_descriptors_are_masked_means_and_ignore_masked_values(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 4, 8)).astype(np.float16)
    mask = rng.random((50, 4)) > 0.3
    mask[0] = [True, False, False, False]
    mask[7] = False  # no embedded view
    expected = (feats.astype(np.float64) * mask[..., None]).sum(1)
    expected[7] = 1.0  # placeholder, checked separately
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)

    desc = location_descriptors(feats, mask, block_size=16)
    assert desc.dtype == np.float32 and desc.shape == (50, 8)
    assert not desc[7].any() and not has_views(desc)[7] and has_views(desc).sum() == 49
    ok = np.arange(50) != 7
    np.testing.assert_allclose(desc[ok], expected[ok], atol=1e-6)

    garbage = feats.copy()
    garbage[~mask] = rng.normal(scale=100, size=(int((~mask).sum()), 8)).astype(np.float16)
    garbage[1, ~mask[1]] = np.nan
    np.testing.assert_array_equal(location_descriptors(garbage, mask, block_size=16), desc)

    # memmaps and h5py datasets (read in blocks) give the same descriptors
    mm = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float16, shape=feats.shape)
    mm[:] = feats
    np.testing.assert_array_equal(location_descriptors(mm, mask, block_size=7), desc)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["features"], f["mask"] = feats, mask
    with h5py.File(tmp_path / "f.h5", "r") as f:
        np.testing.assert_array_equal(location_descriptors(f["features"], f["mask"], block_size=7), desc)


# ------------------------------------------------------------------------------------ search


def test_search_equals_brute_force():
    rng = np.random.default_rng(1)
    db, q = unit_rows(rng, 1000, 32), unit_rows(rng, 300, 32)
    sims, rows = knn_search(database=db, queries=q, k=7, use_gpu=False)
    brute = np.argsort(-(q @ db.T), axis=1)[:, :7]
    np.testing.assert_array_equal(rows, brute)
    np.testing.assert_allclose(sims, np.take_along_axis(q @ db.T, brute, axis=1), atol=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 0)


def test_k_larger_than_database_is_clamped():
    rng = np.random.default_rng(2)
    sims, rows = knn_search(database=unit_rows(rng, 5, 8), queries=unit_rows(rng, 3, 8), k=10, use_gpu=False)
    assert rows.shape == (3, 5) and np.all(np.sort(rows, axis=1) == np.arange(5))


@pytest.mark.skipif(not HAS_GPU, reason="this faiss build sees no GPU: the GPU path cannot be compared here")
def test_cpu_and_gpu_searches_agree():
    rng = np.random.default_rng(3)
    db, q = unit_rows(rng, 5000, 64), unit_rows(rng, 700, 64)
    cpu = knn_search(database=db, queries=q, k=10, use_gpu=False)
    gpu = knn_search(database=db, queries=q, k=10, use_gpu=True)
    np.testing.assert_allclose(gpu[0], cpu[0], atol=1e-4)
    assert np.mean(gpu[1] == cpu[1]) > 0.999  # only float near-ties may swap


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present, so asking for it cannot fail")
def test_asking_for_a_missing_gpu_fails_clearly():
    assert resolve_gpu("auto") is False
    with pytest.raises(ConfigError, match="no GPU"):
        resolve_gpu(True)


# ------------------------------------------------------------------------------------ near-duplicates


def test_planted_duplicates_are_all_found_and_nothing_below_threshold():
    rng = np.random.default_rng(4)
    train, test = unit_rows(rng, 500, 64), unit_rows(rng, 200, 64)
    train_ids, test_ids = np.arange(500) + 1000, np.arange(200) + 5000
    for t, s in [(10, 3), (20, 50), (30, 77)]:  # exact copies across splits
        test[t] = train[s]
    test[40] = nudged(rng, train[99], 0.01)  # near-duplicate with noise
    train[200] = train[5]  # within train, exact
    train[300] = nudged(rng, train[6], 0.01)
    train[400] = nudged(rng, train[7], 0.06)  # similar, but below the threshold
    test[50] = nudged(rng, train[8], 0.06)
    assert 0.8 < train[400] @ train[7] < 0.97 and 0.8 < test[50] @ train[8] < 0.97

    across = near_duplicates(desc_a=train, ids_a=train_ids, desc_b=test, ids_b=test_ids, threshold=0.98,
                             block_size=64)
    assert set(across.select("sample_id_a", "sample_id_b").iter_rows()) == {
        (1003, 5010), (1050, 5020), (1077, 5030), (1099, 5040)}
    within = near_duplicates(desc_a=train, ids_a=train_ids, desc_b=train, ids_b=train_ids, threshold=0.98,
                             same=True, block_size=64)
    assert list(within.select("sample_id_a", "sample_id_b").iter_rows()) == [(1005, 1200), (1006, 1300)]
    for pairs in (across, within):
        assert pairs["similarity"].min() >= 0.98
        assert pairs["similarity"].to_list() == sorted(pairs["similarity"].to_list(), reverse=True)
    assert across["similarity"][0] == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------------------------ kNN scores


def _scores(desc, feats, k=10):
    val = make_validation_split(feats.class_id, 0.2, 0)
    return knn_evaluate(
        train_desc=desc[~val], train_class=feats.class_id[~val], train_latlon=feats.latlon[~val],
        query_desc=desc[val], query_class=feats.class_id[val], query_latlon=feats.latlon[val], k=k, use_gpu=False)


def test_knn_recovers_a_planted_signal_and_not_noise():
    feats = make_planted_features(n=1500, dims={"b": 32}, noise={"b": 1.5}, seed=1)
    desc = location_descriptors(feats.features["b"], feats.masks["b"])
    planted = _scores(desc, feats)
    assert planted.accuracy >= 0.95
    assert planted.median_km < 120  # class radius is ~330 km: positions inside the class are recovered
    assert planted.n_database_without_views + planted.n_queries_without_views == int((~has_views(desc)).sum()) > 0

    noise = _scores(unit_rows(np.random.default_rng(5), 1500, 32), feats)
    assert noise.accuracy < noise.majority_baseline + 0.1
    assert noise.median_km > 500


# ------------------------------------------------------------------------------------ run_knn on a store


def _write_store(store_dir, backbone, splits):
    store_dir.mkdir()
    classes = splits["train"].classes
    (store_dir / MANIFEST).write_text(json.dumps({"dataset_fingerprint": "fp", "classes": classes.tolist()}))
    for name, feats in splits.items():
        n, labelled = len(feats.sample_id), feats.class_id is not None
        table = pl.DataFrame({
            "sample_id": feats.sample_id,
            "state_idx": pl.Series(classes[feats.class_id] if labelled else [None] * n, dtype=pl.Int64),
            "class_id": pl.Series(feats.class_id if labelled else [None] * n, dtype=pl.Int64),
            "latitude": pl.Series(feats.latlon[:, 0] if labelled else [None] * n, dtype=pl.Float64),
            "longitude": pl.Series(feats.latlon[:, 1] if labelled else [None] * n, dtype=pl.Float64),
        })
        table.write_csv(samples_path(store_dir, name))
        with h5py.File(features_path(store_dir, name, backbone), "w") as f:
            f["features"], f["mask"], f["sample_id"] = feats.features[backbone], feats.masks[backbone], feats.sample_id
            f.attrs.update(schema_version=SCHEMA_VERSION, complete=True, dataset_fingerprint="fp")


def test_run_knn_on_a_store(tmp_path):
    train = make_planted_features(n=400, dims={"b": 32}, noise={"b": 1.5}, seed=1)
    test = make_planted_features(n=100, dims={"b": 32}, noise={"b": 1.5}, seed=2, labelled=False, split="test")
    test.features["b"][5], test.masks["b"][5] = train.features["b"][17], train.masks["b"][17]
    train.features["b"][30], train.masks["b"][30] = train.features["b"][31], train.masks["b"][31]
    store = tmp_path / "store"
    _write_store(store, "b", {"train": train, "test": test})

    report = run_knn(store, backbone="b", k=5, query=int(test.sample_id[5]), use_gpu=False, block_size=64)
    assert report.scores.accuracy >= 0.9 and report.device == "exact inner product, faiss knn (CPU)"
    assert (17, test.sample_id[5]) in set(report.train_test_duplicates.select("sample_id_a", "sample_id_b").iter_rows())
    assert (30, 31) in set(report.within_train_duplicates.select("sample_id_a", "sample_id_b").iter_rows())
    assert report.train_without_views == train.sample_id[~train.masks["b"].any(1)].tolist()
    first = report.neighbours[0]
    assert len(report.neighbours) == 5 and first.sample_id == 17 and first.km is None
    assert first.similarity == pytest.approx(1.0, abs=1e-5)
    json.dumps(report.to_json())
    assert "state accuracy" in report.format() and "train 17" in report.format()

    # a train query never lists itself; the saved validation split is used when given
    split_file = tmp_path / "split.json"
    val = make_validation_split(train.class_id, 0.25, 1)
    train.dataset_fingerprint = "fp"
    save_validation_split(split_file, features=train, mask=val, fraction=0.25, seed=1)
    report = run_knn(store, backbone="b", k=3, query=30, use_gpu=False, split_file=split_file)
    assert report.scores.n_queries + report.scores.n_queries_without_views == int(val.sum())
    assert [n.sample_id for n in report.neighbours][0] == 31 and 30 not in [n.sample_id for n in report.neighbours]
    assert report.neighbours[0].km is not None  # a labelled query: distances are known
    with pytest.raises(ValueError, match="neither"):
        run_knn(store, backbone="b", query=-1, use_gpu=False)


def test_centering_separates_features_that_share_a_common_direction():

    rng = np.random.default_rng(3)
    common = rng.normal(size=64) * 20  # like a random network's dominant direction
    feats = (common + rng.normal(size=(50, 4, 64))).astype(np.float16)
    feats[7] = feats[3]  # one exact copy
    mask = np.ones((50, 4), dtype=bool)
    raw = location_descriptors(feats, mask)
    centred = location_descriptors(feats, mask, center=descriptor_center(feats, mask, block_size=16), block_size=16)
    off_diagonal = ~np.eye(50, dtype=bool)
    off_diagonal[3, 7] = off_diagonal[7, 3] = False
    assert (raw @ raw.T)[off_diagonal].min() > 0.98  # raw cosines: everything looks like a duplicate
    assert (centred @ centred.T)[off_diagonal].max() < 0.7
    assert centred[3] @ centred[7] == pytest.approx(1.0, abs=1e-5)
