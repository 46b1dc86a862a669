"""What makes a Scout a classifier for the loop: batches from fp16 features, cross-entropy over geocells
(hard or haversine-smoothed targets), top-5 states + the anchor cell's centroid."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .geocells import Geocells
from .smoothing import haversine_soft_targets
from .training import Batch, Prediction, top5_from_logits


def view_batch(features: np.ndarray, masks: np.ndarray, rows: np.ndarray, device: torch.device) -> Batch:
    # Only this batch is converted to float32: the split stays fp16 in RAM.
    return {
        "x": torch.from_numpy(np.ascontiguousarray(features[rows])).to(device).float(),
        "mask": torch.from_numpy(np.ascontiguousarray(masks[rows])).to(device),
    }


class ClassifierObjective:
    """`cell_id` and `latlon` are the training targets of every row (validation rows are scored, not fitted)."""

    def __init__(self, features: np.ndarray, masks: np.ndarray, cell_id: np.ndarray, latlon: np.ndarray, geocells: Geocells,
                 *, label_smoothing: float, haversine_tau_km: float, haversine_within_state: bool):
        self.features, self.masks, self.cell_id, self.latlon = features, masks, cell_id, latlon
        self.geocells = geocells
        self.label_smoothing = label_smoothing
        self.haversine_tau_km = haversine_tau_km
        self.smoothing_group = geocells.cell_class if haversine_within_state else None

    def batch(self, rows: np.ndarray, device: torch.device) -> Batch:
        batch = {**view_batch(self.features, self.masks, rows, device), "y": torch.from_numpy(self.cell_id[rows]).to(device)}
        if self.haversine_tau_km:
            targets = haversine_soft_targets(self.latlon[rows], self.cell_id[rows], self.geocells.centroids,
                                             tau_km=self.haversine_tau_km, group=self.smoothing_group)
            batch["y"] = torch.from_numpy(targets).to(device)
        return batch

    def loss(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(module(batch["x"], batch["mask"]), batch["y"], label_smoothing=self.label_smoothing)

    def predict(self, module: nn.Module, batch: Batch) -> Prediction:
        logits = module(batch["x"], batch["mask"])
        cell, _ = self.geocells.anchor_cells(logits)
        latlon = self.geocells.centroids[cell]
        return Prediction(top5_from_logits(self.geocells.class_logits(logits)), latlon[:, 0], latlon[:, 1])


def classifier_outputs(
    module: nn.Module, features: np.ndarray, masks: np.ndarray, *, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, C) float32, fused descriptors (N, d) float16) for every row, in eval mode.

    Descriptors are kept in fp16 like the features (the seed's concatenation is 4*D wide); the Sniper
    trains and predicts on the same rounded values.
    """
    module.eval()
    logits, descriptors = [], []
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            batch = view_batch(features, masks, np.arange(start, min(start + batch_size, len(features))), device)
            d = module.describe(batch["x"], batch["mask"])
            logits.append(module.head(d).float().cpu().numpy())
            descriptors.append(d.half().cpu().numpy())
    return np.concatenate(logits), np.concatenate(descriptors)
