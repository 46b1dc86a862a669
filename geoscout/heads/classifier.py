"""What makes a Scout or a Probe trainable by the loop: batches, losses, and their outputs on any rows.

Classifiers (Scouts) predict geocells with cross-entropy over hard or haversine-smoothed targets and
are early-stopped on the held-out rows' state NLL; probes predict states with cross-entropy plus an
explicit L2 penalty (a logistic regression), early-stopped the same way.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .geocells import Geocells
from .inputs import Views, drop_views
from .smoothing import haversine_soft_targets
from .training import Batch

TARGET_BLOCK = 8192


def view_batch(views: Views, rows: np.ndarray, device: torch.device) -> Batch:
    # Only this batch is converted to float32: the split stays fp16 in RAM.
    return {
        "x": torch.from_numpy(np.ascontiguousarray(views.features[rows])).to(device).float(),
        "mask": torch.from_numpy(np.ascontiguousarray(views.mask[rows])).to(device),
    }


class ClassifierObjective:
    """`cell_id` and `latlon` cover every row of `views`; only the rows the loop is given are read."""

    def __init__(self, views: Views, cell_id: np.ndarray, latlon: np.ndarray, geocells: Geocells, *,
                 label_smoothing: float, haversine_tau_km: float, haversine_within_state: bool, view_dropout: float,
                 seed: int = 0):
        self.views, self.cell_id, self.latlon, self.geocells = views, cell_id, latlon, geocells
        self.class_id = geocells.cell_class[cell_id]
        self.label_smoothing = label_smoothing
        self.view_dropout = view_dropout
        self.generator = torch.Generator().manual_seed(seed)
        self.soft_targets = None
        if haversine_tau_km:
            # Once per row, not per batch: the same targets every epoch.
            group = geocells.cell_class if haversine_within_state else None
            self.soft_targets = np.empty((len(cell_id), len(geocells)), dtype=np.float32)
            for start in range(0, len(cell_id), TARGET_BLOCK):
                part = slice(start, start + TARGET_BLOCK)
                self.soft_targets[part] = haversine_soft_targets(
                    latlon[part], cell_id[part], geocells.centroids, tau_km=haversine_tau_km, group=group)

    def batch(self, rows: np.ndarray, device: torch.device, *, train: bool) -> Batch:
        batch = view_batch(self.views, rows, device)
        if train and self.view_dropout:
            batch["mask"] = drop_views(batch["mask"].cpu(), self.view_dropout, self.generator).to(device)
        targets = self.cell_id[rows] if self.soft_targets is None else self.soft_targets[rows]
        batch["y"] = torch.from_numpy(targets).to(device)
        batch["class"] = torch.from_numpy(self.class_id[rows]).to(device)
        return batch

    def loss(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(module(batch["x"], batch["mask"]), batch["y"], label_smoothing=self.label_smoothing)

    def heldout_loss(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        class_logits = self.geocells.class_logits(module(batch["x"], batch["mask"]))
        return F.cross_entropy(class_logits, batch["class"], reduction="none")


class ProbeObjective:
    """Rows of `means` (N, D) float32 view means; `class_id` covers every row."""

    def __init__(self, means: np.ndarray, class_id: np.ndarray, *, l2: float):
        self.means, self.class_id, self.l2 = means, class_id, l2

    def batch(self, rows: np.ndarray, device: torch.device, *, train: bool) -> Batch:
        return {"x": torch.from_numpy(self.means[rows]).to(device), "class": torch.from_numpy(self.class_id[rows]).to(device)}

    def loss(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        penalty = 0.5 * self.l2 * module.linear.weight.square().sum()
        return F.cross_entropy(module(batch["x"]), batch["class"]) + penalty

    def heldout_loss(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(module(batch["x"]), batch["class"], reduction="none")


def scout_logits(module: nn.Module, views: Views, rows: np.ndarray, *, batch_size: int, device: torch.device) -> np.ndarray:
    """(len(rows), K) float32 cell logits, in eval mode."""
    module.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = view_batch(views, rows[start:start + batch_size], device)
            out.append(module(batch["x"], batch["mask"]).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def probe_logits(module: nn.Module, means: np.ndarray, rows: np.ndarray, *, batch_size: int, device: torch.device) -> np.ndarray:
    """(len(rows), C) float32 state logits, in eval mode."""
    module.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            x = torch.from_numpy(means[rows[start:start + batch_size]]).to(device)
            out.append(module(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
