"""The one training loop: a step budget with a floor and a cap, early stopping on held-out loss with the
best weights restored, convergence at 150 and at 2,000 rows per state; the probe against scikit-learn."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geoscout.heads.classifier import ProbeObjective
from geoscout.heads.inputs import row_statistics, views_of
from geoscout.heads.models import ClassifierConfig, FusionConfig, Probe
from geoscout.heads.training import TrainConfig, fit, heldout_loss, seeded
from geoscout.testing import make_planted_features

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_budget_is_steps_with_a_floor_and_a_cap():
    config = TrainConfig(batch_size=512, max_epochs=10, min_steps=300, max_steps=5000)
    assert config.budget(200) == 300  # a tiny split still gets the floor: many passes
    assert config.budget(51_200) == 1000  # 10 passes of 100 batches
    assert config.budget(10_000_000) == 5000  # the cap
    assert config.batch_size_for(600) == 75  # at least 8 batches per pass
    assert config.eval_interval(51_200) == 50  # two evaluations per pass


class _Memorise:
    """Labels that are noise: training fits them, held-out loss only gets worse after the first steps."""

    def __init__(self, x, y):
        self.x, self.y = torch.as_tensor(x), torch.as_tensor(y)

    def batch(self, rows, device, *, train):
        return {"x": self.x[rows], "y": self.y[rows]}

    def loss(self, module, batch):
        return F.cross_entropy(module(batch["x"]), batch["y"])

    def heldout_loss(self, module, batch):
        return F.cross_entropy(module(batch["x"]), batch["y"], reduction="none")


def test_early_stopping_keeps_the_best_held_out_weights():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(400, 32)).astype(np.float32), rng.integers(0, 4, 400)
    objective = _Memorise(x, y)
    with seeded(0):
        module = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
    config = TrainConfig(batch_size=32, lr=1e-2, max_epochs=200, min_steps=2000, patience=5, max_eval_interval=20)
    train_rows, heldout = np.arange(300), np.arange(300, 400)
    result = fit(module, objective, train_rows=train_rows, heldout_rows=heldout, config=config, seed=0, device=CPU,
                 desc="memorise", progress=False)
    assert result.steps_run < result.budget  # stopped by patience, long before the budget
    losses = [h["heldout_loss"] for h in result.history]
    assert result.best_loss == min(losses) and losses[-1] > result.best_loss
    # the module handed back is the best one, not the last one
    assert heldout_loss(module, objective, heldout, batch_size=64, device=CPU) == pytest.approx(result.best_loss)


@pytest.mark.parametrize("rows_per_state", [150, 2000])
def test_a_classifier_trains_to_convergence_at_150_and_2000_rows_per_state(rows_per_state):
    """Convergence = the held-out NLL stopped improving (patience ran out) before the step budget did,
    far below where it started; a fixed epoch count would underfit one of the two scales."""
    from geoscout.heads.classifier import ClassifierObjective
    from geoscout.heads.geocells import make_geocells
    from geoscout.heads.models import Scout

    states = 4
    train = make_planted_features(n=rows_per_state * states, num_classes=states, dims={"b": 24}, noise={"b": 3.0}, seed=1)
    views = views_of(train, ["b"])
    cells = make_geocells(train.class_id, train.latlon, states, cells=0, min_rows=1)
    config = ClassifierConfig(fusion=FusionConfig(kind="mean", width=None, input_norm=False), hidden=64, dropout=0.1,
                              train=TrainConfig(batch_size=256, lr=2e-3, max_epochs=30, min_steps=200, patience=4))
    objective = ClassifierObjective(views, train.class_id, train.latlon, cells, label_smoothing=0.0, haversine_tau_km=0.0,
                                    haversine_within_state=True, view_dropout=0.0)
    rows = np.random.default_rng(0).permutation(len(train))
    cut = int(0.8 * len(rows))
    with seeded(0):
        module = Scout(config, 24, states)
    mean, std = row_statistics(views.means, rows[:cut])
    module.standardize.set_statistics(mean, std)
    result = fit(module, objective, train_rows=np.sort(rows[:cut]), heldout_rows=np.sort(rows[cut:]), config=config.train,
                 seed=0, device=CPU, desc="converge", progress=False)
    assert result.steps_run < result.budget, "the budget ran out while the held-out NLL was still improving"
    assert result.best_loss < 0.5 * result.history[0]["heldout_loss"]


def test_the_probe_matches_scikit_learns_logistic_regression():
    """Same objective (mean cross-entropy + l2/2 |W|^2 is sklearn's C = 1 / (l2 * n)), same standardised
    view means: the held-out NLL and accuracy of our minibatch fit match lbfgs's optimum."""
    from sklearn.linear_model import LogisticRegression

    train = make_planted_features(n=1200, num_classes=6, dims={"a": 16, "b": 24}, seed=2)
    views = views_of(train, ["a", "b"])
    means = views.means
    fit_rows, heldout = np.arange(900), np.arange(900, 1200)
    mean, std = row_statistics(means, fit_rows, present=views.mask.any(axis=1))
    l2 = 1e-2
    with seeded(0):
        probe = Probe(means.shape[1], 6)
    probe.standardize.set_statistics(mean, std)
    objective = ProbeObjective(means, train.class_id, l2=l2)
    fit(probe, objective, train_rows=fit_rows, heldout_rows=heldout,
        config=TrainConfig(batch_size=128, lr=2e-2, weight_decay=0.0, max_epochs=60, min_steps=400, patience=8),
        seed=0, device=CPU, desc="probe", progress=False)
    ours = heldout_loss(probe, objective, heldout, batch_size=512, device=CPU)
    x = (means - mean) / std
    reference = LogisticRegression(C=1.0 / (l2 * len(fit_rows)), max_iter=5000).fit(x[fit_rows], train.class_id[fit_rows])
    theirs = -np.mean(np.log(reference.predict_proba(x[heldout])[np.arange(len(heldout)), train.class_id[heldout]]))
    assert ours == pytest.approx(theirs, abs=0.05)
    with torch.no_grad():
        accuracy = (probe(torch.from_numpy(means[heldout])).argmax(1).numpy() == train.class_id[heldout]).mean()
    assert accuracy == pytest.approx(reference.score(x[heldout], train.class_id[heldout]), abs=0.02)


def test_view_means_are_computed_once_per_split_and_match_a_plain_masked_mean():
    """views_of hands out one Views per split and backbones; the side-by-side means reuse a backbone's
    own means where its mask is the shared one, and use the shared mask where it is not."""
    train = make_planted_features(n=300, num_classes=3, dims={"a": 8, "b": 12}, missing_fraction=0.3, seed=4)

    def plain(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        x = np.where(mask[..., None], features.astype(np.float32), 0.0)
        return x.sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1)

    both = views_of(train, ["a", "b"])
    assert views_of(train, ("a", "b")) is both and both.means is views_of(train, ["a", "b"]).means
    shared = train.masks["a"] & train.masks["b"]
    expected = np.concatenate([plain(train.features[b], shared) for b in ("a", "b")], axis=1)
    np.testing.assert_allclose(both.means, expected, rtol=1e-6, atol=1e-6)
    train.masks["b"][:20] = False  # b lost views that a kept: a's own means no longer serve the pair
    fresh = train.subset(np.arange(len(train)))
    shared = fresh.masks["a"] & fresh.masks["b"]
    expected = np.concatenate([plain(fresh.features[b], shared) for b in ("a", "b")], axis=1)
    np.testing.assert_allclose(views_of(fresh, ["a", "b"]).means, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(views_of(fresh, ["a"]).means, plain(fresh.features["a"], fresh.masks["a"]),
                               rtol=1e-6, atol=1e-6)


def test_a_split_made_from_another_does_not_inherit_its_cached_view_means():
    import dataclasses

    train = make_planted_features(n=200, num_classes=3, dims={"a": 8}, missing_fraction=0.2, seed=5)
    assert views_of(train, ["a"]).means.any()
    emptied = dataclasses.replace(train, masks={"a": np.zeros_like(train.masks["a"])})
    assert not views_of(emptied, ["a"]).means.any()  # no view left: zeros, not the first split's means
