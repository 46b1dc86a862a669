"""Beyond the seed: geocells, haversine smoothing, flip TTA slots, retrieval candidates, expected-distance decoding.

The heads that use them end to end: test_heads_api.py."""

import numpy as np
import pytest
import torch

from geoscout.geo import haversine_km, latlon_to_xyz, xyz_to_latlon
from geoscout.heads.decode import decode, geometric_median, spread_to_neighbours
from geoscout.heads.geocells import make_geocells
from geoscout.heads.retrieval import Neighbours, build_gallery, fit_space, search
from geoscout.heads.smoothing import haversine_soft_targets
from geoscout.heads.tta import mirrored_views
from geoscout.testing import make_planted_features

BACKBONES = ("tiny-clip", "tiny-convnext")


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


def test_a_candidate_that_is_the_median_without_half_the_weight_is_found_exactly():
    # 0.4 of the weight, but the others pull in different directions (their pull is under 0.4): the median
    # is that candidate, which plain Weiszfeld only creeps toward (6 cm away after 100 iterations)
    points = np.array([[[40.0, -100.0], [42.0, -100.0], [39.0, -97.0], [38.5, -103.0]]])
    weights = np.array([[0.4, 0.3, 0.2, 0.1]])
    lat, lon = geometric_median(points, weights)
    assert haversine_km(lat[0], lon[0], 40.0, -100.0) < 1e-6  # a millimetre
    assert _objective((lat[0], lon[0]), points[0], weights[0]) <= _objective((40.001, -100.0), points[0], weights[0])


def test_the_median_beats_every_point_of_a_fine_grid():
    rng = np.random.default_rng(0)
    points = np.stack([rng.uniform(30, 45, 7), rng.uniform(-120, -75, 7)], axis=1)
    weights = rng.random(7)
    lat, lon = geometric_median(points[None], weights[None])
    grid = np.stack(np.meshgrid(np.linspace(30, 45, 121), np.linspace(-120, -75, 181)), axis=-1).reshape(-1, 2)
    best_on_grid = min(_objective(g, points, weights) for g in grid[::7])
    assert _objective((lat[0], lon[0]), points, weights) <= best_on_grid + 1e-6
    assert _objective((lat[0], lon[0]), points, weights) <= min(_objective(p, points, weights) for p in points)



def test_each_row_of_a_batch_gets_the_median_it_gets_alone():
    # rows settle after very different numbers of iterations (a heavy candidate is reached slowly); each
    # row's answer must not depend on the others still iterating beside it
    rng = np.random.default_rng(1)
    points = np.stack([rng.uniform(30, 45, (40, 9)), rng.uniform(-120, -75, (40, 9))], axis=-1)
    weights = rng.dirichlet(np.full(9, 0.3), 40)
    weights[::3, 0] += 2.0
    lat, lon = geometric_median(points, weights)
    for i in range(len(points)):
        alone = geometric_median(points[i:i + 1], weights[i:i + 1])
        assert haversine_km(lat[i], lon[i], alone[0][0], alone[1][0]) < 1e-6

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
    space = fit_space(train, rows=rows, backbones=list(BACKBONES), dim=0)
    gallery = build_gallery(space.describe(train), train.latlon, train.class_id, rows)
    queries = train.subset(np.arange(300, 400))
    found = search(gallery, space.describe(queries), k=8)
    same_state = (found.cell == queries.class_id[:, None])[found.valid.any(axis=1)]
    assert same_state.mean() > 0.8  # planted states are easy to tell apart
    logits = np.full((100, len(cells)), -20.0)
    logits[np.arange(100), queries.class_id] = 0.0  # a sure belief: the true state only
    with_retrieval = decode(logits, cells, candidates=2, neighbours=found, retrieval_weight=1.0)
    plain = decode(logits, cells, candidates=2)
    km = lambda p: haversine_km(queries.latlon[:, 0], queries.latlon[:, 1], p.lat, p.lon).mean()  # noqa: E731
    assert km(with_retrieval) < km(plain)


def test_projected_search_keeps_the_neighbours():
    """Retrieval projects wide descriptors on their top principal directions: the neighbours it finds are
    mostly those of the full-width search."""
    train = make_planted_features(n=600, dims={"a": 96, "b": 128})
    rows = np.arange(500)
    full = fit_space(train, rows=rows, backbones=["a", "b"], dim=0)
    projected = fit_space(train, rows=rows, backbones=["a", "b"], dim=32)
    assert projected.basis.shape == (224, 32)
    # float32 throughout: at competition scale a float64 copy of the full-width descriptors is 1.4 GB
    assert full.describe(train).dtype == projected.describe(train).dtype == np.float32
    queries = train.subset(np.arange(500, 600))
    found = [search(build_gallery(s.describe(train), train.latlon, train.class_id, rows), s.describe(queries), k=10)
             for s in (full, projected)]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found[0].latlon[:, :, 0], found[1].latlon[:, :, 0])])
    assert overlap > 0.6
