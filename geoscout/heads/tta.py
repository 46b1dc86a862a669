"""Flip test-time augmentation: a location seen in a mirror is a location too.

In a world mirrored left-right, North and South still look north and south, but what was seen
looking East is now seen looking West and vice versa. So the mirrored East view goes into the West
slot ("swap"); "naive" leaves every mirrored view in its own slot, to measure what the swap buys.
"""

from __future__ import annotations

import numpy as np

from ..competition import VIEWS
from ..errors import ConfigError

TTA_MODES = ("none", "swap", "naive")
MIRRORED_SLOTS = {"swap": np.array([VIEWS.index(v) for v in ("north", "west", "south", "east")]),
                  "naive": np.arange(len(VIEWS))}


def check_tta(mode: str) -> None:
    if mode not in TTA_MODES:
        raise ConfigError(f"unknown flip TTA {mode!r}; available: {list(TTA_MODES)}")


def mirrored_views(flipped: np.ndarray, mask: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """The mirrored location as (features (N, 4, D), mask (N, 4)): slot s holds the flipped view of
    slot MIRRORED_SLOTS[mode][s]."""
    slots = MIRRORED_SLOTS[mode]
    return flipped[:, slots], mask[:, slots]
