"""Beyond the seed: geocells, haversine smoothing, flip TTA slots, retrieval candidates, expected-distance decoding."""

import dataclasses

import numpy as np
import pytest
import torch

from geoscout.geo import haversine_km, latlon_to_xyz, xyz_to_latlon
from geoscout.heads import (
    ClassifierConfig,
    EnsembleConfig,
    FusionConfig,
    RegressorConfig,
    TrainConfig,
    evaluate,
    fit_ensemble,
    predict,
    train_classifier,
    train_regressor,
)
from geoscout.heads.checkpoint import CheckpointError, load_classifier
from geoscout.heads.decode import DecodeConfig, decode, geometric_median, spread_to_neighbours
from geoscout.heads.geocells import make_geocells
from geoscout.heads.retrieval import Neighbours, build_gallery, search
from geoscout.heads.smoothing import haversine_soft_targets
from geoscout.heads.tta import mirrored_views
from geoscout.store.split import make_validation_split
from geoscout.testing import make_planted_features

BACKBONES = ("tiny-clip", "tiny-convnext")
SWAP = [0, 3, 2, 1]  # N, E, S, W -> N, W, S, E


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _objective(point, points, weights):
    return (weights * haversine_km(point[0], point[1], points[:, 0], points[:, 1])).sum()


# ------------------------------------------------------------------ expected-distance decoding


def _around(lat: float, lon: float, points: np.ndarray) -> np.ndarray:
    """Move points given around (0, 0) rigidly (a rotation of the sphere) to lie around (lat, lon)."""
    a, b = np.radians(lat), np.radians(lon)
    tilt = np.array([[np.cos(a), 0, -np.sin(a)], [0, 1, 0], [np.sin(a), 0, np.cos(a)]])
    turn = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    moved = latlon_to_xyz(points[:, 0], points[:, 1]) @ (turn @ tilt).T
    return np.stack(xyz_to_latlon(moved), axis=1)


def test_the_median_of_symmetric_candidates_is_their_centre():
    square = np.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0], [0.0, -3.0], [2.0, 2.0], [-2.0, -2.0]])
    for centre in ((0.0, 0.0), (39.0, -98.0), (61.0, -150.0)):
        points = _around(*centre, square)
        weights = np.array([1.0, 1.0, 2.0, 2.0, 0.5, 0.5])  # equal weights on opposite points
        lat, lon = geometric_median(points[None], weights[None])
        assert haversine_km(lat[0], lon[0], *centre) < 0.01


def test_a_candidate_holding_most_of_the_weight_is_the_median():
    points = np.array([[[40.0, -100.0], [35.0, -90.0], [45.0, -80.0]]])
    lat, lon = geometric_median(points, np.array([[0.6, 0.3, 0.1]]))
    assert haversine_km(lat[0], lon[0], 40.0, -100.0) < 0.01


def test_the_median_beats_every_point_of_a_fine_grid():
    rng = np.random.default_rng(0)
    points = np.stack([rng.uniform(30, 45, 7), rng.uniform(-120, -75, 7)], axis=1)
    weights = rng.random(7)
    lat, lon = geometric_median(points[None], weights[None])
    grid = np.stack(np.meshgrid(np.linspace(30, 45, 121), np.linspace(-120, -75, 181)), axis=-1).reshape(-1, 2)
    best_on_grid = min(_objective(g, points, weights) for g in grid[::7])
    assert _objective((lat[0], lon[0]), points, weights) <= best_on_grid + 1e-6
    assert _objective((lat[0], lon[0]), points, weights) <= min(_objective(p, points, weights) for p in points)


# ------------------------------------------------------------------ haversine label smoothing


def test_soft_targets_sum_to_one_and_peak_at_the_true_class():
    rng = np.random.default_rng(1)
    centroids = np.stack([rng.uniform(30, 45, 9), rng.uniform(-120, -75, 9)], axis=1)
    latlon = np.stack([rng.uniform(30, 45, 50), rng.uniform(-120, -75, 50)], axis=1)
    true = rng.integers(0, 9, 50)  # often not the nearest centroid: the clip must keep the peak on it
    for tau in (50.0, 250.0, 1000.0):
        y = haversine_soft_targets(latlon, true, centroids, tau_km=tau)
        np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-6)
        assert (y[np.arange(50), true] >= y.max(axis=1) - 1e-7).all()
    sharp, soft = (haversine_soft_targets(latlon, true, centroids, tau_km=t) for t in (1.0, 1000.0))
    assert sharp[np.arange(50), true].mean() > soft[np.arange(50), true].mean()
    group = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    y = haversine_soft_targets(latlon, true, centroids, tau_km=250.0, group=group)
    assert (y[group[None, :] != group[true][:, None]] == 0).all()
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-6)


# ------------------------------------------------------------------ geocells


def test_geocells_never_cross_a_state_border_and_sum_to_states():
    train = make_planted_features(n=600)
    cells = make_geocells(train.class_id, train.latlon, len(train.classes), cells=30, min_rows=10)
    counts = np.bincount(cells.cell_class, minlength=len(train.classes))
    assert 20 <= len(cells) <= 40 and (counts >= 1).all()
    assert counts.argmax() == np.bincount(train.class_id).argmax()  # proportional to a state's rows
    cell = cells.assign(train.class_id, train.latlon)
    np.testing.assert_array_equal(cells.cell_class[cell], train.class_id)
    # every location's cell is the nearest centroid of its own state
    d = haversine_km(train.latlon[:, None, 0], train.latlon[:, None, 1], cells.centroids[None, :, 0], cells.centroids[None, :, 1])
    own = np.where(cells.cell_class[None, :] == train.class_id[:, None], d, np.inf)
    np.testing.assert_array_equal(cell, own.argmin(axis=1))
    logits = torch.randn(5, len(cells), dtype=torch.float64) * 4
    state_p = torch.softmax(cells.class_logits(logits), dim=1)
    summed = torch.zeros(5, len(train.classes), dtype=torch.float64).index_add_(1, torch.from_numpy(cells.cell_class), torch.softmax(logits, 1))
    torch.testing.assert_close(state_p, summed)
    one_each = make_geocells(train.class_id, train.latlon, len(train.classes), cells=0, min_rows=10)
    np.testing.assert_array_equal(one_each.cell_class, np.arange(len(train.classes)))


# ------------------------------------------------------------------ flip TTA


def test_the_east_west_swap_maps_slots():
    n, d = 3, 2
    slot = np.broadcast_to(np.arange(4)[None, :, None], (n, 4, d)).astype(np.float16)  # each view holds its slot number
    mask = np.array([[True, False, True, True]] * n)
    feats, m = mirrored_views(slot, mask, "swap")
    assert feats[0, :, 0].tolist() == [0, 3, 2, 1]  # north, mirrored west in the east slot, south, mirrored east
    assert m[0].tolist() == [True, True, True, False]
    feats, m = mirrored_views(slot, mask, "naive")
    assert feats[0, :, 0].tolist() == [0, 1, 2, 3] and m[0].tolist() == mask[0].tolist()


# ------------------------------------------------------------------ retrieval


def test_retrieved_candidates_come_only_from_the_candidate_cells():
    points = np.array([[[40.0, -100.0], [35.0, -90.0]]])
    weights = np.array([[0.7, 0.3]])
    cells = np.array([[4, 9]])
    neighbours = Neighbours(
        similarity=np.array([[0.9, 0.8, 0.7, 0.6]]), latlon=np.array([[[41, -101], [30, -80], [36, -91], [34, -89]]], float),
        cell=np.array([[4, 2, 9, 9]]), valid=np.ones((1, 4), bool),
    )
    merged, w = spread_to_neighbours(points, weights, cells, neighbours, share=0.5, temperature=0.1)
    assert merged.shape == (1, 6, 2)
    np.testing.assert_allclose(w.sum(), 1.0)
    assert w[0, 3] == 0.0  # cell 2 is no candidate: that neighbour gets nothing
    np.testing.assert_allclose(w[0, [0, 2]], [0.35, 0.35])  # cell 4: half to its point, half to its one neighbour
    np.testing.assert_allclose(w[0, [1, 4, 5]].sum(), 0.3)
    assert w[0, 4] > w[0, 5]  # the more similar neighbour weighs more
    _, none = spread_to_neighbours(points, weights, cells, neighbours._replace(valid=np.zeros((1, 4), bool)),
                                   share=0.5, temperature=0.1)
    np.testing.assert_allclose(none[0, :2], weights[0])  # a query without views keeps its cells' points


def test_search_finds_neighbours_of_the_query_and_decode_keeps_them_inside_the_top_cells():
    train = make_planted_features(n=400)
    cells = make_geocells(train.class_id, train.latlon, len(train.classes), cells=0, min_rows=10)
    rows = np.arange(300)
    gallery = build_gallery(train, rows=rows, backbones=list(BACKBONES), geocells=cells)
    queries = train.subset(np.arange(300, 400))
    found = search(gallery, queries, k=8)
    same_state = (found.cell == queries.class_id[:, None])[found.valid.any(axis=1)]
    assert same_state.mean() > 0.8  # planted states are easy to tell apart
    logits = np.full((100, len(cells)), -20.0)
    logits[np.arange(100), queries.class_id] = 0.0  # a sure belief: the true state only
    config = DecodeConfig(candidates=2, retrieval_k=8, similarity_temperature=0.05)
    with_retrieval = decode(logits, cells, config, neighbours=found, retrieval_weight=1.0)
    plain = decode(logits, cells, config)
    km = lambda p: haversine_km(queries.latlon[:, 0], queries.latlon[:, 1], p.lat, p.lon).mean()  # noqa: E731
    assert km(with_retrieval) < km(plain)


# ------------------------------------------------------------------ the heads end to end


def _classifier(**changes) -> ClassifierConfig:
    config = ClassifierConfig(
        fusion=FusionConfig(width=32, depth=1, heads=2, ffn_dim=64), hidden=64, dropout=0.1, label_smoothing=0.0,
        geocells=24, min_cell_rows=10, haversine_tau_km=100.0,
        train=TrainConfig(epochs=20, batch_size=64, lr=3e-3, patience=6),
    )
    return dataclasses.replace(config, **changes)


def _mirror_symmetric(features):
    """A world that looks the same in a mirror: each mirrored view is the E/W-swapped original (so East
    and West are missing together)."""
    masks = {b: m.copy() for b, m in features.masks.items()}
    for m in masks.values():
        m[:, 1] = m[:, 3] = m[:, 1] & m[:, 3]
    return dataclasses.replace(features, masks=masks, flipped={b: f[:, SWAP] for b, f in features.features.items()})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("additions")
    train = _mirror_symmetric(make_planted_features(n=600))
    val_mask = make_validation_split(train.class_id, 0.25, 0)
    dirs = {b: root / b for b in BACKBONES}
    for b in BACKBONES:
        train_classifier(train, backbone=b, val_mask=val_mask, out_dir=dirs[b], config=_classifier(), progress=False)
    train_regressor(train, classifier_dir=dirs["tiny-clip"], val_mask=val_mask, out_dir=root / "regressor", progress=False,
                    config=RegressorConfig(hidden=64, anchor="true", train=TrainConfig(epochs=30, batch_size=64, lr=2e-3, patience=8)))
    config = EnsembleConfig(flip_tta="swap", decode=DecodeConfig(candidates=4, retrieval_k=16))
    ensemble = fit_ensemble(train, classifier_dirs=dirs, val_mask=val_mask, out_dir=root / "ensemble",
                            regressor_dir=root / "regressor", config=config)
    return dict(root=root, train=train, val_mask=val_mask, dirs=dirs, ensemble=ensemble)


def test_geocell_heads_learn_and_round_trip(run):
    evaluation = evaluate(run["train"], val_mask=run["val_mask"], classifier_dirs=run["dirs"], regressor_dir=run["root"] / "regressor",
                          ensemble_dir=run["root"] / "ensemble", print_table=False).metrics
    assert evaluation["ensemble"]["top1_accuracy"] >= 0.95
    assert evaluation["ensemble"]["score"] > evaluation["baseline"]["score"] + 0.3
    # the saved ensemble (TTA, retrieval over a gallery, median) reproduces what was measured while fitting
    assert evaluation["ensemble"] == pytest.approx(run["ensemble"].metrics)
    module, card = load_classifier(run["dirs"]["tiny-clip"])
    assert module.head[-1].out_features == len(card.centroids) == len(card.cell_class) > len(card.classes)
    assert run["ensemble"].flip_tta == "swap" and len(run["ensemble"].retrieval_curve) == 5


def test_swap_tta_of_a_mirror_symmetric_world_changes_nothing(run, tmp_path):
    """The swapped mirrored views ARE the original views here, so averaging their logits is a no-op."""
    plain = dataclasses.replace(EnsembleConfig(flip_tta="none"), alpha=0.5)
    swap = dataclasses.replace(plain, flip_tta="swap")
    a, b = (fit_ensemble(run["train"], classifier_dirs=run["dirs"], val_mask=run["val_mask"], out_dir=tmp_path / name,
                         config=config).metrics for name, config in (("a", plain), ("b", swap)))
    assert a == pytest.approx(b)


def test_retrieval_ensembles_need_a_gallery_of_the_same_data(run, tmp_path):
    test = _mirror_symmetric(make_planted_features(n=40, seed=9, labelled=False, split="test"))
    ensemble = tmp_path / "ensemble"
    fit_ensemble(run["train"], classifier_dirs=run["dirs"], val_mask=run["val_mask"], out_dir=ensemble,
                 config=EnsembleConfig(decode=DecodeConfig(candidates=3, retrieval_k=8, retrieval_weight=0.5)))
    with pytest.raises(ValueError, match="gallery"):
        predict(test, ensemble_dir=ensemble)
    foreign = dataclasses.replace(run["train"], dataset_fingerprint="someone-elses-data")
    with pytest.raises(CheckpointError, match="someone-elses-data"):
        predict(test, ensemble_dir=ensemble, gallery=foreign)
    top5, lat, lon = predict(test, ensemble_dir=ensemble, gallery=run["train"])
    assert top5.shape == (40, 5) and np.isfinite(lat).all() and np.isfinite(lon).all()


def test_flip_tta_without_mirrored_views_is_left_out_with_a_warning(run, tmp_path):
    plain = dataclasses.replace(run["train"], flipped={})
    with pytest.warns(UserWarning, match="flip TTA"):
        result = fit_ensemble(plain, classifier_dirs=run["dirs"], val_mask=run["val_mask"], out_dir=tmp_path / "e",
                              config=EnsembleConfig(flip_tta="swap"))
    assert result.flip_tta == "none"


def test_members_with_other_geocells_are_not_ensembled(run, tmp_path):
    other = tmp_path / "other"
    train_classifier(run["train"], backbone="tiny-convnext", val_mask=run["val_mask"], out_dir=other,
                     config=_classifier(geocells=12, train=TrainConfig(epochs=1, batch_size=64)), progress=False)
    with pytest.raises(CheckpointError, match="geocells"):
        fit_ensemble(run["train"], classifier_dirs={"tiny-clip": run["dirs"]["tiny-clip"], "tiny-convnext": other},
                     val_mask=run["val_mask"], out_dir=tmp_path / "e")
