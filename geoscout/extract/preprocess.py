"""Images to model input exactly as the library's own eval pipeline makes them, run on the device.

The library decides the pipeline: timm's `create_transform(**resolve_model_data_config(model),
is_training=False)` or open_clip's `image_transform_v2(preprocess_cfg, is_train=False)`, both a
torchvision Compose of PIL steps (resize, centre crop, to tensor, normalise). `plan_from_transform`
reads that Compose into a plan, finding every size and crop box by running the step itself on a
blank PIL image of the current size, so the geometry (crop_pct, crop mode, rounding of sizes) is
the library's own and nothing is typed by hand.

`DevicePreprocess` runs the plan on uint8 batches where the model runs. Its resize is Pillow's
8-bit resampling reproduced exactly (Pillow's Resample.c): coefficients from Pillow's filters,
normalised and rounded to 22 fractional bits, a horizontal and a vertical pass in Pillow's order,
each an exact integer sum (as matrix products over the pass's band, in a float dtype that holds those integers
exactly), rounded and clipped to uint8. Resizing in float in one pass instead differs from PIL by
up to 14/255 at 336 px, because PIL rounds and clips bicubic overshoot between its two passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import PIL
import torch
from PIL import Image
from torch import Tensor, nn

from ..errors import ConfigError

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images
# Pillow 13 runs the vertical pass first when the height shrinks more than twice as much as the width
# (python-pillow/Pillow#9549); earlier versions always run the horizontal pass first.
PILLOW_ORDERS_PASSES = int(PIL.__version__.split(".")[0]) >= 13
RESIZE_METHOD = (
    "Pillow 8-bit resampling reproduced exactly on the device: Pillow's filter coefficients in 22-bit "
    "fixed point, its two passes in Pillow's order, each rounded and clipped to uint8"
)


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


_F32_054, _F32_046 = float(np.float32(0.54)), float(np.float32(0.46))  # Pillow writes them as float literals


def _hamming(x: float) -> float:
    x = abs(x)
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x *= math.pi
    return math.sin(x) / x * (_F32_054 + _F32_046 * math.cos(x))


# Pillow's resampling filters: (support, filter), as in Resample.c
PIL_FILTERS = {
    "box": (0.5, lambda x: 1.0 if -0.5 < x <= 0.5 else 0.0),
    "bilinear": (1.0, lambda x: max(0.0, 1.0 - abs(x))),
    "hamming": (1.0, _hamming),
    "bicubic": (2.0, _bicubic),
    "lanczos": (3.0, lambda x: _sinc(x) * _sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0),
}
NEAREST = ("nearest", "nearest-exact")  # torchvision sends both to PIL's NEAREST


@lru_cache(maxsize=64)
def pil_coefficients(in_size: int, out_size: int, interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """(first input index (out,), int32 weights (out, taps)) of one Pillow resampling pass."""
    if interpolation in NEAREST:
        # Pillow's nearest is an affine transform: the input pixel under each output centre, with
        # the coordinate advanced by adding the scale once per pixel (its rounding included)
        scale, xx, first = in_size / out_size, 0.5 * in_size / out_size, []
        for _ in range(out_size):
            first.append(min(int(xx), in_size - 1))
            xx += scale
        return np.array(first, dtype=np.int64), np.full((out_size, 1), 1 << PRECISION_BITS, dtype=np.int32)
    support, kernel = PIL_FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    taps = int(math.ceil(support)) * 2 + 1
    first = np.zeros(out_size, dtype=np.int64)
    weights = np.zeros((out_size, taps), dtype=np.int32)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = [kernel((x + xmin - center + 0.5) / filterscale) for x in range(xmax)]
        total = 0.0
        for w in k:
            total += w
        for x, w in enumerate(k):
            w = w / total if total != 0.0 else w
            # C's (int) cast truncates toward zero: this rounds half away from zero, as Pillow does
            weights[xx, x] = int((0.5 if w >= 0 else -0.5) + w * (1 << PRECISION_BITS))
        first[xx] = xmin
    return first, weights


@dataclass(frozen=True)
class Resize:
    size: tuple[int, int]  # (height, width)
    interpolation: str


@dataclass(frozen=True)
class Crop:
    top: int
    left: int
    size: tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class Plan:
    """What the library's eval transform does to an image of `source_size`."""

    source_size: tuple[int, int]
    steps: tuple[Resize | Crop, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def output_size(self) -> tuple[int, int]:
        size = self.source_size
        for step in self.steps:
            size = step.size
        return size

    def record(self) -> dict:
        steps = [
            {"resize": list(s.size), "interpolation": s.interpolation} if isinstance(s, Resize)
            else {"crop": list(s.size), "top": s.top, "left": s.left}
            for s in self.steps
        ]
        return {
            "source_size": list(self.source_size),
            "steps": steps,
            "input_size": list(self.output_size),
            "resize_method": RESIZE_METHOD,
            "scale": "1/255",
            "mean": list(self.mean),
            "std": list(self.std),
        }


def _interpolation(op) -> str:
    mode = getattr(op, "interpolation", None)
    name = getattr(mode, "value", mode)
    if name not in PIL_FILTERS and name not in NEAREST:
        raise ConfigError(f"the eval transform resizes with {mode!r}, which geoscout cannot reproduce")
    return name


def _crop_box(op, size: tuple[int, int]) -> Crop:
    """Where the library's crop step cuts an image of `size`, found by cropping an image of pixel indices."""
    h, w = size
    index = np.arange(h * w, dtype=np.int32).reshape(h, w)
    out = np.asarray(op(Image.fromarray(index, mode="I")))
    top, left = divmod(int(out[0, 0]), w)
    if not np.array_equal(out, index[top:top + out.shape[0], left:left + out.shape[1]]):
        raise ConfigError(f"the eval transform's {type(op).__name__} pads a {w}x{h} image; only crops are supported")
    return Crop(top, left, (out.shape[0], out.shape[1]))


def plan_from_transform(transform, source_size: tuple[int, int]) -> Plan:
    """Read a library eval transform (a torchvision Compose of PIL steps) into a plan for `source_size` images."""
    steps: list[Resize | Crop] = []
    size, scaled, mean, std = tuple(source_size), False, None, None
    for op in getattr(transform, "transforms", [transform]):
        kind = getattr(op, "__name__", type(op).__name__)  # a plain function (open_clip's _convert_to_rgb) or a step
        if kind in ("Resize", "ResizeKeepRatio") and not scaled:
            h, w = size
            out_w, out_h = op(Image.new("RGB", (w, h))).size  # the library's own size arithmetic
            if (out_h, out_w) != size:  # PIL returns a copy when the size does not change
                steps.append(Resize((out_h, out_w), _interpolation(op)))
                size = (out_h, out_w)
        elif kind in ("CenterCrop", "CenterCropOrPad") and not scaled:
            crop = _crop_box(op, size)
            if crop.size != size:
                steps.append(crop)
                size = crop.size
        elif kind in ("MaybeConvertMode", "_convert_to_rgb") and getattr(op, "mode", "RGB") == "RGB":
            continue  # views are decoded as RGB already
        elif kind in ("ToTensor", "MaybeToTensor") and not scaled:
            scaled = True
        elif kind in ("Normalize", "MaybeNormalize") and scaled and mean is None:
            mean, std = (tuple(float(v) for v in (x.tolist() if isinstance(x, Tensor) else x)) for x in (op.mean, op.std))
        else:
            raise ConfigError(f"the eval transform has a step geoscout cannot run on the device: {op!r} (in {transform!r})")
    if not scaled or mean is None or len(mean) != 3:
        raise ConfigError(f"the eval transform does not end in to-tensor and a 3-channel normalise: {transform!r}")
    return Plan(tuple(source_size), tuple(steps), mean, std)


BLOCK = 32  # outputs per matrix block: a pass is a few small dense products over its input band


@dataclass(frozen=True)
class _Pass:
    """One Pillow pass as dense blocks of its banded matrix, in the dtype that keeps the sums exact.

    float64 holds every integer sum Pillow makes (|sum| < 2**31). float32 holds integers only up to
    2**24, so on the CPU (where float32 is four times faster) each weight is split into a high and a
    low part, w = hi * 2**split + lo with 0 <= lo < 2**split, small enough that both sums are exact.
    """

    blocks: tuple[tuple[int, int, Tensor], ...]  # (first input, end input, matrix (band, outputs[x2]))
    split: int | None  # None: float64 with whole weights


def _split_bits(taps: int) -> int:
    """The widest low part whose sums (<= 255 * (2**bits - 1) * taps, plus Pillow's 2**21) stay below 2**24."""
    bits = 0
    while 255 * (2 ** (bits + 1) - 1) * taps + (1 << (PRECISION_BITS - 1)) < 2**24:
        bits += 1
    return bits


MIN_SPLIT_BITS = 8  # with fewer low bits the high parts' sums could pass 2**24: float64 then


def _make_pass(in_size: int, out_size: int, interpolation: str, device: torch.device, exact64: bool) -> _Pass:
    first, weights = pil_coefficients(in_size, out_size, interpolation)
    taps = weights.shape[1]
    split = None if exact64 or _split_bits(taps) < MIN_SPLIT_BITS else _split_bits(taps)
    blocks = []
    for a in range(0, out_size, BLOCK):
        b = min(a + BLOCK, out_size)
        lo, hi = int(first[a:b].min()), int(min(in_size, (first[a:b] + taps).max()))
        band = np.zeros((hi - lo, b - a), dtype=np.int64)
        for o in range(a, b):
            for t in range(taps):
                if first[o] + t < in_size:
                    band[first[o] + t - lo, o - a] += weights[o, t]
        if split is not None:  # [high parts | low parts], computed in one product
            band = np.concatenate([band >> split, band & ((1 << split) - 1)], axis=1)
        dtype = torch.float64 if split is None else torch.float32
        blocks.append((lo, hi, torch.from_numpy(band).to(device=device, dtype=dtype)))
    return _Pass(tuple(blocks), split)


def _round_clip(sums: Tensor, split: int | None, dim: int) -> Tensor:
    """Pillow's (sum + 2**21) >> 22, clipped to 0..255, on one block's exact integer sums (in floating point)."""
    if split is None:
        return sums.add_(1 << (PRECISION_BITS - 1)).mul_(2.0**-PRECISION_BITS).floor_().clamp_(0, 255)
    high, low = sums.chunk(2, dim=dim)
    # sum = high * 2**split + low. With low + 2**21 = carry * 2**split + rest (0 <= rest < 2**split),
    # floor((sum + 2**21) / 2**22) = floor((high + carry) / 2**(22 - split)): every step is exact in float32.
    carry = low.add(1 << (PRECISION_BITS - 1)).mul_(2.0**-split).floor_()
    return carry.add_(high).mul_(2.0 ** (split - PRECISION_BITS)).floor_().clamp_(0, 255)


def _horizontal(x: Tensor, p: _Pass) -> Tensor:  # (..., W) -> (..., out)
    x = x.to(p.blocks[0][2].dtype)  # pixel values are small integers: exact in any float dtype
    return torch.cat([_round_clip(x[..., lo:hi] @ m, p.split, -1) for lo, hi, m in p.blocks], dim=-1)


def _vertical(x: Tensor, p: _Pass) -> Tensor:  # (..., H, W) -> (..., out, W)
    x = x.to(p.blocks[0][2].dtype)
    return torch.cat([_round_clip(m.t() @ x[..., lo:hi, :], p.split, -2) for lo, hi, m in p.blocks], dim=-2)


class DevicePreprocess(nn.Module):
    """uint8 (B, 3, H, W) -> normalised float32 model input, by the library's eval transform (see module doc)."""

    def __init__(self, transform, source_size: tuple[int, int]):
        super().__init__()
        self.transform = transform
        self.plan = plan_from_transform(transform, source_size)
        self.register_buffer("mean", torch.tensor(self.plan.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.plan.std).view(1, 3, 1, 1), persistent=False)
        self._passes: dict = {}
        self._plans = {self.plan.source_size: self.plan}

    def plan_for(self, size: tuple[int, int]) -> Plan:
        if size not in self._plans:  # views of another size than the decode size (tests, direct calls)
            self._plans[size] = plan_from_transform(self.transform, size)
        return self._plans[size]

    def _pass(self, in_size: int, out_size: int, interpolation: str, exact64: bool) -> _Pass:
        key = (in_size, out_size, interpolation, self.mean.device, exact64)
        if key not in self._passes:
            self._passes[key] = _make_pass(in_size, out_size, interpolation, self.mean.device, exact64)
        return self._passes[key]

    def resize(self, x: Tensor, size: tuple[int, int], interpolation: str, exact64: bool | None = None) -> Tensor:
        """Pillow's resize of uint8-valued pixels (B, 3, H, W), its two passes in Pillow's order.

        float64 products on the GPU (float32 ones may run as TF32 there) and wherever float32 matrix
        products may be rounded (torch.set_float32_matmul_precision); split float32 ones otherwise.
        """
        if exact64 is None:
            exact64 = x.device.type != "cpu" or torch.get_float32_matmul_precision() != "highest"
        (h, w), (out_h, out_w) = x.shape[-2:], size
        vertical_first = PILLOW_ORDERS_PASSES and h - out_h > 2 * (w - out_w) and out_h < h
        if vertical_first:
            x = _vertical(x, self._pass(h, out_h, interpolation, exact64))
        if out_w != w:
            x = _horizontal(x, self._pass(w, out_w, interpolation, exact64))
        if out_h != h and not vertical_first:
            x = _vertical(x, self._pass(h, out_h, interpolation, exact64))
        return x

    def pixels(self, images: Tensor) -> Tensor:
        """The plan's resizes and crops, uint8 values (B, 3, h, w) in floating point: what PIL would hold."""
        x = images.to(self.mean.device, non_blocking=True)
        plan = self.plan_for(tuple(x.shape[-2:]))
        for step in plan.steps:
            if isinstance(step, Resize):
                x = self.resize(x, step.size, step.interpolation)
            else:
                x = x[..., step.top:step.top + step.size[0], step.left:step.left + step.size[1]]
        return x

    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W); got {images.dtype} {tuple(images.shape)}")
        # the same arithmetic as torchvision's to_tensor (x / 255) then Normalize ((x - mean) / std)
        return (self.pixels(images).float() / 255 - self.mean) / self.std
