"""What makes a Sniper a regressor for the loop: inputs from a frozen Scout's outputs, haversine loss."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..geo import haversine_km_torch
from .models import apply_offset
from .training import Batch, Prediction


class Anchors(NamedTuple):
    """The cell each row's offset starts from, and the classifier's probability of that cell."""

    cell: np.ndarray  # (N,) int64
    confidence: np.ndarray  # (N,) float32


class RegressorObjective:
    """Rows index precomputed classifier outputs; `top5` is only carried through to be scored.

    The loss starts from `train_anchors` (the predicted cells, or the true ones), predictions from
    `anchors` (the predicted cells: what decoding will have).
    """

    def __init__(
        self, descriptors: np.ndarray, anchors: Anchors, top5: np.ndarray, centroids: np.ndarray, latlon: np.ndarray,
        *, train_anchors: Anchors,
    ):
        self.descriptors, self.anchors, self.train_anchors, self.top5 = descriptors, anchors, train_anchors, top5
        self.centroids = torch.as_tensor(centroids, dtype=torch.float32)
        self.latlon = latlon

    def batch(self, rows: np.ndarray, device: torch.device) -> Batch:
        return {
            "rows": torch.from_numpy(rows),
            "descriptor": torch.from_numpy(self.descriptors[rows]).to(device).float(),
            "cell": torch.from_numpy(self.anchors.cell[rows]).to(device),
            "confidence": torch.from_numpy(self.anchors.confidence[rows]).to(device),
            "train_cell": torch.from_numpy(self.train_anchors.cell[rows]).to(device),
            "train_confidence": torch.from_numpy(self.train_anchors.confidence[rows]).to(device),
            "target": torch.from_numpy(self.latlon[rows]).to(device).float(),
        }

    def loss(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        lat, lon = coordinates(module, self.centroids, batch["descriptor"], batch["train_cell"], batch["train_confidence"])
        return haversine_km_torch(lat, lon, batch["target"][:, 0], batch["target"][:, 1]).mean()

    def predict(self, module: nn.Module, batch: Batch) -> Prediction:
        lat, lon = coordinates(module, self.centroids, batch["descriptor"], batch["cell"], batch["confidence"])
        top5 = self.top5[batch["rows"].numpy()]
        return Prediction(top5, lat.double().cpu().numpy(), lon.double().cpu().numpy())


def coordinates(module: nn.Module, centroids: torch.Tensor, descriptor: torch.Tensor, cell: torch.Tensor,
                confidence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    offset = module(descriptor, cell, confidence)
    return apply_offset(centroids.to(offset.device), cell, offset)


def regressed_points(
    module: nn.Module, descriptors: np.ndarray, centroids: np.ndarray, cells: np.ndarray, confidence: np.ndarray,
    *, batch_size: int, device: torch.device,
) -> np.ndarray:
    """(N, k, 2) degrees: centroid + offset of each row's k candidate cells (descriptors (N, d))."""
    n, k = cells.shape
    rows = np.repeat(np.arange(n), k)
    flat_cells, flat_confidence = cells.ravel(), confidence.ravel().astype(np.float32)
    table = torch.as_tensor(centroids, dtype=torch.float32)
    out = np.empty((n * k, 2))
    module.eval()
    with torch.inference_mode():
        for start in range(0, n * k, batch_size):
            part = slice(start, min(start + batch_size, n * k))
            lat, lon = coordinates(
                module, table, torch.from_numpy(descriptors[rows[part]]).to(device).float(),
                torch.from_numpy(flat_cells[part]).to(device), torch.from_numpy(flat_confidence[part]).to(device),
            )
            out[part, 0], out[part, 1] = lat.double().cpu().numpy(), lon.double().cpu().numpy()
    return out.reshape(n, k, 2)
