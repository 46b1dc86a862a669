"""Opening HDF5 files with errors that say what happened, file locking above all.

HDF5 locks every file it opens. On network file systems (NFS, Lustre, some FUSE mounts) the lock
call itself fails (errno 37 ENOLCK, 38 ENOSYS, 95 EOPNOTSUPP): that is no conflict with another
process, and the fix is HDF5_USE_FILE_LOCKING=FALSE. A lock held by a live process (errno 11
EAGAIN) is a real conflict, and is named as one.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

import h5py

from ..errors import GeoscoutError

LOCK_HELD = {errno.EAGAIN, errno.EWOULDBLOCK}
_LOCK_ERROR = re.compile(r"unable to lock file, errno = (\d+)")


class FileLockError(GeoscoutError, OSError):
    """HDF5 could not lock a store file: locking unsupported here, or another process holds it."""


def lock_error(path: Path, exc: OSError) -> FileLockError | None:
    """The plain-sentence error for an HDF5 locking failure, or None when `exc` is something else."""
    match = _LOCK_ERROR.search(str(exc))
    if match is None:
        return None
    code = int(match[1])
    if code in LOCK_HELD:
        return FileLockError(
            f"{path} is open in another process (its HDF5 file lock is held): another geoscout run or a "
            "reader is using it; wait for it to finish or stop it"
        )
    name = errno.errorcode.get(code, str(code))
    return FileLockError(
        f"HDF5 cannot lock files where {path} lives (errno {code} {name}: the file system does not support "
        "locks, as on many network file systems); set HDF5_USE_FILE_LOCKING=FALSE in the environment and rerun"
    )


def open_h5(path: Path, mode: str = "r") -> h5py.File:
    """h5py.File(path, mode), with locking failures raised as FileLockError naming the fix."""
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        better = lock_error(Path(path), exc)
        if better is not None:
            raise better from exc
        raise
