"""K-fold cross-fitting: every training row gets predictions from a model that never saw it.

The rows heads are fitted on are the training split minus the store's validation rows. They are cut
into K folds, stratified by state and seeded. A member trains K models, each on K-1 folds and
early-stopped on the fold it left out, whose predictions on that fold are the row's out-of-fold (OOF)
output. Everything stacked on the members (ensemble weights, temperatures, the regressor, decoding
choices) is fitted on OOF outputs; validation and test rows get the mean of the K models.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class Folds:
    fit_rows: np.ndarray  # (M,) rows of the training split the heads are fitted on (sorted)
    fold: np.ndarray  # (M,) the fold of each fit row, 0..k-1
    k: int
    digest: str  # identity of (fit rows, fold assignment): members of one ensemble must share it

    def train_rows(self, k: int) -> np.ndarray:
        return self.fit_rows[self.fold != k]

    def heldout_rows(self, k: int) -> np.ndarray:
        return self.fit_rows[self.fold == k]

    def local(self) -> "Folds":
        """The same folds over positions 0..M-1: for arrays that hold only the fit rows, in order."""
        return Folds(np.arange(len(self.fit_rows)), self.fold, self.k, self.digest)


def make_folds(sample_id: np.ndarray, class_id: np.ndarray, fit_rows: np.ndarray, *, k: int, seed: int) -> Folds:
    """Stratified K folds over `fit_rows`: each state's rows are shuffled and dealt round-robin, so every
    fold holds about 1/k of every state (a state with fewer than k rows is in fewer folds)."""
    if k < 2:
        raise ConfigError(f"cross-fitting needs at least 2 folds; got {k}")
    fit_rows = np.sort(np.asarray(fit_rows))
    if len(fit_rows) < k:
        raise ConfigError(f"{len(fit_rows)} training rows cannot be cut into {k} folds")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(fit_rows), dtype=np.int64)
    classes = np.asarray(class_id)[fit_rows]
    offset = 0  # rotates where each state's deal starts, so small states do not all fill fold 0
    for c in np.unique(classes):
        members = rng.permutation(np.flatnonzero(classes == c))
        fold[members] = (np.arange(len(members)) + offset) % k
        offset += len(members)
    h = hashlib.sha256(f"k={k}\n".encode())
    h.update(np.asarray(sample_id)[fit_rows].astype("<i8").tobytes())
    h.update(fold.astype("<i8").tobytes())
    return Folds(fit_rows, fold, k, h.hexdigest()[:16])
