"""Backbone registry and the one embedding interface every backbone is used through.

Adding a backbone is one `BackboneSpec` entry. The tiny random entries run the same code
paths (open_clip ViT, timm ConvNeXt V2) as the real ones, so tests and CPU demos exercise them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor, nn

from ..device import autocast_dtype, resolve_precision
from ..errors import ConfigError
from .hf_clip import ClipVisionArch, arch_from_open_clip, build_open_clip_vision, load_hf_clip_folder
from .weights import (
    WEIGHT_FILE_NAMES,
    WeightsError,
    check_state_dict_keys,
    find_weight_file,
    read_state_dict,
    resolve_weights,
    weights_identity,
)

Library = Literal["open_clip", "timm"]
Triple = tuple[float, float, float]
HF_CLIP_EXTRA_FILES = ("config.json", "preprocessor_config.json")
TIMM_WRAPPER_PREFIXES = ("module.", "model.")  # DataParallel / Lightning-style wrapping


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    library: Library
    architecture: ClipVisionArch | str  # open_clip: the ViT to build; timm: a model name
    default_weights: str | None  # hub id of the published weights; None for random test backbones
    input_size: int  # square side the model sees
    mean: Triple
    std: Triple
    interpolation: str  # torch F.interpolate mode
    embed_dim: int  # size of the stored "features"
    projected_dim: int | None  # size of "projected" (CLIP image embedding), None when there is none
    output: str  # what "features" is, in words
    random_init: bool = False
    seed: int = 0
    arch_kwargs: tuple[tuple[str, Any], ...] = ()  # timm constructor overrides (tiny architectures)
    aliases: tuple[str, ...] = field(default=(), compare=False)


def _timm_preprocessing(model_name: str) -> dict:
    """Input size, mean, std and interpolation from timm's pretrained config, not hand-written."""
    cfg = timm.get_pretrained_cfg(model_name)
    return dict(
        input_size=cfg.input_size[-1], mean=tuple(cfg.mean), std=tuple(cfg.std), interpolation=cfg.interpolation
    )


_STREETCLIP_ARCH = arch_from_open_clip("ViT-L-14-336-quickgelu")  # QuickGELU: CLIP was trained with it
_TINY_CLIP_ARCH = ClipVisionArch(
    image_size=64, patch_size=8, width=64, layers=2, heads=2, mlp_dim=256, projection_dim=32, quick_gelu=True
)
_CONVNEXT_LARGE = "convnextv2_large.fcmae_ft_in22k_in1k_384"  # its crop_pct is 1.0: a plain resize matches
_TINY_CONVNEXT = "convnextv2_atto"
_TINY_CONVNEXT_KWARGS = (("depths", (1, 1, 1, 1)), ("dims", (16, 32, 64, 128)))

_SPECS = (
    BackboneSpec(
        name="streetclip",
        library="open_clip",
        architecture=_STREETCLIP_ARCH,
        default_weights="geolocal/StreetCLIP",
        input_size=_STREETCLIP_ARCH.image_size,
        mean=OPENAI_DATASET_MEAN,
        std=OPENAI_DATASET_STD,
        interpolation="bicubic",
        embed_dim=_STREETCLIP_ARCH.width,
        projected_dim=_STREETCLIP_ARCH.projection_dim,
        output="pooled pre-projection (post-layernorm CLS token = HF pooler_output)",
    ),
    BackboneSpec(
        name="convnextv2-large",
        library="timm",
        architecture=_CONVNEXT_LARGE,
        default_weights=f"timm/{_CONVNEXT_LARGE}",
        **_timm_preprocessing(_CONVNEXT_LARGE),
        embed_dim=1536,
        projected_dim=None,
        output="pre-logits (global average pool + head layernorm)",
    ),
    BackboneSpec(
        name="tiny-clip-random",
        library="open_clip",
        architecture=_TINY_CLIP_ARCH,
        default_weights=None,
        input_size=_TINY_CLIP_ARCH.image_size,
        mean=OPENAI_DATASET_MEAN,
        std=OPENAI_DATASET_STD,
        interpolation="bicubic",
        embed_dim=_TINY_CLIP_ARCH.width,
        projected_dim=_TINY_CLIP_ARCH.projection_dim,
        output="pooled pre-projection of a random tiny ViT (tests and demos only)",
        random_init=True,
        seed=0,
        aliases=("tiny-clip",),
    ),
    BackboneSpec(
        name="tiny-convnext-random",
        library="timm",
        architecture=_TINY_CONVNEXT,
        default_weights=None,
        **{**_timm_preprocessing(_TINY_CONVNEXT), "input_size": 64},
        embed_dim=128,
        projected_dim=None,
        output="pre-logits of a random tiny ConvNeXt V2 (tests and demos only)",
        random_init=True,
        seed=0,
        arch_kwargs=_TINY_CONVNEXT_KWARGS,
        aliases=("tiny-convnext",),
    ),
)
BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in _SPECS}
_ALIASES = {alias: spec.name for spec in _SPECS for alias in spec.aliases}


def get_spec(name: str) -> BackboneSpec:
    canonical = _ALIASES.get(name, name)
    if canonical not in BACKBONES:
        aliases = ", ".join(f"{a} = {n}" for a, n in _ALIASES.items())
        raise ConfigError(f"unknown backbone {name!r}; available: {', '.join(BACKBONES)} (aliases: {aliases})")
    return BACKBONES[canonical]


def preprocessing_record(spec: BackboneSpec) -> dict:
    """How images become model input, for the feature store's metadata."""
    return {
        "input": "uint8 RGB (B, 3, H, W)",
        "resize": f"whole image to {spec.input_size}x{spec.input_size}, no crop (inputs are square)",
        "input_size": spec.input_size,
        "interpolation": spec.interpolation,
        "antialias": True,
        "clamp": [0, 255],
        "scale": "1/255",
        "mean": list(spec.mean),
        "std": list(spec.std),
    }


def _no_autograd() -> AbstractContextManager:
    # inference_mode is the cheaper of the two, but torch.compile cannot trace through it
    return torch.no_grad() if torch.compiler.is_compiling() else torch.inference_mode()


class Embedder(nn.Module):
    """uint8 images -> {"features": (B, embed_dim)[, "projected": (B, projected_dim)]}, float32."""

    def __init__(self, spec: BackboneSpec, trunk: nn.Module, projection: Tensor | None = None):
        super().__init__()
        self.spec = spec
        self.trunk = trunk.eval()
        self.register_buffer("projection", projection)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))
        self.precision = "fp32"  # "fp32", "bf16" or "fp16": what autocast computes in (load_backbone sets it)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W); got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.device, non_blocking=True).float()
        size = self.spec.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode=self.spec.interpolation, antialias=True, align_corners=False)
            x = x.clamp(0, 255)  # bicubic overshoots; image libraries clamp to the uint8 range
        return (x / 255 - self.mean) / self.std

    def embed_pixels(self, pixels: Tensor) -> dict[str, Tensor]:
        """Embed already-normalised (B, 3, input_size, input_size) float pixels."""
        on_cuda = self.device.type == "cuda"
        pixels = pixels.to(self.device)
        if on_cuda:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        dtype = autocast_dtype(self.precision)  # None: plain float32
        with _no_autograd(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            features = self.trunk(pixels)
            out = {"features": features.float()}
            if self.projection is not None:
                out["projected"] = (features @ self.projection).float()
        return out

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        with _no_autograd():
            return self.embed_pixels(self.preprocess(images))


@dataclass
class LoadedBackbone:
    embedder: Embedder
    weights_identity: dict | None  # JSON-serialisable: file sha256s, hub revision, or the random seed

    @property
    def spec(self) -> BackboneSpec:
        """The spec as loaded: a CLIP checkpoint's own config decides its sizes."""
        return self.embedder.spec


def _seeded_build(spec: BackboneSpec) -> nn.Module:
    # Seeded so random backbones are identical on every load; fork_rng leaves the caller's RNG alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if spec.library == "open_clip":
            return build_open_clip_vision(spec.architecture)
        return timm.create_model(spec.architecture, pretrained=False, num_classes=0, **dict(spec.arch_kwargs))


def _split_projection(tower: nn.Module) -> tuple[nn.Module, Tensor]:
    """Detach open_clip's projection so the tower returns the pooled embedding before it."""
    projection = tower.proj.detach()
    tower.proj = None
    return tower, projection


def _missing_weights_error(spec: BackboneSpec) -> WeightsError:
    what = "a transformers CLIPModel folder" if spec.library == "open_clip" else "a checkpoint file or folder"
    return WeightsError(
        f"backbone {spec.name!r} needs pretrained weights and will not run randomly initialised; "
        f"pass --weights with {what} (a local copy of {spec.default_weights}), "
        f"or --weights {spec.default_weights} to download it when online"
    )


def _load_clip(spec: BackboneSpec, weights: str | Path, hash_weights: bool) -> tuple[BackboneSpec, nn.Module, Tensor, dict | None]:
    source = resolve_weights(weights, weight_files=WEIGHT_FILE_NAMES, extra_files=HF_CLIP_EXTRA_FILES)
    ckpt = load_hf_clip_folder(source.path)
    arch = ckpt.arch
    loaded_spec = replace(
        spec,
        architecture=arch,
        input_size=arch.image_size,
        embed_dim=arch.width,
        projected_dim=arch.projection_dim,
        mean=ckpt.mean or spec.mean,
        std=ckpt.std or spec.std,
        interpolation=ckpt.interpolation or spec.interpolation,
    )
    tower, projection = _split_projection(ckpt.tower)
    return loaded_spec, tower, projection, weights_identity(source, ckpt.files) if hash_weights else None


def _strip_wrapper_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in TIMM_WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_timm(spec: BackboneSpec, weights: str | Path, hash_weights: bool) -> tuple[nn.Module, dict | None]:
    source = resolve_weights(weights, weight_files=WEIGHT_FILE_NAMES)
    path = find_weight_file(source.path) if source.path.is_dir() else source.path
    model = _seeded_build(spec)
    state = _strip_wrapper_prefix(read_state_dict(path))
    classifier = model.pretrained_cfg.get("classifier")
    if classifier:  # we keep pre-logits, so the classification head is not needed
        state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}
    check_state_dict_keys(expected=model.state_dict().keys(), found=state.keys(), source=str(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{path} does not fit {spec.architecture}: {err}") from err
    return model, weights_identity(source, [path]) if hash_weights else None


def load_backbone(
    spec_or_name: BackboneSpec | str, weights: str | Path | None, device: str | torch.device = "cpu",
    *, precision: str = "auto", hash_weights: bool = True,
) -> LoadedBackbone:
    """Build a backbone and load its weights; real backbones refuse to run without weights.

    `precision`: see device.resolve_precision. `hash_weights=False` skips hashing the weight files
    (weights_identity is then None): torchrun processes other than rank 0 take rank 0's hashes.
    """
    spec = get_spec(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    projection = None
    if spec.random_init:
        if weights is not None:
            raise WeightsError(f"backbone {spec.name!r} is randomly initialised by design and takes no weights")
        trunk, identity = _seeded_build(spec), {"random_init": True, "seed": spec.seed}
        if spec.library == "open_clip":
            trunk, projection = _split_projection(trunk)
    elif weights is None:
        raise _missing_weights_error(spec)
    elif spec.library == "open_clip":
        spec, trunk, projection, identity = _load_clip(spec, weights, hash_weights)
    else:
        trunk, identity = _load_timm(spec, weights, hash_weights)
    if getattr(trunk, "num_features", spec.embed_dim) != spec.embed_dim:
        raise ValueError(
            f"backbone {spec.name!r} outputs {trunk.num_features} features; its spec says {spec.embed_dim}"
        )
    embedder = Embedder(spec, trunk, projection).to(device)
    embedder.precision = resolve_precision(precision, embedder.device)
    if embedder.device.type == "cuda":
        embedder.trunk.to(memory_format=torch.channels_last)
    return LoadedBackbone(embedder.eval(), identity)
