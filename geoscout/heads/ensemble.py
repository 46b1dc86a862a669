"""The ensemble: any number of members, one temperature each, weights on the simplex, all fitted on
out-of-fold outputs.

Each member's logits are divided by its temperature (fitted alone, by OOF NLL), turned into state
log-probabilities, and pooled log-linearly: log p(s) = sum_m w_m log p_m(s) + const, with w on the
simplex minimising the pooled OOF NLL. Positions need more than states: the members that predict
geocells finer than states (classifiers with geocells) give the distribution of cells inside each
state, q(c | s), from the mean of their tempered cell logits; the ensemble's cell log-probability is
log p(s) + log q(c | s). Without such members every state is one cell at its centroid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .decode import DecodeConfig
from .geocells import Geocells
from .tta import check_tta

TEMPERATURE_RANGE = (0.05, 20.0)
GOLDEN_STEPS = 20  # the bracket of log T shrinks to 6.0 * 0.618^20 = 0.0004: below what the NLL can tell apart
WEIGHT_ITERATIONS = 200


@dataclass
class EnsembleConfig:
    # "fit": simplex weights minimising the OOF NLL; "fixed": `fixed_weights`, one per member in order
    # (the seed's 0.6 / 0.4), normalised to sum to 1.
    weights: str = "fit"
    fixed_weights: tuple[float, ...] = ()
    temperature: bool = True  # a temperature per member fitted on its OOF NLL; False: all 1
    # Flip test-time augmentation (tta.py): "none", "swap" (mirrored East view in the West slot) or
    # "naive"; used where the store has features_flip (extract --flip), else left out with a warning.
    flip_tta: str = "none"
    regressor: str = "auto"  # "auto": kept when it lowers the OOF mean km; "on"; "off"
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def __post_init__(self) -> None:
        if self.weights not in ("fit", "fixed"):
            raise ConfigError(f"ensemble weights {self.weights!r}; choose 'fit' or 'fixed'")
        if self.regressor not in ("auto", "on", "off"):
            raise ConfigError(f"ensemble regressor {self.regressor!r}; choose 'auto', 'on' or 'off'")
        check_tta(self.flip_tta)


def state_log_probs(cell_logits: np.ndarray | torch.Tensor, geocells: Geocells, temperature: float = 1.0) -> torch.Tensor:
    """(N, C) float64 state log-probabilities of tempered cell logits."""
    z = torch.as_tensor(cell_logits, dtype=torch.float64) / temperature
    return torch.log_softmax(geocells.class_logits(z), dim=1)


def fit_temperature(cell_logits: np.ndarray, geocells: Geocells, class_id: np.ndarray) -> float:
    """The temperature minimising the state NLL: golden-section search on log T (the NLL is unimodal in T)."""
    z = torch.as_tensor(cell_logits, dtype=torch.float64)
    y = torch.as_tensor(class_id)

    def nll(log_t: float) -> float:
        return F.nll_loss(state_log_probs(z, geocells, math.exp(log_t)), y).item()

    a, b = math.log(TEMPERATURE_RANGE[0]), math.log(TEMPERATURE_RANGE[1])
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(GOLDEN_STEPS):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    return float(math.exp((a + b) / 2))


def pool(log_probs: list[torch.Tensor], weights: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, C) log-linear pool: log_softmax(sum_m w_m log p_m)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    return torch.log_softmax(sum(wm * lp for wm, lp in zip(w, log_probs)), dim=1)


def fit_weights(log_probs: list[torch.Tensor], class_id: np.ndarray) -> np.ndarray:
    """Simplex weights (softmax of free parameters) minimising the pooled NLL, by L-BFGS from equal weights."""
    if len(log_probs) == 1:
        return np.ones(1)
    y = torch.as_tensor(class_id)
    theta = torch.zeros(len(log_probs), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=WEIGHT_ITERATIONS, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.nll_loss(pool(log_probs, torch.softmax(theta, dim=0)), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return torch.softmax(theta.detach(), dim=0).numpy()


def fine_cells(geocells: list[Geocells]) -> tuple[Geocells | None, list[int]]:
    """The geocells finer than states shared by the members that have them, and which members those are.

    Members with one cell per state (probes, classifiers without geocells) pool at the state level
    only; members with finer cells must all have the same cells, or their cell logits cannot be averaged.
    """
    fine = [i for i, g in enumerate(geocells) if len(g) > g.num_classes]
    if not fine:
        return None, []
    first = geocells[fine[0]]
    for i in fine[1:]:
        if geocells[i] != first:
            raise ConfigError(
                f"two members predict different geocells ({len(first)} and {len(geocells[i])} cells): train the "
                "classifiers of one ensemble with the same geocells settings"
            )
    return first, fine


def joint_cell_logits(state_logp: torch.Tensor, cell_logits: list[np.ndarray], temperatures: list[float],
                      geocells: Geocells) -> np.ndarray:
    """(N, K) log p(s) + log q(c | s): the pooled states spread over the cells inside each state, q from
    the mean of the fine members' tempered cell logits."""
    pooled = torch.stack([torch.as_tensor(z, dtype=torch.float64) / t for z, t in zip(cell_logits, temperatures)]).mean(dim=0)
    index = torch.as_tensor(geocells.cell_class)
    within = pooled - geocells.class_logits(pooled)[:, index]
    return (state_logp[:, index] + within).numpy()
