"""What a head reads from the feature store: per-view features of one or more backbones, or their view means.

Every head standardises its inputs with statistics of its own training rows (kept in the head's
weights), because backbones differ wildly in scale and a linear probe or an MLP on raw CLIP features
trains poorly. Arrays stay fp16 in RAM; only batches become float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..index import masked_view_mean
from ..store.features import SplitFeatures

STATS_BLOCK = 8192
MIN_STD = 1e-6  # a constant dimension is divided by this instead of 0


# Features of one split, or a function giving them for a tuple of store datasets (heads may read
# datasets other than "features", e.g. the multi-layer "layers" and "patch_mean" of extract --layers K).
FeatureSource = SplitFeatures | Callable[[tuple[str, ...]], SplitFeatures]


def with_inputs(source: FeatureSource, inputs: tuple[str, ...] | list[str]) -> SplitFeatures:
    """The features holding exactly the datasets `inputs`, side by side, from a source."""
    inputs = tuple(inputs)
    if isinstance(source, SplitFeatures):
        if tuple(source.datasets) != inputs:
            raise ConfigError(f"these features hold the store datasets {list(source.datasets)}; the head reads "
                              f"{list(inputs)} (read_split(..., datasets=...) loads them)")
        return source
    return source(inputs)


@dataclass(frozen=True)
class Views:
    """Per-view features of a head's backbones: one (N, 4, D_b) fp16 array each, and the (N, 4) mask of
    views embedded by every one of them. `features` sets them side by side and `means` averages the
    views; both are computed on first use and kept (views_of hands out one Views per split and
    backbones, so a split's view means are computed once however many heads read them)."""

    parts: tuple[np.ndarray, ...]
    mask: np.ndarray
    # Per part, that backbone's own Views where its mask is this one (None where not): their means are
    # reused, so the view means of a backbone are computed once per split, alone or beside others.
    singles: tuple["Views | None", ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.parts, tuple) or any(np.ndim(p) != 3 for p in self.parts):
            raise TypeError("Views.parts is a tuple of (N, 4, D) arrays, one per backbone")

    def __len__(self) -> int:
        return len(self.mask)

    @property
    def dim(self) -> int:
        return sum(p.shape[2] for p in self.parts)

    @cached_property
    def features(self) -> np.ndarray:
        """(N, 4, sum D) fp16; a copy when there are several backbones."""
        return self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts, axis=2)

    @cached_property
    def means(self) -> np.ndarray:
        """(N, sum D) float32: the mean of each location's embedded views (zeros where none), backbone by
        backbone, so no side-by-side copy of the views is made."""
        out = np.empty((len(self), self.dim), dtype=np.float32)
        column = 0
        for i, part in enumerate(self.parts):
            width = part.shape[2]
            single = self.singles[i] if self.singles else None
            if single is not None:
                out[:, column:column + width] = single.means
            else:
                for start in range(0, len(self), STATS_BLOCK):
                    stop = min(start + STATS_BLOCK, len(self))
                    out[start:stop, column:column + width], _ = masked_view_mean(part, self.mask, start, stop)
            column += width
        return out


def views_of(split: SplitFeatures, backbones: tuple[str, ...] | list[str]) -> Views:
    """The views of these backbones in this split: the same object for the same split and backbones."""
    backbones = tuple(backbones)
    missing = [b for b in backbones if b not in split.features]
    if missing:
        raise ConfigError(f"no features of backbone(s) {missing} in the {split.split} split; available: {sorted(split.features)}")
    key = ("views", backbones)
    if key not in split.derived:
        if len(backbones) == 1:
            views = Views((split.features[backbones[0]],), split.masks[backbones[0]])
        else:
            mask = np.logical_and.reduce([split.masks[b] for b in backbones])
            singles = tuple(views_of(split, (b,)) if np.array_equal(split.masks[b], mask) else None for b in backbones)
            views = Views(tuple(split.features[b] for b in backbones), mask, singles)
        split.derived[key] = views
    return split.derived[key]


def flipped_views_of(split: SplitFeatures, backbones: tuple[str, ...] | list[str]) -> Views | None:
    """The mirrored views (extract --flip) in the same slots, or None when a backbone has none."""
    if any(b not in split.flipped for b in backbones):
        return None
    mask = np.logical_and.reduce([split.masks[b] for b in backbones])
    return Views(tuple(split.flipped[b] for b in backbones), mask)


def view_statistics(views: Views, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std over the embedded views of `rows` (float64 sums, in blocks)."""
    dim = views.features.shape[2]
    total, total_sq, count = np.zeros(dim), np.zeros(dim), 0
    rows = np.sort(rows)
    for start in range(0, len(rows), STATS_BLOCK):
        part = rows[start:start + STATS_BLOCK]
        x = views.features[part].astype(np.float64)[views.mask[part]]  # (present views, D)
        total += x.sum(axis=0)
        total_sq += np.square(x).sum(axis=0)
        count += len(x)
    return _mean_std(total, total_sq, count)


def row_statistics(x: np.ndarray, rows: np.ndarray, present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of the rows `rows` of a (N, D) array (only where `present`, if given);
    float64 sums, in blocks (a float64 copy of a (59,000, 2560) array and its square cost 10 s)."""
    part = np.sort(rows)
    if present is not None:
        part = part[present[part]]
    total, total_sq = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for start in range(0, len(part), STATS_BLOCK):
        values = x[part[start:start + STATS_BLOCK]].astype(np.float64)
        total += values.sum(axis=0)
        total_sq += np.square(values).sum(axis=0)
    return _mean_std(total, total_sq, len(part))


def _mean_std(total: np.ndarray, total_sq: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    if count == 0:
        raise ConfigError("no embedded view among the training rows: nothing to standardise")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.astype(np.float32), np.maximum(std, MIN_STD).astype(np.float32)


class Standardize(nn.Module):
    """(x - mean) / std over the last axis, with the training rows' statistics as buffers (saved in the head)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set_statistics(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def drop_views(mask: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training augmentation: each embedded view is hidden with probability p; a location keeps at least
    one of its views (its first embedded one when the draw would hide them all)."""
    if p <= 0:
        return mask
    keep = torch.rand(mask.shape, generator=generator, device=mask.device) >= p
    dropped = mask & keep
    emptied = mask.any(dim=1) & ~dropped.any(dim=1)
    first = torch.zeros_like(mask)
    first[torch.arange(len(mask), device=mask.device), mask.float().argmax(dim=1)] = True
    return torch.where(emptied[:, None], mask & first, dropped)
