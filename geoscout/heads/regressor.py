"""What makes a Sniper a regressor for the loop: a descriptor and an anchor cell in, haversine km out.

The descriptor is the standardised view mean of every backbone side by side: the same for every
fold, unlike a classifier's fused descriptor, which lives in a different space for each fold model.
Anchors come from out-of-fold ensemble outputs, so the regressor never reads in-sample predictions.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..geo import haversine_km_torch
from .models import apply_offset
from .training import Batch


class Anchors(NamedTuple):
    """The cell each row's offset starts from, and the ensemble's probability of that cell."""

    cell: np.ndarray  # (N,) int64
    confidence: np.ndarray  # (N,) float32


class RegressorObjective:
    """Rows index `descriptors` (N, D) float32, `anchors` and `latlon` (N, 2)."""

    def __init__(self, descriptors: np.ndarray, anchors: Anchors, centroids: np.ndarray, latlon: np.ndarray):
        self.descriptors, self.anchors, self.latlon = descriptors, anchors, latlon
        self.centroids = torch.as_tensor(centroids, dtype=torch.float32)

    def batch(self, rows: np.ndarray, device: torch.device, *, train: bool) -> Batch:
        return {
            "descriptor": torch.from_numpy(self.descriptors[rows]).to(device),
            "cell": torch.from_numpy(self.anchors.cell[rows]).to(device),
            "confidence": torch.from_numpy(self.anchors.confidence[rows]).to(device),
            "target": torch.from_numpy(self.latlon[rows]).to(device).float(),
        }

    def heldout_loss(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        lat, lon = coordinates(module, self.centroids, batch["descriptor"], batch["cell"], batch["confidence"])
        return haversine_km_torch(lat, lon, batch["target"][:, 0], batch["target"][:, 1])

    def loss(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        return self.heldout_loss(module, batch).mean()


def coordinates(module: nn.Module, centroids: torch.Tensor, descriptor: torch.Tensor, cell: torch.Tensor,
                confidence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    offset = module(descriptor, cell, confidence)
    return apply_offset(centroids.to(offset.device), cell, offset)


def regressed_points(
    modules: list[nn.Module], descriptors: np.ndarray, centroids: np.ndarray, cells: np.ndarray, confidence: np.ndarray,
    *, batch_size: int, device: torch.device,
) -> np.ndarray:
    """(N, k, 2) degrees: centroid + offset of each row's k candidate cells (descriptors (N, d)), the
    offset averaged over `modules` (the fold models of one regressor)."""
    n, k = cells.shape
    rows_per_batch = max(1, batch_size // max(k, 1))
    table = torch.as_tensor(centroids, dtype=torch.float32).to(device)
    out = np.empty((n, k, 2))
    for module in modules:
        module.eval()
    with torch.inference_mode():
        for start in range(0, n, rows_per_batch):
            part = slice(start, min(start + rows_per_batch, n))
            descriptor = torch.from_numpy(descriptors[part]).to(device)
            cell = torch.from_numpy(np.ascontiguousarray(cells[part])).to(device)
            probability = torch.from_numpy(np.ascontiguousarray(confidence[part], dtype=np.float32)).to(device)
            offset = torch.stack([m(descriptor, cell, probability) for m in modules]).mean(dim=0)  # (B, k, 2)
            lat, lon = apply_offset(table, cell.reshape(-1), offset.reshape(-1, 2))
            out[part, :, 0] = lat.double().cpu().numpy().reshape(-1, k)
            out[part, :, 1] = lon.double().cpu().numpy().reshape(-1, k)
    return out
