"""Preprocessing on the device equals the library's own PIL eval pipeline, pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from geoscout.errors import ConfigError
from geoscout.extract.preprocess import Crop, DevicePreprocess, Resize, plan_from_transform

PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS,
               "box": Image.BOX, "hamming": Image.HAMMING, "nearest": Image.NEAREST}
# square up and down, odd sizes, and shapes where Pillow runs the vertical pass first
SIZES = [(336, 336), (224, 224), (64, 64), (168, 168), (300, 200), (100, 300), (37, 411)]


@pytest.fixture(scope="module")
def views(synth_master) -> np.ndarray:
    """(N, 256, 256, 3) uint8: real JPEG views, uniform noise, and hard black/white edges (bicubic overshoot)."""
    rng = np.random.default_rng(0)
    paths = sorted((synth_master / "train_images").glob("*.jpg"))[:3]
    jpegs = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    blocks = np.kron(rng.integers(0, 2, (16, 16, 3)) * 255, np.ones((16, 16, 1))).astype(np.uint8)
    return np.stack([*jpegs, rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), blocks])


def _device(transform) -> DevicePreprocess:
    return DevicePreprocess(transform, (256, 256))


def _to_tensor(views: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(views).permute(0, 3, 1, 2).contiguous()


# float32 with split weights is the CPU path; float64 the GPU path (the same integer sums, another dtype)
@pytest.mark.parametrize("interpolation, exact64",
                         [(f, False) for f in PIL_FILTERS] + [("bicubic", True), ("bilinear", True)])
def test_device_resize_equals_pillow(views, interpolation, exact64):
    from torchvision.transforms import Compose, Normalize, ToTensor

    pre = _device(Compose([ToTensor(), Normalize([0.5] * 3, [0.5] * 3)]))
    x = _to_tensor(views)
    for size in SIZES:
        expected = np.stack([np.asarray(Image.fromarray(v).resize(size[::-1], PIL_FILTERS[interpolation]))
                             for v in views])
        got = pre.resize(x, size, interpolation, exact64).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(got, expected), f"{interpolation} {size}: max diff {np.abs(got - expected).max()}"


def _library_transforms():
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from timm.data import create_transform

    cases = {
        f"timm {mode} crop_pct {pct}": create_transform(
            input_size=(3, 160, 160), crop_pct=pct, crop_mode=mode, interpolation=interp, is_training=False)
        for mode, pct, interp in [("center", 0.95, "bicubic"), ("center", 0.875, "bilinear"), ("squash", 0.9, "bicubic"),
                                  ("border", 0.9, "bicubic"), ("center", 1.0, "bicubic")]
    }
    for mode in ("shortest", "squash", "longest"):
        cases[f"open_clip {mode}"] = image_transform_v2(PreprocessCfg(size=224, resize_mode=mode), is_train=False)
    siglip = open_clip.get_pretrained_cfg("ViT-SO400M-16-SigLIP2-256", "webli")
    fields = {k: v for k, v in siglip.items() if k in PreprocessCfg.__dataclass_fields__}
    cases["open_clip SigLIP 2 at 256"] = image_transform_v2(PreprocessCfg(**{**fields, "size": 256}), is_train=False)
    cases["open_clip PE bilinear at 336"] = image_transform_v2(PreprocessCfg(
        **{k: v for k, v in open_clip.get_pretrained_cfg("PE-Core-L-14-336", "meta").items()
           if k in PreprocessCfg.__dataclass_fields__}, size=336), is_train=False)
    return cases


@pytest.mark.parametrize("name, transform", list(_library_transforms().items()))
def test_plan_runs_the_library_eval_transform_exactly(views, name, transform):
    pre = _device(transform)
    expected = torch.stack([transform(Image.fromarray(v)) for v in views])
    got = pre(_to_tensor(views))
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-6, name


def test_crop_pct_below_one_resizes_then_crops_the_centre():
    """timm test models: crop_pct 0.95 at 160 px -> resize to floor(160 / 0.95) = 168, centre crop 160."""
    import timm
    from timm.data import create_transform, resolve_model_data_config

    config = resolve_model_data_config(timm.create_model("test_vit", pretrained=False))
    assert config["crop_pct"] == 0.95
    plan = plan_from_transform(create_transform(**config, is_training=False), (256, 256))
    assert plan.steps == (Resize((168, 168), "bicubic"), Crop(4, 4, (160, 160)))
    assert plan.output_size == (160, 160) and plan.mean == (0.5, 0.5, 0.5)


def test_a_step_that_cannot_run_on_the_device_is_refused():
    from torchvision.transforms import ColorJitter, Compose, Normalize, ToTensor

    with pytest.raises(ConfigError, match="cannot run on the device: ColorJitter"):
        plan_from_transform(Compose([ColorJitter(0.1), ToTensor(), Normalize([0.5] * 3, [0.5] * 3)]), (256, 256))
    with pytest.raises(ConfigError, match="does not end in to-tensor"):
        plan_from_transform(Compose([ToTensor()]), (256, 256))
