"""Pick the compute device: ask for CUDA, get CPU (with a warning) where there is none."""

from __future__ import annotations

import warnings

import torch


def resolve_device(name: str = "cuda", *, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            warnings.warn("CUDA is not available: running on the CPU", stacklevel=2)
            return torch.device("cpu")
        if name == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto")
    return torch.device(name)
