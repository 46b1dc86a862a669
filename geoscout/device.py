"""The one way a device name becomes a torch.device, for extraction and heads alike.

"auto" takes CUDA when it is usable, else the CPU. An explicit "cuda" or "cuda:N" with no usable
CUDA is an error, not a silent fallback: hours on the CPU are worse than a clear message.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

DEVICE_HELP = "auto (CUDA when available, else the CPU), cuda, cuda:N or cpu"


def resolve_device(name: str = "auto", *, local_rank: int = 0) -> torch.device:
    """`local_rank` picks the GPU of a torchrun process when the name is plain "cuda" or "auto"."""
    name = str(name).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ConfigError(f"unknown device {name!r}; use {DEVICE_HELP}")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name}: no usable CUDA device here (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or --device auto"
        )
    count = torch.cuda.device_count()
    index = local_rank if name == "cuda" else int(name.partition(":")[2] or 0)
    if not 0 <= index < count:
        raise ConfigError(f"--device {name}: GPU {index} does not exist; this machine has {count}")
    return torch.device("cuda", index)
