"""Library models behind one interface: normalised pixels -> named per-view vectors.

Every trunk returns {"features": (B, D)} and, where the model has them, {"projected": (B, P)}
(a CLIP-style image embedding) and, with `layers` K > 0, {"layers": (B, L), "patch_mean": (B, D')}:

  - features: timm: `forward_head(forward_features(x), pre_logits=True)`; open_clip: the tower's
    pooled output before its projection (the image embedding itself when there is none);
  - projected: the tower's output, `encode_image` without normalisation (open_clip towers with a
    projection only);
  - layers: as in DINOv2's linear evaluation, the class token of each of the last K blocks with the
    final norm applied, oldest first, concatenated (ViTs without a class token: the mean of each
    block's patch tokens; CNNs: the global average of each of the last K stages' outputs);
  - patch_mean: the mean of the final block's patch tokens, final norm applied (CNNs: the global
    average of the final feature map).

The intermediates come from the libraries' own `forward_intermediates`, in the same pass as the
features.
"""

from __future__ import annotations

import inspect

import torch
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from ..errors import ConfigError
from ..store.layout import LAYERS_DATASET, PATCH_MEAN_DATASET


def _check_layers(name: str, model: nn.Module, layers: int) -> None:
    if layers and not hasattr(model, "forward_intermediates"):
        raise ConfigError(f"{name} has no forward_intermediates in its library: --layers is not available for it")


class TimmTrunk(nn.Module):
    """A timm model built with num_classes=0."""

    def __init__(self, model: nn.Module, layers: int = 0, name: str = "the model"):
        super().__init__()
        self.model = model
        self.layers = layers
        _check_layers(name, model, layers)
        params = inspect.signature(model.forward_intermediates).parameters if layers else {}
        self.tokens = "return_prefix_tokens" in params  # ViT-like: prefix (class/register) tokens + patch tokens
        self.class_token = getattr(model, "cls_token", None) is not None

    def run(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(final feature map / tokens, outputs)."""
        m = self.model
        if not self.layers:
            final = m.forward_features(x)
            return final, {"features": m.forward_head(final, pre_logits=True)}
        if self.tokens:
            final, inter = m.forward_intermediates(
                x, indices=self.layers, norm=True, output_fmt="NLC", return_prefix_tokens=True)
            # (patch tokens, prefix tokens) per block; just the patch tokens when there are no prefix tokens
            inter = [item if isinstance(item, tuple) else (item, None) for item in inter]
            per_block = [prefix[:, 0] if self.class_token else tokens.mean(1) for tokens, prefix in inter]
            patch_mean = inter[-1][0].mean(1)
        else:  # CNN stages: NCHW maps
            final, inter = m.forward_intermediates(x, indices=self.layers)
            per_block = [t.mean((2, 3)) for t in inter]
            patch_mean = final.mean((2, 3))
        return final, {
            "features": m.forward_head(final, pre_logits=True),
            LAYERS_DATASET: torch.cat(per_block, dim=-1),
            PATCH_MEAN_DATASET: patch_mean,
        }

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.run(x)[1]


class OpenClipTrunk(nn.Module):
    """An open_clip vision tower (its own VisionTransformer, or a timm trunk inside TimmModel)."""

    def __init__(self, tower: nn.Module, layers: int = 0, name: str = "the model"):
        super().__init__()
        self.layers = layers
        self.tower = tower
        self.inner = None
        projection = None
        if isinstance(tower, VisionTransformer):
            _check_layers(name, tower, layers)
            if tower.proj is not None:  # kept apart so the tower returns the pooled embedding before it
                projection = tower.proj.detach()
                tower.proj = None
        elif isinstance(tower, TimmModel):
            self.inner = TimmTrunk(tower.trunk, layers, name)
            self.has_projection = tower.trunk.num_classes > 0 or len(tower.head) > 0
        elif layers:
            raise ConfigError(f"--layers is not available for {name} ({type(tower).__name__} vision tower)")
        self.register_buffer("projection", projection)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        tower = self.tower
        if self.inner is not None:
            final, out = self.inner.run(x)
            if self.has_projection:  # the trunk's classifier is the CLIP projection, then the adapter head
                out["projected"] = tower.head(tower.trunk.forward_head(final))
            return out
        if not isinstance(tower, VisionTransformer):
            return {"features": tower(x)}
        if not self.layers:
            out = {"features": tower(x)}
        else:
            d = tower.forward_intermediates(x, indices=self.layers, normalize_intermediates=True,
                                            output_fmt="NLC", output_extra_tokens=True)
            out = {
                "features": d["image_features"],
                LAYERS_DATASET: torch.cat([p[:, 0] for p in d["image_intermediates_prefix"]], dim=-1),
                PATCH_MEAN_DATASET: d["image_intermediates"][-1].mean(1),
            }
        if self.projection is not None:
            out["projected"] = out["features"] @ self.projection
        return out
