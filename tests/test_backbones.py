"""Backbone registry, weight loading (HF CLIP -> open_clip, timm files) and the Embedder interface."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any hub import: tests must never reach the network

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from geoscout.extract.backbones import (
    BACKBONES,
    get_spec,
    load_backbone,
    preprocessing_record,
)
from geoscout.extract.weights import WeightsError

transformers = pytest.importorskip("transformers")

LAYER1, LAYER2 = "vision_model.encoder.layers.1", "vision_model.encoder.layers.2"  # the tiny ViT has layers 0, 1
TINY_SPECS = [name for name, spec in BACKBONES.items() if spec.random_init]


def _tiny_hf_clip(hidden_act: str = "quick_gelu") -> "transformers.CLIPModel":
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        vision_config=dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            patch_size=8, image_size=32, hidden_act=hidden_act,
        ),
        text_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        projection_dim=16,
    )
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # non-trivial layernorm weights so the conversion of every tensor matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory) -> tuple["transformers.CLIPModel", Path, Path]:
    """The tiny CLIPModel, saved once as safetensors and once as pytorch_model.bin."""
    model = _tiny_hf_clip()
    st_dir = tmp_path_factory.mktemp("clip_safetensors")
    model.save_pretrained(st_dir)
    assert (st_dir / "model.safetensors").is_file()
    bin_dir = tmp_path_factory.mktemp("clip_bin")
    (bin_dir / "config.json").write_text((st_dir / "config.json").read_text())
    # recent transformers only writes safetensors; a .bin is what older exports (and StreetCLIP) ship
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    return model, st_dir, bin_dir


def _copy_clip_folder(src: Path, dst: Path, state: dict) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(state, str(dst / "model.safetensors"))
    return dst


def _assert_matches_transformers(model: "transformers.CLIPModel", loaded) -> None:
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = loaded.embedder.embed_pixels(pixels)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        image_features = model.get_image_features(pixel_values=pixels)
    # transformers 5 returns a model output here, 4.x a tensor
    projected = image_features if isinstance(image_features, torch.Tensor) else image_features.pooler_output
    assert out["features"].dtype == torch.float32 and out["features"].shape == (3, 64)
    assert (out["features"] - pooled).abs().max() <= 1e-4
    assert (out["projected"] - projected).abs().max() <= 1e-4


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_hf_clip_parity(hf_clip, layout):
    model, st_dir, bin_dir = hf_clip
    folder = st_dir if layout == "safetensors" else bin_dir
    loaded = load_backbone("streetclip", weights=folder)
    assert loaded.spec.embed_dim == 64 and loaded.spec.projected_dim == 16 and loaded.spec.input_size == 32
    weight_file = "model.safetensors" if layout == "safetensors" else "pytorch_model.bin"
    assert set(loaded.weights_identity["files"]) == {weight_file, "config.json"}
    _assert_matches_transformers(model, loaded)


def test_hf_clip_parity_with_plain_gelu(tmp_path):
    model = _tiny_hf_clip(hidden_act="gelu")
    model.save_pretrained(tmp_path)
    loaded = load_backbone("streetclip", weights=tmp_path)
    assert not loaded.spec.architecture.quick_gelu
    _assert_matches_transformers(model, loaded)


def test_hf_clip_preprocessor_config_is_used_and_hashed(hf_clip, tmp_path):
    _, st_dir, _ = hf_clip
    folder = _copy_clip_folder(st_dir, tmp_path / "clip", load_file(str(st_dir / "model.safetensors")))
    preprocessor = {"image_mean": [0.5] * 3, "image_std": [0.25] * 3, "resample": 2}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    loaded = load_backbone("streetclip", weights=str(folder))
    record = preprocessing_record(loaded.spec)
    assert record["mean"] == [0.5] * 3 and record["std"] == [0.25] * 3 and record["interpolation"] == "bilinear"
    assert "preprocessor_config.json" in loaded.weights_identity["files"]


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda s: s.pop(f"{LAYER1}.self_attn.k_proj.bias"), f"missing keys: {LAYER1}.self_attn.k_proj.bias"),
        (lambda s: s.pop("visual_projection.weight"), "missing keys: visual_projection.weight"),
        (lambda s: s.update({f"{LAYER2}.mlp.fc1.bias": torch.zeros(128)}), f"unexpected keys: {LAYER2}.mlp.fc1.bias"),
    ],
)
def test_hf_clip_key_mismatch_is_refused(hf_clip, tmp_path, edit, named):
    _, st_dir, _ = hf_clip
    state = load_file(str(st_dir / "model.safetensors"))
    edit(state)
    folder = _copy_clip_folder(st_dir, tmp_path / "clip", state)
    with pytest.raises(WeightsError, match=named):
        load_backbone("streetclip", weights=folder)


def test_hf_clip_wrong_shape_is_refused(hf_clip, tmp_path):
    _, st_dir, _ = hf_clip
    state = load_file(str(st_dir / "model.safetensors"))
    state["vision_model.post_layernorm.weight"] = torch.ones(65)
    folder = _copy_clip_folder(st_dir, tmp_path / "clip", state)
    with pytest.raises(WeightsError, match="ln_post"):
        load_backbone("streetclip", weights=folder)


def _tiny_convnext_spec():
    """The real ConvNeXt V2 spec (weights required, file loading) with the tiny architecture swapped in."""
    tiny = get_spec("tiny-convnext-random")
    return replace(
        get_spec("convnextv2-large"),
        architecture=tiny.architecture,
        arch_kwargs=tiny.arch_kwargs,
        input_size=tiny.input_size,
        embed_dim=tiny.embed_dim,
    )


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_checkpoint_file_matches_in_memory_model(tmp_path, suffix):
    spec = _tiny_convnext_spec()
    torch.manual_seed(123)
    reference = timm.create_model(spec.architecture, pretrained=False, num_classes=10, **dict(spec.arch_kwargs)).eval()
    path = tmp_path / f"convnext{suffix}"
    state = reference.state_dict()  # classifier included: the loader drops it
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    loaded = load_backbone(spec, weights=path)
    assert set(loaded.weights_identity["files"]) == {path.name}
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(pixels), pre_logits=True)
    assert torch.equal(loaded.embedder.embed_pixels(pixels)["features"], expected)


def test_timm_checkpoint_with_missing_key_is_refused(tmp_path):
    spec = _tiny_convnext_spec()
    state = timm.create_model(spec.architecture, num_classes=0, **dict(spec.arch_kwargs)).state_dict()
    state.pop("stem.0.weight")
    save_file(state, str(tmp_path / "c.safetensors"))
    with pytest.raises(WeightsError, match="missing keys: stem.0.weight"):
        load_backbone(spec, weights=tmp_path / "c.safetensors")


@pytest.mark.parametrize("name", ["streetclip", "convnextv2-large"])
def test_real_backbone_without_weights_is_refused(name):
    with pytest.raises(WeightsError, match="--weights"):
        load_backbone(name, weights=None)


@pytest.mark.parametrize("name", ["streetclip", "convnextv2-large"])
def test_hub_id_offline_fails_at_once_with_local_path_hint(name):
    start = time.monotonic()
    with pytest.raises(WeightsError, match="pass --weights DIR"):
        load_backbone(name, weights=get_spec(name).default_weights)
    assert time.monotonic() - start < 2


def test_nonexistent_local_path_is_named(tmp_path):
    with pytest.raises(WeightsError, match="no such file or folder"):
        load_backbone("convnextv2-large", weights=tmp_path / "nope.safetensors")


class _TouchOnUnpickle:
    """Unpickling this with full pickle would create a file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_objects_are_refused(hf_clip, tmp_path):
    _, st_dir, _ = hf_clip
    marker = tmp_path / "code_ran"
    folder = tmp_path / "bomb"
    folder.mkdir()
    (folder / "config.json").write_text((st_dir / "config.json").read_text())
    torch.save({"vision_model.post_layernorm.weight": _TouchOnUnpickle(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="refusing to load"):
        load_backbone("streetclip", weights=folder)
    torch.save(_TouchOnUnpickle(marker), tmp_path / "bomb.pth")
    with pytest.raises(WeightsError, match="refusing to load"):
        load_backbone(_tiny_convnext_spec(), weights=tmp_path / "bomb.pth")
    assert not marker.exists()


def test_get_spec_lists_choices_and_resolves_aliases():
    assert get_spec("tiny-clip") is get_spec("tiny-clip-random")
    with pytest.raises(ValueError, match="unknown backbone 'x'; available: streetclip, convnextv2-large"):
        get_spec("x")


def test_real_specs_match_their_published_preprocessing():
    clip = get_spec("streetclip")
    assert (clip.input_size, clip.embed_dim, clip.projected_dim, clip.interpolation) == (336, 1024, 768, "bicubic")
    assert clip.architecture.quick_gelu and clip.architecture.layers == 24
    convnext = get_spec("convnextv2-large")
    assert (convnext.input_size, convnext.embed_dim, convnext.interpolation) == (384, 1536, "bicubic")
    assert convnext.mean == pytest.approx((0.485, 0.456, 0.406))


def test_random_backbone_takes_no_weights(tmp_path):
    with pytest.raises(WeightsError, match="takes no weights"):
        load_backbone("tiny-clip-random", weights=tmp_path)


@pytest.mark.parametrize("name", TINY_SPECS)
def test_tiny_backbones_are_deterministic_and_shaped(name):
    spec = get_spec(name)
    images = torch.randint(0, 256, (5, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(999)  # the caller's RNG state must not change the backbone
    first = load_backbone(name, weights=None)
    second = load_backbone(name, weights=None)
    assert first.weights_identity == {"random_init": True, "seed": spec.seed}
    a, b = first.embedder(images), second.embedder(images)
    assert a["features"].shape == (5, spec.embed_dim) and a["features"].dtype == torch.float32
    assert torch.isfinite(a["features"]).all()
    assert set(a) == ({"features", "projected"} if spec.projected_dim else {"features"})
    if spec.projected_dim:
        assert a["projected"].shape == (5, spec.projected_dim)
    for key in a:
        assert torch.equal(a[key], b[key])
    json.dumps(first.weights_identity)
    json.dumps(preprocessing_record(first.spec))


def test_embedder_rejects_non_uint8_images():
    embedder = load_backbone("tiny-convnext", weights=None).embedder
    with pytest.raises(ValueError, match="expected uint8 images"):
        embedder(torch.zeros(1, 3, 64, 64))


@pytest.mark.parametrize("name", TINY_SPECS)
def test_tiny_backbones_are_fast_on_cpu(name):
    """>= 300 views/s on ONE core (so on 2 as well), in process CPU time: other jobs on the box don't count."""
    embedder = load_backbone(name, weights=None).embedder
    images = torch.randint(0, 256, (64, 3, 256, 256), dtype=torch.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        embedder(images[:8])  # warm-up
        cpu_seconds = []
        for _ in range(3):
            start = time.process_time()
            embedder(images)
            cpu_seconds.append(time.process_time() - start)
    finally:
        torch.set_num_threads(threads)
    assert 64 / min(cpu_seconds) >= 300
