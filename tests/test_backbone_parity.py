"""Stored features equal each library's own pipeline; --layers; three or more backbones through extract and knn.

References are computed the libraries' way on PIL images of the same JPEGs: timm
`create_transform(**resolve_model_data_config(m), is_training=False)` then
`forward_head(forward_features(x), pre_logits=True)`; open_clip `create_model_and_transforms` then
`encode_image`. The store went through the real `extract` (DataLoader decode, device preprocessing,
fp16 shards).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from geoscout.data import load_competition
from geoscout.extract.runner import StoreConflict, extract
from geoscout.knn import run_knn
from geoscout.store.layout import features_path
from geoscout.store.reader import StoreError, read_split

TIMM_MODELS = ("test_vit", "test_convnext", "test_efficientnet")  # crop_pct 0.95: resize 168, centre crop 160
OPEN_CLIP_TINY = "open_clip:hf-hub:geoscout-tests/tiny-vit"  # its config comes from the --weights folder
ROWS = 6  # locations compared with the reference (24 views)
LAYERS = 4


def _timm_reference(name: str, folder: Path) -> tuple[torch.nn.Module, Path]:
    import timm

    torch.manual_seed(sum(map(ord, name)))
    model = timm.create_model(name, pretrained=False).eval()  # with its classifier: the loader drops it
    path = folder / f"{name}.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def _open_clip_reference(folder: Path) -> torch.nn.Module:
    """A tiny open_clip ViT saved the way open_clip hub repos are: open_clip_config.json + open_clip_model.safetensors."""
    import open_clip

    model_cfg = open_clip.get_model_config("ViT-B-32")
    model_cfg.update(
        embed_dim=24,
        vision_cfg={"image_size": 48, "patch_size": 8, "width": 48, "layers": 4, "head_width": 16},
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    )
    folder.mkdir()
    preprocess = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear", "resize_mode": "squash"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}))
    torch.manual_seed(7)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)  # builds from that config
    with torch.no_grad():  # non-trivial layer norms, so every tensor of the conversion matters
        for name, p in model.visual.named_parameters():
            if "ln" in name:
                p.add_(torch.randn_like(p) * 0.2)
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    return model


def _pil_views(data: Path, rows: int) -> list[Image.Image]:
    table = load_competition(data).train
    return [Image.open(table.images_dir / name).convert("RGB") for r in range(rows) for name in table.image_names[r]]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def parity(synth_master, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    refs, weights = {}, {}
    for name in TIMM_MODELS:
        refs[f"timm:{name}"], weights[f"timm:{name}"] = _timm_reference(name, root)
    refs[OPEN_CLIP_TINY] = _open_clip_reference(root / "tiny-vit")
    weights[OPEN_CLIP_TINY] = str(root / "tiny-vit")
    store = root / "store"
    result = extract(synth_master, store, backbones=list(refs), weights=weights, splits=("train",), device="cpu",
                     workers=0, batch_size=32, layers=LAYERS, progress=False)
    assert len(result.written) == len(refs)
    return refs, weights, store, _pil_views(synth_master, ROWS)


def _stored(store: Path, name: str, dataset: str) -> np.ndarray:
    with h5py.File(features_path(store, "train", name), "r") as f:
        return f[dataset][:ROWS].reshape(ROWS * 4, -1)


@pytest.mark.parametrize("model", TIMM_MODELS)
def test_timm_features_match_timms_own_pipeline(parity, model):
    from timm.data import create_transform, resolve_model_data_config

    refs, _, store, views = parity
    ref = refs[f"timm:{model}"]
    config = resolve_model_data_config(ref)
    assert config["crop_pct"] < 1  # resize then centre crop
    transform = create_transform(**config, is_training=False)
    with torch.no_grad():
        x = torch.stack([transform(v) for v in views])
        expected = ref.forward_head(ref.forward_features(x), pre_logits=True).numpy()
    stored = _stored(store, f"timm:{model}", "features")
    assert stored.shape == expected.shape
    assert _cosine(stored, expected).min() >= 0.999


def test_open_clip_features_match_open_clips_own_pipeline(parity):
    import open_clip

    refs, weights, store, views = parity
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{weights[OPEN_CLIP_TINY]}")
    model.eval()
    with torch.no_grad():
        expected = model.encode_image(torch.stack([preprocess(v) for v in views])).numpy()
    projected = _stored(store, OPEN_CLIP_TINY, "projected")
    assert _cosine(projected, expected).min() >= 0.999
    # "features" is the pooled embedding before the projection open_clip applies
    pooled = _stored(store, OPEN_CLIP_TINY, "features").astype(np.float32)
    assert _cosine(pooled @ model.visual.proj.detach().numpy(), expected).min() >= 0.999


def _timm_layers(ref, views) -> tuple[np.ndarray, np.ndarray]:
    from timm.data import create_transform, resolve_model_data_config

    transform = create_transform(**resolve_model_data_config(ref), is_training=False)
    x = torch.stack([transform(v) for v in views])
    with torch.no_grad():
        if hasattr(ref, "cls_token"):  # ViT: class token of each of the last blocks, final norm applied
            _, inter = ref.forward_intermediates(x, indices=LAYERS, norm=True, output_fmt="NLC", return_prefix_tokens=True)
            return torch.cat([p[:, 0] for _, p in inter], -1).numpy(), inter[-1][0].mean(1).numpy()
        final, inter = ref.forward_intermediates(x, indices=LAYERS)  # CNN: each stage, pooled
        return torch.cat([t.mean((2, 3)) for t in inter], -1).numpy(), final.mean((2, 3)).numpy()


@pytest.mark.parametrize("model", ["test_vit", "test_convnext"])
def test_layers_are_the_last_blocks_class_tokens_and_the_patch_mean(parity, model):
    refs, _, store, views = parity
    ref = refs[f"timm:{model}"]
    layers, patch_mean = _timm_layers(ref, views)
    width = ref.embed_dim if model == "test_vit" else sum(i["num_chs"] for i in ref.feature_info[-LAYERS:])
    assert layers.shape[-1] == (LAYERS * width if model == "test_vit" else width)
    for dataset, expected in (("layers", layers), ("patch_mean", patch_mean)):
        stored = _stored(store, f"timm:{model}", dataset)
        assert stored.shape == expected.shape and _cosine(stored, expected).min() >= 0.999, dataset


def test_open_clip_layers_are_its_own_intermediates(parity):
    import open_clip

    _, weights, store, views = parity
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{weights[OPEN_CLIP_TINY]}")
    with torch.no_grad():
        out = model.visual.eval().forward_intermediates(
            torch.stack([preprocess(v) for v in views]), indices=LAYERS, normalize_intermediates=True,
            output_fmt="NLC", output_extra_tokens=True)
    expected = torch.cat([p[:, 0] for p in out["image_intermediates_prefix"]], -1).numpy()
    assert _cosine(_stored(store, OPEN_CLIP_TINY, "layers"), expected).min() >= 0.999


def test_read_split_concatenates_the_chosen_datasets(parity):
    _, _, store, _ = parity
    name = "timm:test_vit"
    chosen = ("features", "layers", "patch_mean")
    split = read_split(store, "train", [name], datasets=chosen)
    with h5py.File(features_path(store, "train", name), "r") as f:
        expected = np.concatenate([f[d][()] for d in chosen], axis=-1)
    assert split.features[name].dtype == np.float16 and split.datasets == chosen
    np.testing.assert_array_equal(split.features[name], expected)
    assert split.subset(np.arange(3)).datasets == chosen
    plain = read_split(store, "train", [name])
    np.testing.assert_array_equal(plain.features[name], expected[..., :64])
    with pytest.raises(StoreError, match="no 'nope' dataset"):
        read_split(store, "train", [name], datasets=("features", "nope"))
    with pytest.raises(StoreError, match="not per-view vectors"):
        read_split(store, "train", [name], datasets=("mask",))


def test_a_store_of_another_layer_count_is_not_reused(parity, synth_master, tmp_path):
    _, weights, store, _ = parity
    name = "timm:test_convnext"
    store = Path(shutil.copytree(store, tmp_path / "store"))
    again = extract(synth_master, store, backbones=[name], weights={name: weights[name]}, splits=("train",),
                    device="cpu", workers=0, layers=LAYERS, progress=False)
    assert again.written == [] and again.skipped == [f"train.{name}"]
    with pytest.raises(StoreConflict, match="--layers"):
        extract(synth_master, store, backbones=[name], weights={name: weights[name]}, splits=("train",),
                device="cpu", workers=0, layers=2, progress=False)
    extract(synth_master, store, backbones=[name], weights={name: weights[name]}, splits=("train",),
            device="cpu", workers=0, layers=0, overwrite=True, progress=False)
    plain = read_split(store, "train", [name])
    layered = read_split(tmp_path.parent / tmp_path.name / "store", "train", [name])
    np.testing.assert_allclose(plain.features[name].astype(np.float32), layered.features[name].astype(np.float32),
                               atol=1e-3)
    with pytest.raises(StoreError, match="extract with --layers K"):
        read_split(store, "train", [name], datasets=("features", "layers"))


def test_three_backbones_through_extract_and_knn(synth_master, tmp_path):
    """tiny-clip, tiny-convnext and timm:test_convnext from a safetensors file, found again under any spelling."""
    import timm

    torch.manual_seed(0)
    path = tmp_path / "test_convnext.safetensors"
    save_file(timm.create_model("test_convnext", pretrained=False).state_dict(), str(path))
    store = tmp_path / "store"
    result = extract(synth_master, store, backbones=["tiny-clip", "tiny-convnext", "timm:test_convnext"],
                     weights={"timm:test_convnext": str(path)}, device="cpu", workers=0, progress=False)
    assert sorted(result.written) == sorted(f"{s}.{b}" for s in ("train", "test")
                                            for b in ("tiny-clip-random", "tiny-convnext-random", "timm:test_convnext"))
    assert (store / "train.timm~test_convnext.h5").exists()
    with h5py.File(store / "train.timm~test_convnext.h5", "r") as f:
        identity = json.loads(f.attrs["weights_identity"])
        assert f.attrs["backbone"] == "timm:test_convnext"
    assert identity["files"] == {path.name: __import__("hashlib").sha256(path.read_bytes()).hexdigest()}
    for spelling in ("tiny-clip", "tiny-clip-random", "tiny-convnext", "timm:test_convnext", "TIMM:test_convnext"):
        report = run_knn(store, backbone=spelling, k=3, use_gpu=False)
        assert report.n_train == 40 and report.n_test == 12
    train = read_split(store, "train", ["tiny-clip-random", "tiny-convnext-random", "timm:test_convnext"])
    assert {k: v.shape[-1] for k, v in train.features.items()} == {
        "tiny-clip-random": 64, "tiny-convnext-random": 128, "timm:test_convnext": 64}


def test_cli_extract_takes_layers_and_a_bare_weights_path(parity, synth_master, tmp_path):
    from typer.testing import CliRunner

    from geoscout.cli import app

    _, weights, _, _ = parity
    store = tmp_path / "store"
    out = CliRunner().invoke(app, ["extract", str(synth_master), str(store), "-b", "timm:test_convnext",
                                   "--weights", str(weights["timm:test_convnext"]), "--layers", "2",
                                   "--split", "train", "--device", "cpu", "--workers", "0"])
    assert out.exit_code == 0, out.output
    assert "wrote train.timm:test_convnext" in out.output
    with h5py.File(features_path(store, "train", "timm:test_convnext"), "r") as f:
        assert json.loads(f.attrs["backbone_spec"])["layers"] == 2
        assert f["layers"].shape == (40, 4, 48 + 64)  # the last two stages of test_convnext, pooled
