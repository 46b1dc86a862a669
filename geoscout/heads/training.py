"""The one training loop every head uses; heads differ by module, objective and config.

The budget is counted in optimiser steps, with a floor, so a head trains to convergence whether it
sees 150 or 2,000 rows per state: a small split gets many passes, a large one a few. The loop
evaluates the held-out rows' loss (NLL for classifiers, km for the regressor) every few steps, stops
when it has not improved for `patience` evaluations, and restores the best weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..competition import NO_PREDICTION


@dataclass
class TrainConfig:
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.05  # AdamW's, on weight matrices and embedding tables only
    max_epochs: float = 30.0  # the budget: at most this many passes over the training rows ...
    min_steps: int = 400  # ... but never fewer optimiser steps than this (small splits)
    max_steps: int = 20_000  # ... and never more (a cap for very large splits)
    evaluations_per_epoch: float = 2.0  # held-out evaluations per pass (at least one every `max_eval_interval` steps)
    max_eval_interval: int = 100
    patience: int = 6  # evaluations without a better held-out loss before stopping
    # "Better" means lower by more than this fraction: a convex probe creeping down by 1e-5 has converged.
    min_improvement: float = 1e-3
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.02  # the cosine schedule ends at lr * this
    grad_clip: float = 1.0  # 0: no clipping
    eval_batch_size: int = 4096
    max_eval_rows: int = 4096  # early stopping reads at most this many held-out rows (a fixed sample): enough to
    # tell better from worse, and evaluating 12,000 rows every 46 steps cost as much as training at scale

    def batch_size_for(self, n_rows: int) -> int:
        """At least 8 batches per pass: a 512 batch over 600 rows would be one noisy step per epoch."""
        return int(max(1, min(self.batch_size, max(32, n_rows // 8))))

    def budget(self, n_rows: int) -> int:
        steps_per_epoch = max(1, n_rows // self.batch_size_for(n_rows))
        return int(min(self.max_steps, max(self.min_steps, math.ceil(self.max_epochs * steps_per_epoch))))

    def eval_interval(self, n_rows: int) -> int:
        steps_per_epoch = max(1, n_rows // self.batch_size_for(n_rows))
        return int(max(1, min(self.max_eval_interval, round(steps_per_epoch / self.evaluations_per_epoch))))


class Prediction(NamedTuple):
    top5: np.ndarray  # (N, 5) class ids, NO_PREDICTION where there are fewer than 5 classes
    lat: np.ndarray  # (N,) degrees
    lon: np.ndarray


Batch = dict[str, torch.Tensor]


class Objective(Protocol):
    """How rows become a batch and a loss. `batch(..., train=True)` may augment (e.g. drop views)."""

    def batch(self, rows: np.ndarray, device: torch.device, *, train: bool) -> Batch: ...
    def loss(self, module: nn.Module, batch: Batch) -> torch.Tensor: ...
    def heldout_loss(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-row loss on held-out rows, shape (B,): what early stopping minimises."""


@dataclass
class FitResult:
    best_step: int  # 0: the untrained module was never beaten
    best_loss: float  # mean held-out loss of the kept weights
    steps_run: int
    budget: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # {"step", "train_loss", "heldout_loss"}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch for module init and dropout without leaving the caller's global RNG changed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def top5_from_logits(logits: torch.Tensor) -> np.ndarray:
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices.cpu().numpy()
    out = np.full((len(top), 5), NO_PREDICTION, dtype=np.int64)
    out[:, :k] = top
    return out


def heldout_loss(module: nn.Module, objective: Objective, rows: np.ndarray, *, batch_size: int,
                 device: torch.device) -> float:
    """The evaluator: mean per-row held-out loss of `rows`, in eval mode."""
    module.eval()
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = objective.batch(rows[start:start + batch_size], device, train=False)
            total += float(objective.heldout_loss(module, batch).double().sum())
    return total / max(len(rows), 1)


def _lr_factor(step: int, total: int, config: TrainConfig) -> float:
    warmup = max(1, round(config.warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return config.min_lr_fraction + (1 - config.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _optimizer(module: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # Weight decay on weight matrices and embedding tables only; decaying norm gains and biases only hurts.
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr)


def _shuffled_batches(rng: np.random.Generator, rows: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    # Whole batches only (BatchNorm cannot train on one row); with fewer rows than a batch, all of them.
    # Sorted rows make the fp16 gather from the feature arrays cache-friendly.
    while True:
        order = rng.permutation(rows)
        count = max(1, len(order) // batch_size)
        for i in range(count):
            yield np.sort(order[i * batch_size:(i + 1) * batch_size])


def fit(
    module: nn.Module,
    objective: Objective,
    *,
    train_rows: np.ndarray,
    heldout_rows: np.ndarray,
    config: TrainConfig,
    seed: int,
    device: torch.device,
    desc: str,
    progress: bool = True,
) -> FitResult:
    """Train with AdamW + warmup/cosine over the step budget; keep the weights with the lowest held-out loss.

    The untrained module is evaluated first, so a head that never improves (a regressor that cannot beat
    the centroid it starts at) is returned as it started. Shuffling uses its own generator seeded by
    `seed`; seed torch (see `seeded`) before building the module for bitwise-reproducible weights.
    """
    if len(heldout_rows) == 0:
        raise ValueError("no held-out rows: early stopping needs some")
    started = time.perf_counter()
    module.to(device)
    rng = np.random.default_rng(seed)
    batch_size = config.batch_size_for(len(train_rows))
    total = config.budget(len(train_rows))
    interval = config.eval_interval(len(train_rows))
    optimizer = _optimizer(module, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, total, config))

    watched = heldout_rows
    if len(heldout_rows) > config.max_eval_rows:
        watched = np.sort(rng.choice(heldout_rows, config.max_eval_rows, replace=False))

    def evaluate() -> float:
        return heldout_loss(module, objective, watched, batch_size=config.eval_batch_size, device=device)

    best_loss = evaluate()
    best_state, best_step = copy.deepcopy(module.state_dict()), 0
    history = [{"step": 0, "train_loss": float("nan"), "heldout_loss": best_loss}]
    since_best, running, step = 0, 0.0, 0
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)
    module.train()
    for step, rows in enumerate(_shuffled_batches(rng, train_rows, batch_size), start=1):
        loss = objective.loss(module, objective.batch(rows, device, train=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(module.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        running = loss.item() if step == 1 else 0.9 * running + 0.1 * loss.item()
        bar.update()
        if step % interval == 0 or step == total:
            current = evaluate()
            module.train()
            history.append({"step": step, "train_loss": running, "heldout_loss": current})
            if current < best_loss:
                since_best = 0 if current < best_loss * (1 - config.min_improvement) else since_best + 1
                best_loss, best_state, best_step = current, copy.deepcopy(module.state_dict()), step
            else:
                since_best += 1
            bar.set_postfix(loss=f"{running:.4f}", heldout=f"{current:.4f}", best=f"{best_loss:.4f}", refresh=False)
            if since_best >= config.patience:
                break
        if step >= total:
            break
    bar.close()
    module.load_state_dict(best_state)
    module.eval()
    return FitResult(best_step, best_loss, step, total, time.perf_counter() - started, history)
