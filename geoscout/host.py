"""What the host offers the extraction: usable CPUs, shared memory for the DataLoader, free disk.

Containers often give a process fewer CPUs than the machine has (`os.cpu_count` counts them all),
and Docker gives /dev/shm 64 MB by default, where DataLoader workers hand over decoded batches:
a few batches of 256 views (48 MiB each) do not fit, and workers die with a bus error.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

SHM_PATH = Path("/dev/shm")
SHM_SHARE = 0.8  # of the free shared memory, what the DataLoader may plan to fill
MAX_WORKERS = 8  # per process: enough to feed a GPU with 256-px JPEGs, more only costs memory
DEFAULT_PREFETCH = 4  # batches each worker keeps ready
SHM_FIX = "start the container with a larger /dev/shm (docker run --shm-size=8g, or --ipc=host)"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and job schedulers set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_workers(processes_on_node: int = 1) -> int:
    """DataLoader workers per process when none are asked for: the usable CPUs shared by the processes."""
    return max(1, min(MAX_WORKERS, usable_cpus() // max(1, processes_on_node)))


def shm_free_bytes(path: Path = SHM_PATH) -> int | None:
    """Free bytes in the shared-memory file system DataLoader workers use; None where there is none."""
    try:
        stat = os.statvfs(path)
    except (FileNotFoundError, AttributeError, OSError):
        return None
    return stat.f_bavail * stat.f_frsize


@dataclass(frozen=True)
class LoaderPlan:
    workers: int
    prefetch: int | None  # batches per worker (None with no workers)
    shm_needed: int  # bytes in flight at the asked worker count and the default prefetch
    shm_free: int | None
    warning: str | None = None  # a plain sentence when /dev/shm made the loader smaller than asked


def plan_loader(*, workers: int, batch_bytes: int, processes_on_node: int = 1,
                shm_free: int | None = None) -> LoaderPlan:
    """Workers and prefetch depth whose batches in flight fit in /dev/shm (shared by the node's processes).

    Prefetch shrinks first (down to one batch per worker), then the worker count; with room for no
    batch at all, decoding moves into the main process (slow), and the warning says how to fix it.
    """
    needed = workers * DEFAULT_PREFETCH * batch_bytes
    if workers == 0 or shm_free is None:
        return LoaderPlan(workers, DEFAULT_PREFETCH if workers else None, needed, shm_free)
    budget = int(shm_free * SHM_SHARE) // max(1, processes_on_node)
    fits = budget // max(1, batch_bytes)  # batches in flight this process may have
    if fits >= workers * DEFAULT_PREFETCH:
        return LoaderPlan(workers, DEFAULT_PREFETCH, needed, shm_free)
    if fits >= workers:
        return LoaderPlan(workers, fits // workers, needed, shm_free)
    mib = 2**20
    have = f"/dev/shm has {shm_free / mib:.0f} MiB free"
    each = f"each batch of decoded views takes {batch_bytes / mib:.0f} MiB there"
    if fits >= 1:
        warning = (f"{have} and {each}: only {fits} of {workers} DataLoader workers fit, so decoding will be slower; "
                   f"{SHM_FIX}, or lower --batch-size")
        return LoaderPlan(fits, 1, needed, shm_free, warning)
    warning = (f"{have} and {each}: no DataLoader worker fits, so images are decoded in the main process "
               f"(much slower); {SHM_FIX}, or lower --batch-size")
    return LoaderPlan(0, None, needed, shm_free, warning)


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the file system of `path` (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
