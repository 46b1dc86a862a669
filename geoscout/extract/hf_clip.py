"""Run a HuggingFace transformers CLIP vision tower through open_clip's VisionTransformer.

StreetCLIP is published as a transformers `CLIPModel` folder. Converting it to open_clip keeps
one CLIP code path for real and tiny test backbones, without transformers at run time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from open_clip import get_model_config, list_models
from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer
from torch import Tensor, nn

from ..errors import ConfigError
from .weights import WeightsError, check_state_dict_keys, find_weight_file, read_state_dict

# transformers omits values equal to its defaults when it writes config.json, so absent keys
# mean these (CLIPVisionConfig / CLIPConfig defaults).
HF_VISION_DEFAULTS = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "patch_size": 32,
    "image_size": 224,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
}
HF_PROJECTION_DIM_DEFAULT = 512
HF_ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # hidden_act -> uses QuickGELU
HF_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL resample codes in preprocessor_config.json

# Index buffer that older transformers saved with the weights; it holds no learned values.
IGNORED_HF_KEYS = frozenset({"vision_model.embeddings.position_ids"})
VISION_PREFIXES = ("vision_model.", "visual_projection.")


@dataclass(frozen=True)
class ClipVisionArch:
    """A plain CLIP ViT vision tower (class-token pooling, learnable positions, pre-LN)."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    projection_dim: int
    quick_gelu: bool
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class HfClipCheckpoint:
    """A CLIP vision tower loaded from a transformers folder, with what the folder says about it."""

    arch: ClipVisionArch
    tower: VisionTransformer
    files: tuple[Path, ...]  # every file read: weights, config.json, preprocessor_config.json
    mean: tuple[float, float, float] | None  # from preprocessor_config.json when present
    std: tuple[float, float, float] | None
    interpolation: str | None


def arch_from_open_clip(config_name: str) -> ClipVisionArch:
    """The vision tower of a named open_clip model config (e.g. 'ViT-L-14-336-quickgelu')."""
    cfg = get_model_config(config_name)
    if cfg is None:
        raise ConfigError(f"unknown open_clip config {config_name!r}; available: {', '.join(list_models())}")
    vision = cfg["vision_cfg"]
    if vision.get("timm_model_name") or not isinstance(vision["layers"], int):
        raise ConfigError(f"open_clip config {config_name!r} is not a plain ViT vision tower")
    width = vision["width"]
    return ClipVisionArch(
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        width=width,
        layers=vision["layers"],
        heads=width // vision.get("head_width", 64),
        mlp_dim=int(width * vision.get("mlp_ratio", 4.0)),
        projection_dim=cfg["embed_dim"],
        quick_gelu=bool(cfg.get("quick_gelu", False)),
    )


def arch_from_hf_config(config: dict, source: str = "config.json") -> ClipVisionArch:
    """The vision tower described by a transformers CLIPModel config.json."""
    if "vision_config" not in config:
        raise WeightsError(
            f"{source} has no 'vision_config' (model_type={config.get('model_type')!r}); "
            "expected a transformers CLIPModel config"
        )
    vision = {**HF_VISION_DEFAULTS, **config["vision_config"]}
    act = vision["hidden_act"]
    if act not in HF_ACTIVATIONS:
        raise WeightsError(f"{source}: unsupported hidden_act {act!r}; supported: {', '.join(HF_ACTIVATIONS)}")
    if vision["num_channels"] != 3:
        raise WeightsError(f"{source}: num_channels is {vision['num_channels']}; only RGB (3) is supported")
    return ClipVisionArch(
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        width=vision["hidden_size"],
        layers=vision["num_hidden_layers"],
        heads=vision["num_attention_heads"],
        mlp_dim=vision["intermediate_size"],
        # the top-level value is the one CLIPModel uses; vision_config's copy may be a stale default
        projection_dim=config.get("projection_dim", HF_PROJECTION_DIM_DEFAULT),
        quick_gelu=HF_ACTIVATIONS[act],
        layer_norm_eps=vision["layer_norm_eps"],
    )


def build_open_clip_vision(arch: ClipVisionArch) -> VisionTransformer:
    """An open_clip VisionTransformer for `arch`, randomly initialised (seed the RNG first)."""
    if arch.width % arch.heads:
        raise ValueError(f"width {arch.width} is not divisible by {arch.heads} heads")
    tower = VisionTransformer(
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        width=arch.width,
        layers=arch.layers,
        heads=arch.heads,
        mlp_ratio=arch.mlp_dim / arch.width,
        output_dim=arch.projection_dim,
        act_layer=QuickGELU if arch.quick_gelu else nn.GELU,
        norm_layer=partial(LayerNorm, eps=arch.layer_norm_eps),
    )
    for block in tower.transformer.resblocks:  # open_clip derives the MLP width from a float ratio
        if block.mlp.c_fc.out_features != arch.mlp_dim:
            raise ValueError(f"open_clip built an MLP of width {block.mlp.c_fc.out_features}, not {arch.mlp_dim}")
    return tower


def _same(tensors: list[Tensor]) -> Tensor:
    return tensors[0]


def _concat(tensors: list[Tensor]) -> Tensor:
    return torch.cat(tensors, dim=0)


def _transpose(tensors: list[Tensor]) -> Tensor:
    # transformers stores nn.Linear weights (out, in); open_clip's proj is used as x @ proj (in, out)
    return tensors[0].t()


def key_plan(arch: ClipVisionArch) -> list[tuple[str, list[str], Callable[[list[Tensor]], Tensor]]]:
    """(open_clip key, transformers keys it is made from, how) for every open_clip vision parameter."""
    emb = "vision_model.embeddings"
    plan: list[tuple[str, list[str], Callable[[list[Tensor]], Tensor]]] = [
        ("conv1.weight", [f"{emb}.patch_embedding.weight"], _same),
        ("class_embedding", [f"{emb}.class_embedding"], _same),
        ("positional_embedding", [f"{emb}.position_embedding.weight"], _same),
    ]
    for p in ("weight", "bias"):
        plan.append((f"ln_pre.{p}", [f"vision_model.pre_layrnorm.{p}"], _same))
    for i in range(arch.layers):
        hf, oc = f"vision_model.encoder.layers.{i}", f"transformer.resblocks.{i}"
        for p in ("weight", "bias"):
            # nn.MultiheadAttention keeps q, k and v as one stacked projection
            plan.append((f"{oc}.attn.in_proj_{p}", [f"{hf}.self_attn.{x}_proj.{p}" for x in "qkv"], _concat))
            for oc_name, hf_name in (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                plan.append((f"{oc}.{oc_name}.{p}", [f"{hf}.{hf_name}.{p}"], _same))
    for p in ("weight", "bias"):
        plan.append((f"ln_post.{p}", [f"vision_model.post_layernorm.{p}"], _same))
    plan.append(("proj", ["visual_projection.weight"], _transpose))
    return plan


def convert_hf_vision_state_dict(hf_state: dict[str, Tensor], arch: ClipVisionArch, source: str) -> dict[str, Tensor]:
    """Map a transformers CLIPModel state dict onto open_clip VisionTransformer keys.

    Every vision key must be used and every open_clip key filled; text-tower keys are ignored.
    """
    vision = {k for k in hf_state if k.startswith(VISION_PREFIXES) and k not in IGNORED_HF_KEYS}
    plan = key_plan(arch)
    check_state_dict_keys(expected=[k for _, srcs, _ in plan for k in srcs], found=vision, source=source)
    return {oc_key: combine([hf_state[k] for k in srcs]) for oc_key, srcs, combine in plan}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path} is not valid JSON: {err}") from err


def _preprocessor_settings(path: Path) -> tuple[tuple | None, tuple | None, str | None]:
    if not path.is_file():
        return None, None, None
    cfg = _read_json(path)
    mean = tuple(float(v) for v in cfg["image_mean"]) if "image_mean" in cfg else None
    std = tuple(float(v) for v in cfg["image_std"]) if "image_std" in cfg else None
    return mean, std, HF_RESAMPLE.get(cfg.get("resample"))


def load_hf_clip_folder(folder: Path) -> HfClipCheckpoint:
    """Build the open_clip vision tower described by a transformers CLIPModel folder and load its weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(
            f"CLIP weights must be a transformers CLIPModel folder (config.json + model.safetensors "
            f"or pytorch_model.bin); {folder} is not a folder"
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{folder} has no config.json; expected a transformers CLIPModel folder")
    arch = arch_from_hf_config(_read_json(config_path), source=str(config_path))
    weight_file = find_weight_file(folder)
    state = convert_hf_vision_state_dict(read_state_dict(weight_file), arch, source=str(weight_file))
    tower = build_open_clip_vision(arch)
    try:
        tower.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches: the weights do not fit config.json
        raise WeightsError(f"{weight_file} does not fit the architecture in {config_path}: {err}") from err
    preproc_path = folder / "preprocessor_config.json"
    mean, std, interpolation = _preprocessor_settings(preproc_path)
    files = (weight_file, config_path) + ((preproc_path,) if preproc_path.is_file() else ())
    return HfClipCheckpoint(arch, tower, files, mean, std, interpolation)
