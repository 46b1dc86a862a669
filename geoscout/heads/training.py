"""The one training loop and the one evaluator every head uses; heads differ by module, objective and config.

An objective says how rows become a batch, what the loss is, and how outputs become predictions
(top-5 class ids + coordinates). Validation is always the competition score of those predictions.
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
from ..metric import score_predictions


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.02  # the cosine schedule ends at lr * this
    grad_clip: float = 1.0  # 0: no clipping
    patience: int = 3  # epochs without a better validation score before stopping
    eval_batch_size: int = 4096
    # Small datasets get smaller batches so every epoch still takes this many optimiser steps
    # (a 1024 batch over 500 rows would train for one step an epoch). 0: always batch_size.
    min_steps_per_epoch: int = 0

    def batch_size_for(self, n_rows: int) -> int:
        if not self.min_steps_per_epoch:
            return self.batch_size
        return max(1, min(self.batch_size, max(32, n_rows // self.min_steps_per_epoch)))


class Prediction(NamedTuple):
    top5: np.ndarray  # (N, 5) class ids, NO_PREDICTION where there are fewer than 5 classes
    lat: np.ndarray  # (N,) degrees
    lon: np.ndarray


Batch = dict[str, torch.Tensor]


class Objective(Protocol):
    def batch(self, rows: np.ndarray, device: torch.device) -> Batch: ...
    def loss(self, module: nn.Module, batch: Batch) -> torch.Tensor: ...
    def predict(self, module: nn.Module, batch: Batch) -> Prediction: ...


@dataclass
class Truth:
    class_id: np.ndarray
    latlon: np.ndarray  # (N, 2) degrees


@dataclass
class FitResult:
    best_epoch: int  # 0: the untrained module was never beaten
    best_metrics: dict[str, float]
    epochs_run: int
    seconds: float
    history: list[dict] = field(default_factory=list)


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


def predict_rows(module: nn.Module, objective: Objective, rows: np.ndarray, *, batch_size: int, device: torch.device) -> Prediction:
    """The evaluator: the module's predictions for `rows`, in eval mode, batch by batch."""
    module.eval()
    parts = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            parts.append(objective.predict(module, objective.batch(rows[start : start + batch_size], device)))
    return Prediction(*(np.concatenate([p[i] for p in parts]) for i in range(3)))


def score(prediction: Prediction, truth: Truth) -> dict[str, float]:
    return score_predictions(
        truth.class_id, truth.latlon[:, 0], truth.latlon[:, 1], prediction.top5, prediction.lat, prediction.lon
    )


def _lr_factor(step: int, total: int, config: TrainConfig) -> float:
    warmup = max(1, round(config.warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return config.min_lr_fraction + (1 - config.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(module: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # Weight decay on weight matrices and embedding tables only; decaying norm gains and biases only hurts.
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr)


def _batches(rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    # Drop the last partial batch (BatchNorm cannot train on one row); with fewer rows than a batch,
    # train on them all. Sorted rows make the fp16 gather from the feature store cache-friendly.
    count = max(1, len(rows) // batch_size)
    return [np.sort(rows[i * batch_size : (i + 1) * batch_size]) for i in range(count)]


def fit(
    module: nn.Module,
    objective: Objective,
    *,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    val_truth: Truth,
    config: TrainConfig,
    seed: int,
    device: torch.device,
    desc: str,
    progress: bool = True,
) -> FitResult:
    """Train with AdamW + warmup/cosine; keep the weights with the best validation competition score.

    The untrained module is scored first, so a head that never improves (a regressor that cannot beat
    the centroid it starts at) is returned as it started. Shuffling uses its own generator seeded by
    `seed`; seed torch (see `seeded`) before building the module for bitwise-reproducible weights.
    """
    if len(val_rows) == 0:
        raise ValueError("no validation rows: early stopping and model selection need some")
    started = time.perf_counter()
    module.to(device)
    rng = np.random.default_rng(seed)
    batch_size = config.batch_size_for(len(train_rows))
    steps_per_epoch = len(_batches(train_rows, batch_size))
    total = steps_per_epoch * config.epochs
    optimizer = _optimizer(module, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, total, config))

    def validate() -> dict[str, float]:
        return score(predict_rows(module, objective, val_rows, batch_size=config.eval_batch_size, device=device), val_truth)

    best_metrics = validate()
    best_state, best_epoch, history = copy.deepcopy(module.state_dict()), 0, [{"epoch": 0, **best_metrics}]
    epoch = 0
    bar = tqdm(total=total, desc=desc, unit="batch", disable=not progress)
    for epoch in range(1, config.epochs + 1):
        module.train()
        running = 0.0
        for step, rows in enumerate(_batches(rng.permutation(train_rows), batch_size), start=1):
            loss = objective.loss(module, objective.batch(rows, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(module.parameters(), config.grad_clip)
            optimizer.step()
            schedule.step()
            running += (loss.item() - running) / step
            bar.update()
            bar.set_postfix(loss=f"{running:.4f}", val=f"{best_metrics['score']:.4f}", refresh=False)
        metrics = validate()
        history.append({"epoch": epoch, "train_loss": running, **metrics})
        if metrics["score"] > best_metrics["score"]:
            best_metrics, best_state, best_epoch = metrics, copy.deepcopy(module.state_dict()), epoch
        bar.set_postfix(loss=f"{running:.4f}", val=f"{metrics['score']:.4f}", best=f"{best_metrics['score']:.4f}")
        if epoch - best_epoch >= config.patience:
            break
    bar.close()
    module.load_state_dict(best_state)
    module.eval()
    return FitResult(best_epoch, best_metrics, epoch, time.perf_counter() - started, history)
