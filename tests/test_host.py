"""Host side of extraction: CPUs from the affinity mask, DataLoader sized to /dev/shm, HDF5 locking."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from geoscout.errors import GeoscoutWarning
from geoscout.extract import runner
from geoscout.extract.runner import StoreConflict, extract
from geoscout.host import DEFAULT_PREFETCH, default_workers, plan_loader, usable_cpus
from geoscout.store import writer
from geoscout.store.h5 import FileLockError
from geoscout.store.writer import sealed_identity

MIB = 2**20
BATCH_256_VIEWS = 64 * 4 * 3 * 256 * 256  # 48 MiB of decoded uint8 views


def test_cpus_come_from_the_affinity_mask():
    assert usable_cpus() == len(os.sched_getaffinity(0))
    assert default_workers(processes_on_node=10**6) == 1
    assert default_workers() == min(8, len(os.sched_getaffinity(0)))


def test_a_roomy_dev_shm_keeps_the_default_loader():
    plan = plan_loader(workers=8, batch_bytes=BATCH_256_VIEWS, shm_free=24 * 2**30)
    assert (plan.workers, plan.prefetch, plan.warning) == (8, DEFAULT_PREFETCH, None)


def test_a_smaller_dev_shm_shortens_the_prefetch_first():
    plan = plan_loader(workers=8, batch_bytes=BATCH_256_VIEWS, shm_free=1000 * MIB)  # 16 batches fit
    assert (plan.workers, plan.prefetch, plan.warning) == (8, 2, None)
    # processes on one node share it
    shared = plan_loader(workers=8, batch_bytes=BATCH_256_VIEWS, shm_free=1000 * MIB, processes_on_node=2)
    assert (shared.workers, shared.prefetch) == (8, 1)


def test_dockers_64_mb_dev_shm_is_named_with_its_fix():
    plan = plan_loader(workers=8, batch_bytes=BATCH_256_VIEWS, shm_free=64 * MIB)
    assert (plan.workers, plan.prefetch) == (1, 1)
    assert "/dev/shm has 64 MiB free" in plan.warning and "48 MiB" in plan.warning
    assert "--shm-size" in plan.warning and "--ipc=host" in plan.warning
    none = plan_loader(workers=8, batch_bytes=BATCH_256_VIEWS, shm_free=32 * MIB)
    assert (none.workers, none.prefetch) == (0, None) and "main process" in none.warning


def test_extract_follows_the_plan_and_says_so(synth_master, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "shm_free_bytes", lambda: MIB)  # no batch of 16 views (3 MiB) fits
    with pytest.warns(GeoscoutWarning, match="no DataLoader worker fits.*--shm-size=8g, or --ipc=host"):
        result = extract(synth_master, tmp_path / "store", backbones=["tiny-clip-random"], splits=("test",),
                         device="cpu", workers=2, batch_size=16, shard_size=4, progress=False)
    assert result.workers == 0 and result.written == ["test.tiny-clip-random"]


def _hold_open_for_writing(path):
    """A process holding `path` open for writing (its HDF5 lock) until its stdin closes."""
    code = "import h5py, sys; f = h5py.File(sys.argv[1], 'a'); print('open', flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "open"
    return proc


def test_a_store_file_locked_by_another_process_is_named_as_such_not_as_a_conflict(synth_master, tmp_path):
    store = tmp_path / "store"
    args = dict(backbones=["tiny-clip-random"], splits=("test",), device="cpu", workers=0, shard_size=4, progress=False)
    extract(synth_master, store, **args)
    holder = _hold_open_for_writing(store / "test.tiny-clip-random.h5")
    try:
        with pytest.raises(FileLockError, match="is open in another process"):
            extract(synth_master, store, **args)
    finally:
        holder.stdin.close()
        holder.wait()
    assert extract(synth_master, store, **args).skipped == ["test.tiny-clip-random"]


def test_hdf5_locking_unsupported_on_a_network_file_system_names_the_fix(tmp_path, monkeypatch):
    path = tmp_path / "train.x.h5"
    with h5py.File(path, "w") as f:
        f["features"] = np.zeros((1, 4, 2), np.float16)

    def nfs_open(*args, **kwargs):  # what HDF5 reports where flock() is not supported
        raise OSError(37, "Unable to synchronously open file (unable to lock file, errno = 37, "
                          "error message = 'No locks available')")

    monkeypatch.setattr(writer.h5py, "File", nfs_open)
    with pytest.raises(FileLockError, match="HDF5_USE_FILE_LOCKING=FALSE") as failure:
        sealed_identity(path)
    assert "errno 37 ENOLCK" in str(failure.value)
    assert not isinstance(failure.value, StoreConflict)
