"""StreetCLIP's loader: a transformers CLIPModel folder run through open_clip, checked against transformers."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any hub import: tests must never reach the network

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from geoscout.extract.backbones import load_backbone, preprocessing_record
from geoscout.extract.weights import WeightsError

transformers = pytest.importorskip("transformers")

LAYER1, LAYER2 = "vision_model.encoder.layers.1", "vision_model.encoder.layers.2"  # the tiny ViT has layers 0, 1


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
    assert not loaded.spec.architecture["quick_gelu"]
    _assert_matches_transformers(model, loaded)


def test_hf_clip_preprocessor_config_is_used_and_hashed(hf_clip, tmp_path):
    _, st_dir, _ = hf_clip
    folder = _copy_clip_folder(st_dir, tmp_path / "clip", load_file(str(st_dir / "model.safetensors")))
    preprocessor = {"image_mean": [0.5] * 3, "image_std": [0.25] * 3, "resample": 2}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    loaded = load_backbone("streetclip", weights=str(folder))
    record = preprocessing_record(loaded.spec)
    assert record["mean"] == [0.5] * 3 and record["std"] == [0.25] * 3
    assert record["steps"] == [{"resize": [32, 32], "interpolation": "bilinear"}]
    assert "preprocessor_config.json" in loaded.weights_identity["files"]


def test_hf_clip_preprocessing_matches_the_transformers_image_processor(hf_clip, tmp_path, synth_master):
    """Views preprocessed on the device equal CLIPImageProcessor's pixel_values (PIL resize, crop, normalise)."""
    _, st_dir, _ = hf_clip
    folder = _copy_clip_folder(st_dir, tmp_path / "clip", load_file(str(st_dir / "model.safetensors")))
    # transformers 5 defaults to a torchvision backend; the PIL one is what StreetCLIP was published with
    pil_processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    processor = pil_processor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=3,
        image_mean=[0.4, 0.45, 0.5], image_std=[0.2, 0.25, 0.3])
    processor.save_pretrained(folder)
    embedder = load_backbone("streetclip", weights=folder).embedder
    paths = sorted((synth_master / "train_images").glob("*.jpg"))[:6]
    pil = [Image.open(p).convert("RGB") for p in paths]
    views = torch.from_numpy(np.stack([np.asarray(im) for im in pil])).permute(0, 3, 1, 2)
    expected = processor(images=pil, return_tensors="pt")["pixel_values"]
    assert (embedder.preprocess(views) - expected).abs().max() <= 1e-5


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


