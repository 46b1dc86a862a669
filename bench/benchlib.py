"""What the extraction benchmarks share: synthetic data, the extractor's own DataLoader, registry access."""

from __future__ import annotations

import os
import time
from pathlib import Path

from torch.utils.data import DataLoader

from geoscout import host
from geoscout.competition import TRAIN_CSV, VIEWS
from geoscout.data import load_competition
from geoscout.extract import backbones
from geoscout.extract.dataset import ShardBatchSampler, ViewsDataset, collate_views
from geoscout.synth import synthesize

SHARD_SIZE = 1024  # extract's default


def default_workers() -> int:
    return host.default_workers()  # what extract picks for workers=-1 in one process


def ensure_data(data_dir: Path, locations: int) -> Path:
    """A synthetic competition folder with `locations` train locations (kept if it already exists)."""
    if not (data_dir / TRAIN_CSV).exists():
        print(f"synthesizing {locations} locations into {data_dir} ...", flush=True)
        start = time.perf_counter()
        synthesize(data_dir, n_train=locations, n_test=4, progress=False)  # test is not extracted
        print(f"  {locations * len(VIEWS)} views in {time.perf_counter() - start:.1f} s", flush=True)
    return data_dir


def decode_only(data_dir: Path, batch_size: int, workers: int, pin_memory: bool = False) -> tuple[int, float]:
    """(views, seconds) of one pass of extract's DataLoader over the train split, no model."""
    table = load_competition(data_dir).split("train")
    locations_per_batch = max(1, batch_size // len(VIEWS))
    shards = [range(s, min(s + SHARD_SIZE, len(table))) for s in range(0, len(table), SHARD_SIZE)]
    loader = DataLoader(
        ViewsDataset(table, bad_images="fail"), batch_sampler=ShardBatchSampler(shards, locations_per_batch),
        num_workers=workers, collate_fn=collate_views, pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
    )
    start, views = time.perf_counter(), 0
    for rows, _images, _ok, _errors in loader:
        views += len(rows) * len(VIEWS)
    return views, time.perf_counter() - start


def randomly_initialised(name: str) -> str:
    """The `random:` form of `name`: its architecture with seeded random weights (speed does not depend on weights).

    Real backbones refuse to run without weights; `extract` runs the random form through its ordinary code path.
    """
    spec = backbones.get_spec(name)
    return spec.name if spec.random_init else f"random:{spec.name}"


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (no root needed): the next read hits the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
