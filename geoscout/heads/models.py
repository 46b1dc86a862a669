"""The two head modules: Scout (views -> class logits) and Sniper (Scout's outputs -> offset from a centroid)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from .fusion import FusionConfig, build_fusion
from .training import TrainConfig

NORMS: dict[str, type[nn.Module]] = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}


@dataclass
class ClassifierConfig:
    fusion: FusionConfig = field(default_factory=FusionConfig)
    hidden: int = 512  # 0: a single linear layer from the fused descriptor to the logits
    norm: str = "layer"  # a key of NORMS; "batch" is the seed's
    dropout: float = 0.3
    label_smoothing: float = 0.1
    # Geocells: the classes become about this many cells, k-means inside each state, proportional to
    # its training rows (see geocells.py); 0: one cell per state.
    geocells: int = 0
    min_cell_rows: int = 30  # no state is cut into cells of fewer training rows than this on average
    # Haversine label smoothing (PIGEON): soft targets exp(-(d_i - d_true) / tau) over the cells; 0: off.
    haversine_tau_km: float = 0.0
    # Smooth only over the cells of the true state (needs geocells): mass spread across a border
    # teaches the classifier to confuse neighbouring states, which is 70% of the score.
    haversine_within_state: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class RegressorConfig:
    state_embedding_dim: int = 64
    append_confidence: bool = True  # the confidence as an input of its own, besides scaling the state embedding
    hidden: int = 512
    blocks: int = 2  # residual MLP blocks
    dropout: float = 0.1
    # One unit of network output is this many degrees: the near-zero last layer then starts at the
    # centroid and the optimiser moves in steps of a sensible size.
    offset_scale_deg: float = 5.0
    # The cell whose centroid the offset starts from while training: "predicted" (the classifier's
    # top cell, the seed's) or "true" (the location's own cell, so the offset of any cell means
    # "where inside this cell", which is what expected-distance decoding asks of every candidate).
    anchor: str = "predicted"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, epochs=10))


class Scout(nn.Module):
    """Fusion -> MLP -> one logit per class. `describe` gives the fused descriptor the Sniper reads."""

    def __init__(self, config: ClassifierConfig, input_dim: int, num_classes: int):
        super().__init__()
        if config.norm not in NORMS:
            raise ConfigError(f"unknown norm {config.norm!r}; available: {sorted(NORMS)}")
        self.fusion = build_fusion(config.fusion, input_dim)
        d = self.fusion.out_dim
        if config.hidden == 0:
            self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(d, num_classes))
        else:
            self.head = nn.Sequential(
                nn.Linear(d, config.hidden), NORMS[config.norm](config.hidden), nn.SiLU(),
                nn.Dropout(config.dropout), nn.Linear(config.hidden, num_classes),
            )
        self.descriptor_dim = d

    def describe(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fusion(x, mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.describe(x, mask))


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Dropout(dropout), nn.Linear(width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


ANCHORS = ("predicted", "true")


class Sniper(nn.Module):
    """(descriptor, a cell, its probability) -> (dlat, dlon) in degrees from that cell's centroid."""

    def __init__(self, config: RegressorConfig, descriptor_dim: int, num_classes: int):
        super().__init__()
        if config.anchor not in ANCHORS:
            raise ConfigError(f"unknown regressor anchor {config.anchor!r}; available: {list(ANCHORS)}")
        self.append_confidence = config.append_confidence
        self.offset_scale_deg = config.offset_scale_deg
        self.descriptor_norm = nn.LayerNorm(descriptor_dim)
        self.state_embedding = nn.Embedding(num_classes, config.state_embedding_dim)
        in_dim = descriptor_dim + config.state_embedding_dim + int(config.append_confidence)
        self.body = nn.Sequential(
            nn.Linear(in_dim, config.hidden),
            *(_ResidualBlock(config.hidden, config.dropout) for _ in range(config.blocks)),
            nn.LayerNorm(config.hidden), nn.SiLU(),
        )
        self.out = nn.Linear(config.hidden, 2)
        nn.init.normal_(self.out.weight, std=1e-4)
        nn.init.zeros_(self.out.bias)

    def forward(self, descriptor: torch.Tensor, top1: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        parts = [self.descriptor_norm(descriptor), self.state_embedding(top1) * confidence[:, None]]
        if self.append_confidence:
            parts.append(confidence[:, None])
        return self.out(self.body(torch.cat(parts, dim=1))) * self.offset_scale_deg


def apply_offset(centroids: torch.Tensor, top1: torch.Tensor, offset_deg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lat, lon) = centroid of the given cell + offset; latitude clamped, longitude wrapped to [-180, 180)."""
    base = centroids[top1]
    lat = (base[:, 0] + offset_deg[:, 0]).clamp(-90.0, 90.0)
    lon = torch.remainder(base[:, 1] + offset_deg[:, 1] + 180.0, 360.0) - 180.0
    return lat, lon
