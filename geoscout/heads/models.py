"""The head modules and their configs: Scout (views -> cell logits), Probe (view mean -> state logits,
a standardised multinomial logistic regression) and Sniper (descriptor + a cell -> offset from its centroid).

Each module starts with a `Standardize` whose statistics come from its training rows, so a head file
holds everything needed to apply it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .fusion import FusionConfig, build_fusion
from .inputs import Standardize
from .training import TrainConfig

NORMS: dict[str, type[nn.Module]] = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}
ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}


def _choice(table: dict, key: str, what: str):
    if key not in table:
        raise ConfigError(f"unknown {what} {key!r}; available: {sorted(table)}")
    return table[key]


@dataclass
class ClassifierConfig:
    fusion: FusionConfig = field(default_factory=FusionConfig)
    hidden: int = 512  # 0: a single linear layer from the fused descriptor to the logits
    norm: str = "layer"  # a key of NORMS; "batch" is the seed's
    activation: str = "silu"  # a key of ACTIVATIONS
    dropout: float = 0.3
    linear_skip: bool = False  # a linear path from the descriptor to the logits beside the MLP
    label_smoothing: float = 0.0
    # Geocells: the classes become about this many cells, k-means inside each state, proportional to
    # its training rows (see geocells.py); 0: one cell per state.
    geocells: int = 0
    min_cell_rows: int = 30  # no state is cut into cells of fewer training rows than this on average
    # Haversine label smoothing (PIGEON): soft targets exp(-(d_i - d_true) / tau) over the cells; 0: off.
    haversine_tau_km: float = 0.0
    # Smooth only over the cells of the true state (needs geocells): mass spread across a border
    # teaches the classifier to confuse neighbouring states, which is 70% of the score.
    haversine_within_state: bool = True
    view_dropout: float = 0.0  # training augmentation: each view hidden with this probability
    # The store datasets it reads, side by side: "features", and with `extract --layers K` also "layers"
    # (the class token of each of the last K blocks) and "patch_mean" (DINOv2's linear-evaluation inputs).
    inputs: tuple[str, ...] = ("features",)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class ProbeConfig:
    """A standardised multinomial logistic regression on the mean of a location's views (DINOv2's linear
    evaluation). Its L2 strength (per row: the loss is mean cross-entropy + l2/2 * |W|^2, sklearn's
    C = 1 / (l2 * rows)) is chosen among `l2` by the out-of-fold NLL of the training rows."""

    l2: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    inputs: tuple[str, ...] = ("features",)  # the store datasets it reads (see ClassifierConfig.inputs)
    # Warm-started along the l2 path, it is best within tens of steps at any scale: evaluated at least every
    # 10 steps, patience waits 60 steps past the best rather than 6 half-epochs (138 steps at 47,000 rows).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-2, weight_decay=0.0, batch_size=1024,
                                                                   max_eval_interval=10))


@dataclass
class RegressorConfig:
    state_embedding_dim: int = 64
    append_confidence: bool = True  # the confidence as an input of its own, besides scaling the cell embedding
    hidden: int = 512
    blocks: int = 2  # residual MLP blocks
    dropout: float = 0.1
    # One unit of network output is this many degrees: the near-zero last layer then starts at the
    # centroid and the optimiser moves in steps of a sensible size.
    offset_scale_deg: float = 5.0
    # The cell whose centroid the offset starts from while training: "predicted" (the ensemble's anchor
    # cell, the seed's) or "true" (the location's own cell, so the offset of any cell means "where inside
    # this cell", which is what expected-distance decoding asks of every candidate).
    anchor: str = "predicted"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, max_epochs=20))


class Scout(nn.Module):
    """Standardise -> fusion -> MLP -> one logit per cell. `describe` gives the fused descriptor."""

    def __init__(self, config: ClassifierConfig, input_dim: int, num_cells: int):
        super().__init__()
        norm = _choice(NORMS, config.norm, "norm")
        activation = _choice(ACTIVATIONS, config.activation, "activation")
        self.standardize = Standardize(input_dim)
        self.fusion = build_fusion(config.fusion, input_dim)
        d = self.fusion.out_dim
        if config.hidden == 0:
            self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(d, num_cells))
        else:
            self.head = nn.Sequential(
                nn.Linear(d, config.hidden), norm(config.hidden), activation(),
                nn.Dropout(config.dropout), nn.Linear(config.hidden, num_cells),
            )
        self.skip = nn.Linear(d, num_cells) if config.linear_skip else None
        self.descriptor_dim = d

    def describe(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fusion(x, mask, self.standardize)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        d = self.describe(x, mask)
        logits = self.head(d)
        return logits if self.skip is None else logits + self.skip(d)


class Probe(nn.Module):
    """Standardised view mean -> one logit per state. A location without any view has a zero mean,
    which standardises to the training mean's negative: the probe still answers (with its prior)."""

    def __init__(self, input_dim: int, num_classes: int):
        super().__init__()
        self.standardize = Standardize(input_dim)
        self.linear = nn.Linear(input_dim, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.standardize(x))


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

    def __init__(self, config: RegressorConfig, descriptor_dim: int, num_cells: int):
        super().__init__()
        _choice({a: a for a in ANCHORS}, config.anchor, "regressor anchor")
        self.append_confidence = config.append_confidence
        self.offset_scale_deg = config.offset_scale_deg
        self.standardize = Standardize(descriptor_dim)
        self.cell_embedding = nn.Embedding(num_cells, config.state_embedding_dim)
        in_dim = descriptor_dim + config.state_embedding_dim + int(config.append_confidence)
        self.body = nn.Sequential(
            nn.Linear(in_dim, config.hidden),
            *(_ResidualBlock(config.hidden, config.dropout) for _ in range(config.blocks)),
            nn.LayerNorm(config.hidden), nn.SiLU(),
        )
        self.out = nn.Linear(config.hidden, 2)
        nn.init.normal_(self.out.weight, std=1e-4)
        nn.init.zeros_(self.out.bias)

    def forward(self, descriptor: torch.Tensor, cell: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """descriptor (B, D) with cell and confidence (B,) -> (B, 2); or (B, k) each, k candidate cells of
        one location -> (B, k, 2). The first layer is applied in two parts, descriptor and cell, so the
        k candidates of a location share its descriptor's part (computed once, not k times)."""
        first = self.body[0]
        width = descriptor.shape[1]
        hidden = F.linear(self.standardize(descriptor), first.weight[:, :width], first.bias)
        cells = [self.cell_embedding(cell) * confidence[..., None]]
        if self.append_confidence:
            cells.append(confidence[..., None])
        hidden = (hidden[:, None, :] if cell.ndim == 2 else hidden) + F.linear(torch.cat(cells, dim=-1), first.weight[:, width:])
        return self.out(self.body[1:](hidden)) * self.offset_scale_deg


def apply_offset(centroids: torch.Tensor, cell: torch.Tensor, offset_deg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lat, lon) = centroid of the given cell + offset; latitude clamped, longitude wrapped to [-180, 180)."""
    base = centroids[cell]
    lat = (base[:, 0] + offset_deg[:, 0]).clamp(-90.0, 90.0)
    lon = torch.remainder(base[:, 1] + offset_deg[:, 1] + 180.0, 360.0) - 180.0
    return lat, lon
