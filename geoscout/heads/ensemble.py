"""Logit-level ensemble of two classifiers: alpha * z_A / T_A + (1 - alpha) * z_B / T_B."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .decode import DecodeConfig
from .geocells import Geocells


@dataclass
class EnsembleConfig:
    alpha: float | None = None  # the first member's weight; None: the best on validation over the grid
    alpha_steps: int = 21  # grid 0, 1/(steps-1), ..., 1
    temperature: bool = True  # divide each member's logits by a temperature fitted on validation (NLL)
    first_member: str = "clip"  # the member whose backbone name contains this (if exactly one) is A
    # Flip test-time augmentation (tta.py): "none", "swap" (mirrored East view in the West slot) or
    # "naive"; used where the store has features_flip (extract --flip), else left out with a warning.
    flip_tta: str = "none"
    decode: DecodeConfig = field(default_factory=DecodeConfig)


def member_order(backbones: list[str], first_member: str) -> list[str]:
    """The two members as [A, B]: A is the one whose name contains `first_member`, else the first given."""
    if len(backbones) != 2:
        raise ValueError(f"the ensemble combines exactly two classifiers; got {len(backbones)}: {backbones}")
    matches = [b for b in backbones if first_member.lower() in b.lower()]
    first = matches[0] if len(matches) == 1 else backbones[0]
    return [first, *(b for b in backbones if b != first)]


def fit_temperature(logits: np.ndarray, class_id: np.ndarray, geocells: Geocells) -> float:
    """The temperature of the cell logits minimising the validation NLL of the true states, on a log
    grid from 0.05 to 20 (deterministic, no optimiser)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(class_id)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 241))
    nll = [F.cross_entropy(geocells.class_logits(z / t), y).item() for t in grid]
    return float(grid[int(np.argmin(nll))])


def combine_logits(logits_a: np.ndarray, logits_b: np.ndarray, *, alpha: float, temperatures: tuple[float, float]) -> np.ndarray:
    return alpha * logits_a / temperatures[0] + (1 - alpha) * logits_b / temperatures[1]


def alpha_curve(
    logits_a: np.ndarray, logits_b: np.ndarray, *, temperatures: tuple[float, float], steps: int,
    score: Callable[[np.ndarray], dict[str, float]],
) -> list[dict[str, float]]:
    """`score(combined_logits)` (the metrics dict) at each alpha of the grid, as rows {"alpha", **metrics}."""
    return [
        {"alpha": float(a), **score(combine_logits(logits_a, logits_b, alpha=float(a), temperatures=temperatures))}
        for a in np.linspace(0.0, 1.0, steps)
    ]


def best_alpha(curve: list[dict[str, float]]) -> float:
    # Ties go to the alpha nearest 0.5: equal scores say nothing to prefer one member over the mix.
    best = max(row["score"] for row in curve)
    return min((row["alpha"] for row in curve if row["score"] == best), key=lambda a: abs(a - 0.5))
