"""View fusion: four per-view embeddings (N/E/S/W) and their presence mask -> one descriptor per location.

Every fusion module takes `(x, mask)` with x (B, 4, D) float and mask (B, 4) bool (True = view present)
and returns (B, out_dim). Missing views never reach the arithmetic (their slots may hold anything,
even NaN); a location with no view at all gets what the module learned about absence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..competition import NUM_VIEWS
from ..errors import ConfigError


@dataclass
class FusionConfig:
    kind: str = "mean"  # a key of FUSIONS: "mean", "attention", "concat" or "transformer"
    width: int | None = 256  # None: the backbone's own dimension and no input projection
    # LayerNorm per view first (backbones differ wildly in embedding scale). No affine part: the next
    # linear layer absorbs it, and without parameters no gradient flows back over the (B, 4, D) input.
    input_norm: bool = True
    # transformer only
    depth: int = 1
    heads: int = 4
    ffn_dim: int = 512
    dropout: float = 0.1
    direction_embeddings: bool = True
    pooling: str = "mean"  # "mean": masked mean of the view outputs; "concat": the four outputs side by side
    norm_first: bool = True


def _present_views(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # A fill, not a multiplication: 0 * NaN is NaN, in the forward pass and in the weight gradients.
    return x.masked_fill(~mask[..., None], 0.0)


def _input_norm(config: FusionConfig, input_dim: int) -> nn.Module:
    return nn.LayerNorm(input_dim, elementwise_affine=False) if config.input_norm else nn.Identity()


def _pooled(x: torch.Tensor, weights: torch.Tensor, standardize: nn.Module | None) -> torch.Tensor:
    """sum_v w_v x_v, standardised after pooling: for weights summing to 1 that equals pooling standardised
    views, and touches (B, D) instead of (B, 4, D) (the per-view pass was a third of a step at 1536-d)."""
    pooled = torch.bmm(weights[:, None, :], x).squeeze(1)
    return pooled if standardize is None else standardize(pooled)


class MeanFusion(nn.Module):
    """Masked mean of the present views, then an optional linear projection."""

    def __init__(self, config: FusionConfig, input_dim: int):
        super().__init__()
        self.input_norm = _input_norm(config, input_dim)
        self.project = nn.Identity() if config.width is None else nn.Linear(input_dim, config.width)
        self.out_dim = input_dim if config.width is None else config.width
        # The descriptor of a location without views. Learned after the projection: a parameter before
        # it would make the projection's input need a gradient, one more (B, D) x (D, W) product per step.
        self.absent = nn.Parameter(torch.zeros(self.out_dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, standardize: nn.Module | None = None) -> torch.Tensor:
        x = _present_views(x, mask)
        if not isinstance(self.input_norm, nn.Identity):  # a per-view norm needs standardised views first
            x, standardize = self.input_norm(x if standardize is None else standardize(x)), None
        count = mask.sum(dim=1, keepdim=True)
        weights = mask.to(x.dtype) / count.clamp(min=1)  # zero for absent views, whatever the norm made of them
        return torch.where(count > 0, self.project(_pooled(x, weights, standardize)), self.absent)


class AttentionFusion(nn.Module):
    """A weighted mean of the present views, the weights a softmax of a learned linear score of each
    standardised view plus its direction's: a view that shows nothing of the place (a wall, a blank
    frame) can be weighed down, which a plain mean cannot. Then an optional projection."""

    def __init__(self, config: FusionConfig, input_dim: int):
        super().__init__()
        self.input_norm = _input_norm(config, input_dim)
        self.score = nn.Linear(input_dim, 1)
        nn.init.zeros_(self.score.weight)  # starts as the plain mean
        self.directions = nn.Parameter(torch.zeros(NUM_VIEWS)) if config.direction_embeddings else None
        self.project = nn.Identity() if config.width is None else nn.Linear(input_dim, config.width)
        self.out_dim = input_dim if config.width is None else config.width
        self.absent = nn.Parameter(torch.zeros(self.out_dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, standardize: nn.Module | None = None) -> torch.Tensor:
        x = _present_views(x, mask)
        if not isinstance(self.input_norm, nn.Identity):
            x, standardize = self.input_norm(x if standardize is None else standardize(x)), None
        # w . (x - mean) / std = (w / std) . x + a constant that is the same for every view: it cancels in the softmax
        w = self.score.weight[0] if standardize is None else self.score.weight[0] / standardize.std
        score = x @ w
        if self.directions is not None:
            score = score + self.directions
        weights = torch.softmax(score.masked_fill(~mask, -torch.inf), dim=1).nan_to_num(0.0)  # all-missing rows: 0
        return torch.where(mask.any(dim=1, keepdim=True), self.project(_pooled(x, weights, standardize)), self.absent)


class ConcatFusion(nn.Module):
    """The four views side by side (the seed's ConvNeXt branch): a missing view's slot holds a learned
    "absent" vector, so the head can tell absence from any embedding; optional projection after."""

    def __init__(self, config: FusionConfig, input_dim: int):
        super().__init__()
        self.input_norm = _input_norm(config, input_dim)
        self.absent = nn.Parameter(torch.zeros(NUM_VIEWS, input_dim))
        flat = NUM_VIEWS * input_dim
        self.project = nn.Identity() if config.width is None else nn.Linear(flat, config.width)
        self.out_dim = flat if config.width is None else config.width

    def forward(self, x: torch.Tensor, mask: torch.Tensor, standardize: nn.Module | None = None) -> torch.Tensor:
        x = _present_views(x, mask)
        x = self.input_norm(x if standardize is None else standardize(x))
        x = torch.where(mask[..., None], x, self.absent)
        return self.project(x.flatten(1))


class TransformerFusion(nn.Module):
    """A transformer encoder over the four view tokens; missing views are masked out as keys.

    A missing view's token is a learned "absent" vector, so with concatenation pooling its slot carries
    only what was learned about absence plus what it attends to among the present views. A location with
    no view at all lets its absent tokens attend to each other rather than to nothing (which is NaN).
    """

    def __init__(self, config: FusionConfig, input_dim: int):
        super().__init__()
        width = input_dim if config.width is None else config.width
        if config.pooling not in ("mean", "concat"):
            raise ConfigError(f"unknown pooling {config.pooling!r}; available: 'mean', 'concat'")
        if width % config.heads:
            raise ConfigError(f"transformer width {width} is not divisible by {config.heads} heads")
        self.pooling = config.pooling
        self.input_norm = _input_norm(config, input_dim)
        self.project = nn.Identity() if config.width is None else nn.Linear(input_dim, width)
        self.absent = nn.Parameter(torch.randn(width) * 0.02)
        self.directions = nn.Parameter(torch.randn(NUM_VIEWS, width) * 0.02) if config.direction_embeddings else None
        layer = nn.TransformerEncoderLayer(
            d_model=width, nhead=config.heads, dim_feedforward=config.ffn_dim, dropout=config.dropout,
            batch_first=True, norm_first=config.norm_first,
        )
        # No nested tensors: they zero the outputs of padded tokens in eval mode only, which would make
        # concatenation pooling differ between training and inference.
        self.encoder = nn.TransformerEncoder(layer, num_layers=config.depth, enable_nested_tensor=False)
        self.out_dim = width * NUM_VIEWS if config.pooling == "concat" else width

    def forward(self, x: torch.Tensor, mask: torch.Tensor, standardize: nn.Module | None = None) -> torch.Tensor:
        x = _present_views(x, mask)
        tokens = self.project(self.input_norm(x if standardize is None else standardize(x)))
        tokens = torch.where(mask[..., None], tokens, self.absent)
        if self.directions is not None:
            tokens = tokens + self.directions
        attend = mask | ~mask.any(dim=1, keepdim=True)  # all-missing rows: attend over the absent tokens
        out = self.encoder(tokens, src_key_padding_mask=~attend)
        if self.pooling == "concat":
            return out.flatten(1)
        weights = attend.to(out.dtype)[..., None]
        return (out * weights).sum(dim=1) / weights.sum(dim=1)


FUSIONS: dict[str, type[nn.Module]] = {
    "transformer": TransformerFusion, "mean": MeanFusion, "attention": AttentionFusion, "concat": ConcatFusion,
}


def build_fusion(config: FusionConfig, input_dim: int) -> nn.Module:
    if config.kind not in FUSIONS:
        raise ConfigError(f"unknown fusion {config.kind!r}; available: {sorted(FUSIONS)}")
    return FUSIONS[config.kind](config, input_dim)
