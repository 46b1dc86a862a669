"""What makes a Sniper a regressor for the loop: inputs from a frozen Scout's outputs, haversine loss."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..geo import haversine_km_torch
from .models import apply_offset
from .training import Batch, Prediction


def softmax_top1(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 class id, its softmax probability) per row."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    top1 = p.argmax(axis=1)
    return top1, p[np.arange(len(p)), top1].astype(np.float32)


class RegressorObjective:
    """Rows index precomputed classifier outputs; `top5` is only carried through to be scored."""

    def __init__(
        self, descriptors: np.ndarray, top1: np.ndarray, confidence: np.ndarray, top5: np.ndarray,
        centroids: np.ndarray, latlon: np.ndarray | None,
    ):
        self.descriptors, self.top1, self.confidence, self.top5 = descriptors, top1, confidence, top5
        self.centroids = torch.as_tensor(centroids, dtype=torch.float32)
        self.latlon = latlon

    def batch(self, rows: np.ndarray, device: torch.device) -> Batch:
        batch = {
            "rows": torch.from_numpy(rows),
            "descriptor": torch.from_numpy(self.descriptors[rows]).to(device).float(),
            "top1": torch.from_numpy(self.top1[rows]).to(device),
            "confidence": torch.from_numpy(self.confidence[rows]).to(device),
        }
        if self.latlon is not None:
            batch["target"] = torch.from_numpy(self.latlon[rows]).to(device).float()
        return batch

    def coordinates(self, module: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        offset = module(batch["descriptor"], batch["top1"], batch["confidence"])
        return apply_offset(self.centroids.to(offset.device), batch["top1"], offset)

    def loss(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        lat, lon = self.coordinates(module, batch)
        return haversine_km_torch(lat, lon, batch["target"][:, 0], batch["target"][:, 1]).mean()

    def predict(self, module: nn.Module, batch: Batch) -> Prediction:
        lat, lon = self.coordinates(module, batch)
        top5 = self.top5[batch["rows"].numpy()]
        return Prediction(top5, lat.double().cpu().numpy(), lon.double().cpu().numpy())
