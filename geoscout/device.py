"""The one way a device name becomes a torch.device, and a precision name a compute dtype.

"auto" takes CUDA when it is usable, else the CPU. An explicit "cuda" or "cuda:N" with no usable
CUDA is an error, not a silent fallback: hours on the CPU are worse than a clear message.
Under torchrun each process takes the GPU of its local rank, and one that finds none stops.
"""

from __future__ import annotations

import torch

from .errors import ConfigError, warn

DEVICE_HELP = "auto (CUDA when available, else the CPU), cuda, cuda:N or cpu"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_HELP = "auto (bf16 on GPUs that have it, fp16 on older GPUs such as T4/P100, fp32 on the CPU), fp32, bf16 or fp16"
_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere and later; older GPUs emulate bf16, slowly


def resolve_device(name: str = "auto", *, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """`local_rank` picks the GPU of a torchrun process when the name is plain "cuda" or "auto".

    With `world_size` > 1 (torchrun), "auto" means this rank's GPU: a rank that finds none is an
    error (pass --device cpu to run every rank on the CPU on purpose), and so is "cuda:N", which
    would put every rank on one GPU.
    """
    name = str(name).strip().lower()
    distributed = world_size > 1
    if name == "auto":
        if distributed and not torch.cuda.is_available():
            raise ConfigError(
                f"torchrun process of local rank {local_rank} found no usable CUDA device; "
                "pass --device cpu to run every process on the CPU"
            )
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
    if distributed and name != "cuda":
        raise ConfigError(f"--device {name} under torchrun would put every process on one GPU; use --device cuda or auto")
    count = torch.cuda.device_count()
    index = local_rank if name == "cuda" else int(name.partition(":")[2] or 0)
    if not 0 <= index < count:
        where = f"torchrun process of local rank {local_rank}" if distributed else f"--device {name}"
        raise ConfigError(f"{where}: GPU {index} does not exist; this machine has {count}")
    return torch.device("cuda", index)


def native_bf16(device: torch.device) -> bool:
    """True where bf16 runs at full speed: Ampere or newer GPUs, and CPUs (autocast handles it)."""
    if device.type != "cuda":
        return device.type == "cpu"
    return torch.cuda.get_device_capability(device) >= NATIVE_BF16_CAPABILITY


def resolve_precision(name: str, device: torch.device) -> str:
    """"auto" -> bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on the CPU; else checked as given."""
    name = str(name).strip().lower()
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}; use {PRECISION_HELP}")
    device = torch.device(device)
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if native_bf16(device) else "fp16"
    if name == "bf16" and device.type == "cuda" and not native_bf16(device):
        warn(f"{torch.cuda.get_device_name(device)} has no native bf16: it is emulated and slow; "
             "--precision fp16 (or auto) is faster there")
    return name


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast computes in for a resolved precision; None for fp32 (autocast off)."""
    return _AUTOCAST_DTYPES[precision]
