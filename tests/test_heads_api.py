"""Heads end to end on planted features: cross-fitted members, the ensemble fitted on out-of-fold outputs
only, checkpoints, refusals, predictions."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from geoscout.device import resolve_device
from geoscout.errors import ConfigError
from geoscout.heads import (
    ClassifierConfig,
    DecodeConfig,
    EnsembleConfig,
    FusionConfig,
    MemberSpec,
    ProbeConfig,
    RegressorConfig,
    TrainConfig,
    api,
    ensemble_outputs,
    evaluate,
    fit_ensemble,
    make_protocol,
    predict,
    train_members,
)
from geoscout.heads.checkpoint import CARD_FILE, CheckpointError, fold_file, read_oof
from geoscout.heads.ensemble import state_log_probs
from geoscout.heads.inputs import views_of
from geoscout.heads.members import _outputs, load_member, member_oof
from geoscout.metric import METRIC_KEYS
from geoscout.store.split import make_validation_split
from geoscout.testing import make_planted_features

BACKBONES = ("tiny-clip", "tiny-convnext")
SWAP = [0, 3, 2, 1]  # N, E, S, W -> N, W, S, E
CPU = torch.device("cpu")
FAST = TrainConfig(batch_size=64, lr=3e-3, max_epochs=30, min_steps=60, patience=4, max_eval_interval=10)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def classifier(**changes) -> ClassifierConfig:
    config = ClassifierConfig(fusion=FusionConfig(kind="mean", width=None, input_norm=False), hidden=64, dropout=0.1,
                              geocells=24, min_cell_rows=10, haversine_tau_km=100.0, view_dropout=0.1, train=FAST)
    return dataclasses.replace(config, **changes)


def members() -> list[MemberSpec]:
    probe = ProbeConfig(l2=(1e-3, 1e-2), train=dataclasses.replace(FAST, lr=2e-2, weight_decay=0.0))
    return [*(MemberSpec("classifier", (b,), classifier()) for b in BACKBONES), MemberSpec("probe", BACKBONES, probe)]


ENSEMBLE = EnsembleConfig(flip_tta="swap", regressor="auto",
                          decode=DecodeConfig(candidates=(1, 4), retrieval_k=16, retrieval_weights=(0.0, 0.5)))
REGRESSOR = RegressorConfig(hidden=64, anchor="true", train=dataclasses.replace(FAST, lr=2e-3))


def mirror_symmetric(features):
    """A world that looks the same in a mirror: each mirrored view is the E/W-swapped original (so East
    and West are missing together)."""
    masks = {b: m.copy() for b, m in features.masks.items()}
    for m in masks.values():
        m[:, 1] = m[:, 3] = m[:, 1] & m[:, 3]
    return dataclasses.replace(features, masks=masks, flipped={b: f[:, SWAP] for b, f in features.features.items()})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    train = mirror_symmetric(make_planted_features(n=600))
    protocol = make_protocol(train, make_validation_split(train.class_id, 0.2, 0), folds=3)
    specs = members()
    dirs = {m.name: root / m.name for m in specs}
    results = train_members(train, specs, protocol, dirs, device="cpu", progress=False)
    ensemble = fit_ensemble(train, member_dirs=list(dirs.values()), protocol=protocol, out_dir=root / "ensemble",
                            config=ENSEMBLE, regressor_config=REGRESSOR, device="cpu", progress=False)
    return dict(root=root, train=train, protocol=protocol, dirs=dirs, results=results, ensemble=ensemble)


def test_members_learn_and_every_fit_row_gets_one_out_of_fold_output(run):
    protocol = run["protocol"]
    for result in run["results"]:
        assert result.oof["top1_accuracy"] >= 0.85, result
        outputs, sample_id = read_oof(result.out_dir)
        np.testing.assert_array_equal(sample_id, run["train"].sample_id[protocol.folds.fit_rows])
        assert set(outputs) == {"", "swap", "naive"}  # the store has mirrored views
    probe = next(r for r in run["results"] if r.name.startswith("probe"))
    assert probe.details["l2"] in (1e-3, 1e-2) and len(probe.details["l2_tried"]) == 2
    assert not set(protocol.folds.fit_rows) & set(protocol.val_rows)


@pytest.mark.parametrize("member", ["classifier-tiny-clip", "probe-tiny-clip+tiny-convnext"])
def test_out_of_fold_outputs_come_from_the_fold_model_that_never_saw_the_row(run, member):
    folds, train = run["protocol"].folds, run["train"]
    loaded = load_member(run["dirs"][member])
    oof = member_oof(loaded, train, folds)
    outputs = _outputs(loaded.card.kind, views_of(train, loaded.card.backbones), device=CPU)
    for k in range(folds.k):
        assert not set(folds.train_rows(k)) & set(folds.heldout_rows(k))
        np.testing.assert_allclose(outputs(loaded.models[k], folds.heldout_rows(k)), oof[folds.fold == k], atol=1e-5)
        # ... and differs from what the models that did train on those rows say
        other = (k + 1) % folds.k
        assert not np.allclose(outputs(loaded.models[other], folds.heldout_rows(k)), oof[folds.fold == k], atol=1e-3)


def test_the_regressor_and_the_ensemble_are_fitted_on_out_of_fold_outputs_only(run, monkeypatch, tmp_path):
    """What the weights and the regressor are fitted on must be each fit row's output from the fold model
    that left it out, never from models that trained on it (in-sample outputs are over-confident, so a
    stack fitted on them trusts the members too much)."""
    seen = {}
    fit_pool, train_regressor = api._fit_pool, api._train_regressor

    def spy_pool(oof, *args, **kwargs):
        seen["pool"] = oof
        return fit_pool(oof, *args, **kwargs)

    def spy_regressor(descriptors, joint, *args, **kwargs):
        seen["joint"] = joint
        return train_regressor(descriptors, joint, *args, **kwargs)

    monkeypatch.setattr(api, "_fit_pool", spy_pool)
    monkeypatch.setattr(api, "_train_regressor", spy_regressor)
    config = dataclasses.replace(ENSEMBLE, flip_tta="none", regressor="on", decode=DecodeConfig())
    result = fit_ensemble(run["train"], member_dirs=list(run["dirs"].values()), protocol=run["protocol"],
                          out_dir=tmp_path / "e", config=config, regressor_config=REGRESSOR, device="cpu", progress=False)
    train, folds = run["train"], run["protocol"].folds
    honest, in_sample = [], []
    for name in result.members:
        loaded = load_member(run["dirs"][name])
        outputs = _outputs(loaded.card.kind, views_of(train, loaded.card.backbones), device=CPU)
        rows = np.empty((len(folds.fit_rows), len(loaded.card.centroids)), dtype=np.float32)
        for k in range(folds.k):
            rows[folds.fold == k] = outputs(loaded.models[k], folds.heldout_rows(k))
        honest.append(rows)
        in_sample.append(np.mean([outputs(m, folds.fit_rows) for m in loaded.models], axis=0))
    for got, want, leaky in zip(seen["pool"], honest, in_sample):
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert np.abs(got - leaky).max() > 0.1  # the test can tell the two apart
    members_ = api._load_members([run["dirs"][n] for n in result.members])
    want_joint = api._combine(honest, members_, np.array(result.weights), result.temperatures)
    np.testing.assert_allclose(seen["joint"], want_joint, atol=1e-6)


def test_the_weights_lie_on_the_simplex_and_are_recorded(run):
    result = run["ensemble"]
    record = json.loads((run["root"] / "ensemble" / "ensemble.json").read_text())
    weights = [m["weight"] for m in record["members"]]
    assert len(weights) == 3 and min(weights) >= 0 and sum(weights) == pytest.approx(1.0)
    assert weights == pytest.approx(result.weights)
    assert all(m["temperature"] > 0 for m in record["members"])
    assert record["oof"]["score"] == pytest.approx(result.oof["ensemble"]["score"])
    assert {c["candidates"] for c in record["choices"]} == {1, 4}  # every decoding was tried out of fold
    # these members have mirrored views: flip TTA was tried out of fold, and the note says how it went
    assert record["flip_tta_note"] == ("'swap' kept: it wins out of fold" if record["flip_tta"] == "swap"
                                       else "'swap' left out: it does not win out of fold")


def test_evaluation_reports_every_member_and_the_ensemble_above_the_baseline(run):
    metrics = evaluate(run["train"], run["protocol"], ensemble_dir=run["root"] / "ensemble", device="cpu").metrics
    assert set(metrics) == {"baseline", *run["dirs"], "ensemble"}
    assert all(set(METRIC_KEYS) <= set(m) for m in metrics.values())
    assert metrics["ensemble"]["score"] > metrics["baseline"]["score"] + 0.3
    assert metrics["ensemble"]["mean_km"] < min(metrics[n]["mean_km"] for n in run["dirs"])


def test_predictions_round_trip_and_cover_an_unlabelled_split(run):
    test = mirror_symmetric(make_planted_features(n=50, seed=9, labelled=False, split="test"))
    kwargs = dict(device="cpu", gallery=run["train"], fit_rows=run["protocol"].folds.fit_rows)
    first = predict(test, run["root"] / "ensemble", **kwargs)
    second = predict(test, run["root"] / "ensemble", **kwargs)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert first.top5.shape == (50, 5) and ((first.top5 >= 0) & (first.top5 < len(test.classes))).all()
    assert np.isfinite(first.lat).all() and np.isfinite(first.lon).all()


def test_retrieval_needs_a_gallery_of_the_same_data(run, tmp_path):
    config = dataclasses.replace(ENSEMBLE, decode=DecodeConfig(retrieval_k=8, retrieval_weights=(0.5,)))
    fit_ensemble(run["train"], member_dirs=list(run["dirs"].values()), protocol=run["protocol"], out_dir=tmp_path / "e",
                 config=config, regressor_config=REGRESSOR, device="cpu", progress=False)
    test = mirror_symmetric(make_planted_features(n=20, seed=9, labelled=False, split="test"))
    with pytest.raises(ConfigError, match="gallery"):
        predict(test, tmp_path / "e", device="cpu")
    foreign = dataclasses.replace(run["train"], dataset_fingerprint="someone-elses-data")
    with pytest.raises(CheckpointError, match="someone-elses-data"):
        predict(test, tmp_path / "e", device="cpu", gallery=foreign, fit_rows=run["protocol"].folds.fit_rows)


def test_swap_tta_of_a_mirror_symmetric_world_is_a_no_op_out_of_fold(run, tmp_path):
    """The swapped mirrored views ARE the original views here, so the mirrored OOF outputs of a member that
    knows which slot is which (concatenated views) must equal the plain ones exactly; the naive mirror
    (no East/West swap) puts views in other slots and differs."""
    spec = MemberSpec("classifier", ("tiny-clip",), classifier(fusion=FusionConfig(kind="concat", width=None, input_norm=False),
                                                             train=dataclasses.replace(FAST, min_steps=20, max_epochs=3)))
    train_members(run["train"], [spec], run["protocol"], {spec.name: tmp_path / "m"}, device="cpu", progress=False)
    loaded = load_member(tmp_path / "m")
    plain = member_oof(loaded, run["train"], run["protocol"].folds)
    np.testing.assert_allclose(member_oof(loaded, run["train"], run["protocol"].folds, "swap"), plain, atol=1e-5)
    assert not np.allclose(member_oof(loaded, run["train"], run["protocol"].folds, "naive"), plain, atol=1e-3)


def test_flip_tta_without_mirrored_views_is_left_out_with_a_note(run, tmp_path):
    plain = dataclasses.replace(run["train"], flipped={})
    specs = [MemberSpec("classifier", ("tiny-clip",), classifier())]
    train_members(plain, specs, run["protocol"], {specs[0].name: tmp_path / "m"}, device="cpu", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default asks for it where it can be had: no warning
        result = fit_ensemble(plain, member_dirs=[tmp_path / "m"], protocol=run["protocol"], out_dir=tmp_path / "e",
                              config=ENSEMBLE, regressor_config=REGRESSOR, device="cpu", progress=False)
    record = json.loads((result.out_dir / "ensemble.json").read_text())
    assert record["flip_tta"] == result.flip_tta == "none"
    assert "no mirrored views" in record["flip_tta_note"] == result.flip_tta_note


@pytest.mark.parametrize("change, message", [
    (lambda f: dataclasses.replace(f, dataset_fingerprint="other"), "dataset"),
    (lambda f: dataclasses.replace(f, backbone_fingerprints={**f.backbone_fingerprints, "tiny-clip": "other"}), "other weights"),
    (lambda f: dataclasses.replace(f, features={**f.features, "tiny-clip": f.features["tiny-clip"][:, :, :8]},
                                   flipped={**f.flipped, "tiny-clip": f.flipped["tiny-clip"][:, :, :8]}), "8-d"),
])
def test_heads_refuse_foreign_features(run, change, message):
    with pytest.raises(CheckpointError, match=message):
        ensemble_outputs(change(run["train"]), run["root"] / "ensemble", device="cpu", gallery=run["train"],
                         fit_rows=run["protocol"].folds.fit_rows)


def test_members_of_other_folds_or_other_geocells_are_not_ensembled(run, tmp_path):
    other_folds = make_protocol(run["train"], np.isin(np.arange(len(run["train"])), run["protocol"].val_rows), folds=3, seed=7)
    spec = MemberSpec("classifier", ("tiny-convnext",), classifier(geocells=12))
    train_members(run["train"], [spec], other_folds, {spec.name: tmp_path / "folds"}, device="cpu", progress=False)
    with pytest.raises(CheckpointError, match="folds"):
        fit_ensemble(run["train"], member_dirs=[run["dirs"]["classifier-tiny-clip"], tmp_path / "folds"],
                     protocol=run["protocol"], out_dir=tmp_path / "e", config=ENSEMBLE, regressor_config=REGRESSOR)
    train_members(run["train"], [spec], run["protocol"], {spec.name: tmp_path / "cells"}, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="geocells"):
        fit_ensemble(run["train"], member_dirs=[run["dirs"]["classifier-tiny-clip"], tmp_path / "cells"],
                     protocol=run["protocol"], out_dir=tmp_path / "e", config=ENSEMBLE, regressor_config=REGRESSOR)


def test_a_config_that_does_not_fit_the_weights_is_a_clear_error(run, tmp_path):
    import shutil

    head = tmp_path / "head"
    shutil.copytree(run["dirs"]["classifier-tiny-clip"], head)
    card = json.loads((head / CARD_FILE).read_text())
    card["config"]["hidden"] = 32
    (head / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=f"do not fit the config.*{fold_file(0)}|{fold_file(0)}.*do not fit"):
        load_member(head)


def test_the_same_seed_gives_bitwise_identical_weights(run, tmp_path):
    spec = MemberSpec("classifier", ("tiny-clip",), classifier(train=dataclasses.replace(FAST, min_steps=20, max_epochs=2)))
    for name in ("a", "b"):
        train_members(run["train"], [spec], run["protocol"], {spec.name: tmp_path / name}, device="cpu", seed=3, progress=False)
    for k in range(run["protocol"].folds.k):
        a, b = (load_file(str(tmp_path / name / fold_file(k))) for name in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_fixed_weights_are_used_as_given():
    rng = np.random.default_rng(0)
    from geoscout.heads.ensemble import pool

    log_probs = [torch.log_softmax(torch.as_tensor(rng.normal(size=(5, 4))), dim=1) for _ in range(2)]
    pooled = pool(log_probs, np.array([1.0, 0.0]))
    np.testing.assert_allclose(pooled.numpy(), log_probs[0].numpy(), atol=1e-12)


def test_an_explicit_cuda_request_without_cuda_is_a_clear_error_and_auto_takes_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="no usable CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("cuda:x")


def test_state_log_probs_sum_the_cells_of_each_state():
    from geoscout.heads.geocells import Geocells

    cells = Geocells(np.array([0, 0, 1]), np.array([[40.0, -100.0], [41.0, -101.0], [35.0, -90.0]]), 2)
    logits = np.log(np.array([[0.2, 0.3, 0.5]]))
    np.testing.assert_allclose(np.exp(state_log_probs(logits, cells).numpy()), [[0.5, 0.5]])
