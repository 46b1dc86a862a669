"""Backbones by name: canonical names and store keys, the catalogue, weights and their safe loading, costs."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any hub import: tests must never reach the network

import json
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from geoscout.cli import _parse_weights, app
from geoscout.errors import ConfigError
from geoscout.extract.backbones import get_spec, load_backbone, preprocessing_record
from geoscout.extract.catalogue import ENTRIES, canonical_name
from geoscout.extract.describe import describe
from geoscout.extract.weights import WeightsError
from geoscout.store.layout import backbone_from_key, features_path, store_key

REAL = [e.name for e in ENTRIES if not e.random_init]
TINY = [e.name for e in ENTRIES if e.random_init]


# ------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("name, canonical", [
    ("tiny-clip", "tiny-clip-random"),
    ("tiny-clip-random", "tiny-clip-random"),
    ("random:tiny-clip", "tiny-clip-random"),  # random already
    (" streetclip ", "streetclip"),
    ("timm:vit_large_patch16_dinov3.lvd1689m", "dinov3-vitl16"),  # an entry's form is the entry
    ("TIMM:convnextv2_large.fcmae_ft_in22k_in1k_384", "convnextv2-large"),
    ("open_clip:ViT-SO400M-16-SigLIP2-256:WEBLI", "siglip2-so400m16-256"),  # open_clip tags are lower case
    ("open-clip:PE-Core-L-14-336:meta", "pe-core-l14-336"),
    ("timm:test_convnext", "timm:test_convnext"),
    ("open_clip:ViT-B-32:laion2b_s34b_b79k", "open_clip:ViT-B-32:laion2b_s34b_b79k"),
    ("open_clip:hf-hub:timm/ViT-SO400M-16-SigLIP2-256", "open_clip:hf-hub:timm/ViT-SO400M-16-SigLIP2-256"),
    ("random:timm:test_vit", "random:timm:test_vit"),
    ("random:dinov3-vitl16", "random:dinov3-vitl16"),
    ("random:timm:vit_large_patch16_dinov3.lvd1689m", "random:dinov3-vitl16"),
    ("open_clip:ViT-L-14-336-quickgelu", "open_clip:ViT-L-14-336-quickgelu"),  # not streetclip: other weights format
])
def test_every_spelling_has_one_canonical_name(name, canonical):
    assert canonical_name(name) == canonical
    assert get_spec(name).name == canonical
    assert canonical_name(canonical) == canonical


@pytest.mark.parametrize("name, message", [
    ("x", "unknown backbone 'x'; named entries: streetclip"),
    ("timm:", "unknown backbone"),
    ("keras:resnet50", "unknown backbone"),
    ("timm:a b", "characters other than"),
    ("", "empty backbone name"),
    ("open_clip:hf-hub:", "no hub repo"),
    ("open_clip:local-dir:/models/x", "pass the folder with --weights"),
])
def test_bad_names_are_refused_with_the_forms(name, message):
    with pytest.raises(ConfigError, match=message):
        canonical_name(name)


@pytest.mark.parametrize("name", ["timm:vit_large_patch16_dinov3.lvd1689m", "open_clip:hf-hub:org/repo.v2",
                                  "random:open_clip:ViT-B-32:openai", "tiny-clip-random"])
def test_store_keys_are_file_safe_and_reversible(name, tmp_path):
    key = store_key(name)
    assert ":" not in key and "/" not in key and backbone_from_key(key) == name
    path = features_path(tmp_path, "train", name)
    path.write_bytes(b"")  # a legal file name
    assert path.parent == tmp_path and path.name == f"train.{key}.h5"
    with pytest.raises(ValueError):
        store_key("a~b")


# ------------------------------------------------------------------------------------ catalogue


def test_the_timm_entries_licences_are_the_ones_timm_records():
    spdx = {"cc-by-nc-4.0": "CC-BY-NC-4.0", "dinov3-license": "DINOv3 License", "apache-2.0": "Apache-2.0"}
    for entry in ENTRIES:
        if entry.form.startswith("timm:") and not entry.random_init:
            licence = timm.get_pretrained_cfg(entry.form[len("timm:"):]).license
            assert spdx[licence] == entry.licence, entry.name


@pytest.mark.parametrize("name", REAL)
def test_real_entries_build_offline_but_refuse_to_run_without_weights(name):
    spec = get_spec(name)
    assert not spec.random_init and spec.default_weights
    with pytest.raises(WeightsError, match=rf"--weights {name}=PATH .*random:{name}"):
        load_backbone(name, weights=None)


@pytest.mark.parametrize("name", REAL)
def test_hub_id_offline_fails_at_once_with_local_path_hint(name):
    start = time.monotonic()
    with pytest.raises(WeightsError, match="pass --weights DIR"):
        load_backbone(name, weights=get_spec(name).default_weights)
    assert time.monotonic() - start < 5


def test_gflops_are_counted_attention_included():
    """StreetCLIP's ViT-L/14 at 336 px, counted by hand: patch embedding, 24 blocks of 577 tokens, projection."""
    tokens, width, blocks = 577, 1024, 24
    macs = 576 * 3 * 14 * 14 * width + blocks * (12 * tokens * width**2 + 2 * tokens**2 * width) + width * 768
    assert describe("streetclip").gflops == pytest.approx(2 * macs / 1e9, rel=2e-3)
    # the cost is the architecture's at the library's input size, whatever the weights
    named, random_ = describe("timm:test_convnext"), describe("random:timm:test_convnext")
    assert named.gflops == random_.gflops > 0 and named.input_size == (160, 160)


def test_backbones_command_lists_every_entry_with_licence_and_gflops():
    out = CliRunner().invoke(app, ["backbones"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    for entry in ENTRIES:
        row = next(line for line in lines if line.startswith(entry.name + " "))
        assert entry.licence in row
        gflops = float(row.split()[row.split().index(entry.licence.split()[0]) - 1])
        assert gflops == pytest.approx(describe(entry.name).gflops, abs=0.06)
    dino = next(line for line in lines if line.startswith("dinov3-vitl16 "))
    assert "256px" in dino and "features 1024" in dino and "164.7" in dino
    detail = CliRunner().invoke(app, ["backbones", "timm:test_vit", "--layers", "2"])
    assert detail.exit_code == 0 and "crop [160, 160]" in detail.output and "layers 128" in detail.output
    bad = CliRunner().invoke(app, ["backbones", "timm:no_such_model"])
    assert bad.exit_code == 1 and "timm has no model 'no_such_model'" in bad.output


# ------------------------------------------------------------------------------------ weights


@pytest.fixture(scope="module")
def convnext_reference() -> torch.nn.Module:
    torch.manual_seed(123)
    return timm.create_model("test_convnext", pretrained=False, num_classes=10).eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_checkpoint_file_matches_in_memory_model(tmp_path, suffix, convnext_reference):
    path = tmp_path / f"convnext{suffix}"
    state = convnext_reference.state_dict()  # classifier included: the loader drops it
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    loaded = load_backbone("timm:test_convnext", weights=path)
    assert set(loaded.weights_identity["files"]) == {path.name}
    assert loaded.output_dims == {"features": convnext_reference.num_features}
    pixels = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = convnext_reference.forward_head(convnext_reference.forward_features(pixels), pre_logits=True)
    assert torch.equal(loaded.embedder.embed_pixels(pixels)["features"], expected)


def test_timm_checkpoint_with_missing_key_is_refused(tmp_path, convnext_reference):
    state = dict(convnext_reference.state_dict())
    state.pop("stem.0.weight")
    save_file(state, str(tmp_path / "c.safetensors"))
    with pytest.raises(WeightsError, match="missing keys: stem.0.weight"):
        load_backbone("timm:test_convnext", weights=tmp_path / "c.safetensors")
    other = timm.create_model("test_vit", num_classes=0).state_dict()
    save_file(other, str(tmp_path / "vit.safetensors"))
    with pytest.raises(WeightsError, match="does not match the backbone"):
        load_backbone("timm:test_convnext", weights=tmp_path / "vit.safetensors")


def test_nonexistent_local_path_is_named(tmp_path):
    with pytest.raises(WeightsError, match="no such file or folder"):
        load_backbone("convnextv2-large", weights=tmp_path / "nope.safetensors")


class _TouchOnUnpickle:
    """Unpickling this with full pickle would create a file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["timm:test_convnext", "open_clip:ViT-B-32"])
def test_pickled_objects_are_refused(tmp_path, name):
    marker = tmp_path / "code_ran"
    torch.save(_TouchOnUnpickle(marker), tmp_path / "bomb.pth")
    with pytest.raises(WeightsError, match="refusing to load"):
        load_backbone(name, weights=tmp_path / "bomb.pth")
    assert not marker.exists()


def test_random_weights_only_on_request(tmp_path):
    with pytest.raises(WeightsError, match="randomly initialised by design and takes no weights"):
        load_backbone("tiny-clip-random", weights=tmp_path)
    with pytest.raises(WeightsError, match="random:timm:test_vit"):
        load_backbone("timm:test_vit", weights=None)
    loaded = load_backbone("random:timm:test_vit", weights=None)
    assert loaded.weights_identity == {"random_init": True, "seed": 0} and loaded.spec.random_init


def test_bare_weights_path_needs_exactly_one_backbone():
    assert _parse_weights(["/m/file.safetensors"], ["timm:test_convnext"]) == {"timm:test_convnext": "/m/file.safetensors"}
    assert _parse_weights(["timm:test_convnext=/m/a=b.pth"], ["timm:test_convnext", "tiny-clip"]) == {
        "timm:test_convnext": "/m/a=b.pth"}
    assert _parse_weights(["/m/a=b.pth"], ["streetclip"]) == {"streetclip": "/m/a=b.pth"}  # '=' inside a path
    with pytest.raises(Exception, match="exactly one backbone"):
        _parse_weights(["/m/file.safetensors"], ["tiny-clip", "streetclip"])


# ------------------------------------------------------------------------------------ embedder


@pytest.mark.parametrize("name", TINY)
def test_tiny_backbones_are_deterministic_and_shaped(name):
    images = torch.randint(0, 256, (5, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(999)  # the caller's RNG state must not change the backbone
    first = load_backbone(name, weights=None)
    second = load_backbone(name, weights=None)
    assert first.weights_identity == {"random_init": True, "seed": 0}
    a, b = first.embedder(images), second.embedder(images)
    assert set(a) == set(first.output_dims)
    for key, width in first.output_dims.items():
        assert a[key].shape == (5, width) and a[key].dtype == torch.float32 and torch.isfinite(a[key]).all()
        assert torch.equal(a[key], b[key])
    json.dumps(first.weights_identity)
    json.dumps(preprocessing_record(first.spec))


def test_tiny_clip_is_its_open_clip_form_with_smaller_sizes():
    """tiny-clip is open_clip's own tower for ViT-B-32-quickgelu with the entry's overrides, seeded."""
    import open_clip

    from geoscout.extract.catalogue import ENTRY_BY_NAME

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None, **ENTRY_BY_NAME["tiny-clip-random"].model_kwargs)
    embedder = load_backbone("tiny-clip", None).embedder
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model.encode_image(pixels)
    assert torch.allclose(embedder.embed_pixels(pixels)["projected"], expected, atol=1e-5)


def test_embedder_rejects_non_uint8_images():
    embedder = load_backbone("tiny-convnext", weights=None).embedder
    with pytest.raises(ValueError, match="expected uint8 images"):
        embedder(torch.zeros(1, 3, 64, 64))


def test_layers_beyond_the_model_depth_are_refused():
    with pytest.raises(ConfigError, match="--layers 3 does not fit tiny-clip-random"):
        load_backbone("tiny-clip", None, layers=3)  # two blocks
    with pytest.raises(ConfigError, match="--layers 5 does not fit"):
        load_backbone("random:timm:test_convnext", None, layers=5)  # four stages
