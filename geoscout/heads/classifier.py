"""What makes a Scout a classifier for the loop: batches from fp16 features, cross-entropy, top-5 + centroid."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..geo import spherical_mean
from .training import Batch, Prediction, top5_from_logits


def class_centroids(class_id: np.ndarray, latlon: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, 2) spherical mean of each class's coordinates; a class without rows gets the overall mean."""
    overall = spherical_mean(latlon[:, 0], latlon[:, 1])
    out = np.empty((num_classes, 2))
    for c in range(num_classes):
        rows = class_id == c
        out[c] = spherical_mean(latlon[rows, 0], latlon[rows, 1]) if rows.any() else overall
    return out


def view_batch(features: np.ndarray, masks: np.ndarray, rows: np.ndarray, device: torch.device) -> Batch:
    # Only this batch is converted to float32: the split stays fp16 in RAM.
    return {
        "x": torch.from_numpy(np.ascontiguousarray(features[rows])).to(device).float(),
        "mask": torch.from_numpy(np.ascontiguousarray(masks[rows])).to(device),
    }


class ClassifierObjective:
    def __init__(self, features: np.ndarray, masks: np.ndarray, class_id: np.ndarray, centroids: np.ndarray, *, label_smoothing: float):
        self.features, self.masks, self.class_id = features, masks, class_id
        self.centroids = centroids
        self.label_smoothing = label_smoothing

    def batch(self, rows: np.ndarray, device: torch.device) -> Batch:
        return {**view_batch(self.features, self.masks, rows, device), "y": torch.from_numpy(self.class_id[rows]).to(device)}

    def loss(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(module(batch["x"], batch["mask"]), batch["y"], label_smoothing=self.label_smoothing)

    def predict(self, module: nn.Module, batch: Batch) -> Prediction:
        top5 = top5_from_logits(module(batch["x"], batch["mask"]))
        latlon = self.centroids[top5[:, 0]]
        return Prediction(top5, latlon[:, 0], latlon[:, 1])


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
