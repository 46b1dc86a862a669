"""The end-to-end head functions on planted features: accuracy, checkpoints, refusals, determinism."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from geoscout.device import resolve_device
from geoscout.errors import ConfigError
from geoscout.heads import (
    ClassifierConfig,
    FusionConfig,
    RegressorConfig,
    TrainConfig,
    evaluate,
    fit_ensemble,
    predict,
    train_classifier,
    train_regressor,
)
from geoscout.heads.checkpoint import CARD_FILE, WEIGHTS_FILE, CheckpointError, load_classifier, save_head
from geoscout.heads.classifier import classifier_outputs
from geoscout.metric import METRIC_KEYS
from geoscout.store.split import make_validation_split
from geoscout.testing import make_planted_features

BACKBONES = ("tiny-clip", "tiny-convnext")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from a second thread, and OpenMP's spinning barriers slow them tenfold
    # when the machine is busy with other work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_classifier(epochs: int = 25) -> ClassifierConfig:
    return ClassifierConfig(
        fusion=FusionConfig(width=32, depth=1, heads=2, ffn_dim=64), hidden=64, dropout=0.1,
        train=TrainConfig(epochs=epochs, batch_size=64, lr=3e-3, patience=8),
    )


def small_regressor() -> RegressorConfig:
    return RegressorConfig(hidden=64, blocks=2, train=TrainConfig(epochs=40, batch_size=64, lr=2e-3, patience=10))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    train = make_planted_features(n=600)
    val_mask = make_validation_split(train.class_id, 0.25, 0)
    classifiers = {
        b: train_classifier(train, backbone=b, val_mask=val_mask, out_dir=root / b, config=small_classifier(), progress=False)
        for b in BACKBONES
    }
    dirs = {b: root / b for b in BACKBONES}
    regressor = train_regressor(
        train, classifier_dir=dirs["tiny-clip"], val_mask=val_mask, out_dir=root / "regressor", config=small_regressor(),
        progress=False,
    )
    ensemble = fit_ensemble(train, classifier_dirs=dirs, val_mask=val_mask, out_dir=root / "ensemble", regressor_dir=root / "regressor")
    evaluation = evaluate(
        train, val_mask=val_mask, classifier_dirs=dirs, regressor_dir=root / "regressor", ensemble_dir=root / "ensemble",
        print_table=False,
    )
    return dict(root=root, train=train, val_mask=val_mask, classifiers=classifiers, dirs=dirs, regressor=regressor,
                ensemble=ensemble, evaluation=evaluation)


def test_classifiers_find_the_planted_classes(run):
    for backbone in BACKBONES:
        assert run["classifiers"][backbone].metrics["top1_accuracy"] >= 0.95, backbone


def test_regressor_beats_the_predicted_class_centroid(run):
    result = run["regressor"]
    assert result.relative_gain >= 0.30
    assert result.regressor_mean_km < result.centroid_mean_km
    assert result.relative_gain == pytest.approx(1 - result.regressor_mean_km / result.centroid_mean_km)


def test_ensemble_is_at_least_the_better_single_model(run):
    metrics = run["evaluation"].metrics
    singles = [m["score"] for name, m in metrics.items() if name not in ("baseline", "ensemble")]
    assert metrics["ensemble"]["score"] >= max(singles)
    assert metrics["ensemble"]["score"] == pytest.approx(run["ensemble"].metrics["score"])
    curve = run["ensemble"].curve
    assert [row["alpha"] for row in curve] == pytest.approx(np.linspace(0, 1, 21))
    assert run["ensemble"].alpha in [row["alpha"] for row in curve]
    stored = json.loads((run["root"] / "ensemble" / "ensemble.json").read_text())
    assert len(stored["alpha_curve"]) == 21 and stored["alpha"] == run["ensemble"].alpha
    assert run["ensemble"].members == list(BACKBONES)  # alpha weighs the CLIP model


def test_evaluation_reports_every_metric_and_beats_the_baseline(run):
    metrics = run["evaluation"].metrics
    assert list(metrics) == ["baseline", *BACKBONES, "tiny-clip+regressor", "ensemble"]
    assert all(tuple(m) == METRIC_KEYS for m in metrics.values())
    assert all(m["score"] > metrics["baseline"]["score"] for name, m in metrics.items() if name != "baseline")
    assert "mean_km" in run["evaluation"].table()


def test_checkpoints_round_trip_to_the_same_predictions(run):
    """Reloaded heads reproduce the validation metrics measured on the in-memory heads during training."""
    metrics = run["evaluation"].metrics
    for backbone in BACKBONES:
        assert metrics[backbone] == pytest.approx(run["classifiers"][backbone].metrics)
    assert metrics["tiny-clip+regressor"] == pytest.approx(run["regressor"].metrics)

    module, card = load_classifier(run["dirs"]["tiny-clip"])
    train = run["train"]
    feats, masks = train.features["tiny-clip"], train.masks["tiny-clip"]
    before = classifier_outputs(module, feats, masks, batch_size=256, device=torch.device("cpu"))
    save_head(run["root"] / "copy", module, card)
    again, _ = load_classifier(run["root"] / "copy")
    after = classifier_outputs(again, feats, masks, batch_size=256, device=torch.device("cpu"))
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_predict_on_an_unlabelled_split(run):
    test = make_planted_features(n=50, seed=9, labelled=False, split="test")
    top5, lat, lon = predict(test, ensemble_dir=run["root"] / "ensemble", gallery=run["train"])  # the default retrieves
    assert top5.shape == (50, 5) and lat.shape == lon.shape == (50,)
    assert ((top5 >= 0) & (top5 < len(test.classes))).all()
    assert np.isfinite(lat).all() and np.isfinite(lon).all()
    single = predict(test, classifier_dir=run["dirs"]["tiny-clip"], regressor_dir=run["root"] / "regressor")
    assert single.top5.shape == (50, 5)
    with pytest.raises(ValueError, match="either"):
        predict(test, ensemble_dir=run["root"] / "ensemble", classifier_dir=run["dirs"]["tiny-clip"])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(dataset_fingerprint="someone-elses-data"), "someone-elses-data"),
        (dict(backbone_fingerprints={"tiny-clip": "other-weights", "tiny-convnext": "x"}), "other-weights"),
        (dict(classes=np.arange(6, dtype=np.int64)), "classes"),
    ],
)
def test_heads_refuse_foreign_features(run, change, message):
    foreign = dataclasses.replace(make_planted_features(n=40, seed=5), **change)
    with pytest.raises(CheckpointError, match=message) as error:
        predict(foreign, classifier_dir=run["dirs"]["tiny-clip"])
    if "fingerprint" in next(iter(change)):
        assert "planted" in str(error.value)  # both fingerprints are named


def test_a_head_refuses_another_backbone(run):
    features = make_planted_features(n=40, seed=5)
    only_convnext = dataclasses.replace(
        features, features={"tiny-convnext": features.features["tiny-convnext"]},
        masks={"tiny-convnext": features.masks["tiny-convnext"]},
    )
    with pytest.raises(CheckpointError, match="backbone 'tiny-clip'"):
        predict(only_convnext, classifier_dir=run["dirs"]["tiny-clip"])
    with pytest.raises(CheckpointError, match="tiny-convnext"):
        fit_ensemble(run["train"], classifier_dirs={"tiny-clip": run["dirs"]["tiny-convnext"], "tiny-convnext": run["dirs"]["tiny-clip"]},
                     val_mask=run["val_mask"], out_dir=run["root"] / "bad-ensemble")


def test_a_config_that_does_not_fit_the_weights_is_a_clear_error(run, tmp_path):
    head = tmp_path / "head"
    head.mkdir()
    source = run["dirs"]["tiny-clip"]
    (head / WEIGHTS_FILE).write_bytes((source / WEIGHTS_FILE).read_bytes())
    card = json.loads((source / CARD_FILE).read_text())
    card["config"]["hidden"] = 48
    (head / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_classifier(head)


def test_heads_validated_on_other_rows_are_not_mixed(run, tmp_path):
    other_mask = make_validation_split(run["train"].class_id, 0.25, 1)
    with pytest.raises(CheckpointError, match="other rows"):
        train_regressor(run["train"], classifier_dir=run["dirs"]["tiny-clip"], val_mask=other_mask, out_dir=tmp_path / "r",
                        config=small_regressor(), progress=False)


def test_same_seed_gives_bitwise_identical_weights(tmp_path):
    train = make_planted_features(n=200, seed=3)
    val_mask = make_validation_split(train.class_id, 0.25, 0)
    weights = []
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        train_classifier(train, backbone="tiny-clip", val_mask=val_mask, out_dir=tmp_path / name,
                         config=small_classifier(epochs=3), seed=seed, progress=False)
        weights.append(load_file(str(tmp_path / name / WEIGHTS_FILE)))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_seed_preset_trains_end_to_end(tmp_path):
    train = make_planted_features(n=300, seed=4)
    val_mask = make_validation_split(train.class_id, 0.25, 0)
    result = train_classifier(train, backbone="tiny-convnext", val_mask=val_mask, out_dir=tmp_path / "seed",
                              preset="seed", progress=False)
    assert result.metrics["top1_accuracy"] >= 0.8
    assert json.loads((tmp_path / "seed" / CARD_FILE).read_text())["config"]["label_smoothing"] == 0.1


def test_an_explicit_cuda_request_without_cuda_is_a_clear_error_and_auto_takes_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="no usable CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("cuda:x")
