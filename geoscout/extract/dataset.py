"""Decoding views in DataLoader workers: uint8 tensors travel to the device, resizing happens there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..competition import VIEWS
from ..data import SplitTable, resolve_image
from ..errors import ConfigError
from ..images import ImageError, decode_rgb

DECODE_SIZE = 256  # the competition's image size; other sizes are resized to it when decoded


def decode_view(path: Path, size: int = DECODE_SIZE) -> np.ndarray:
    """One view as the store sees it: (size, size, 3) uint8, resized with Pillow's bicubic when it is
    not the competition's size. Every embedded view goes through here (extract, locate)."""
    pixels = decode_rgb(path)
    if pixels.shape[:2] != (size, size):
        pixels = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BICUBIC))
    return pixels


class ViewsDataset(Dataset):
    """Item = one location: (row, images (4,3,S,S) uint8, ok (4,) bool, errors per view or None).

    A bad image never raises here: an exception raised in a DataLoader worker reaches the main
    process wrapped in a traceback. With bad_images="fail" its error is the full sentence (file,
    sample_id, column), and `raise_bad_image` raises it in the main process.
    """

    def __init__(self, table: SplitTable, *, bad_images: str, size: int = DECODE_SIZE):
        if bad_images not in ("fail", "mask"):
            raise ConfigError(f"bad-image policy {bad_images!r}; choose 'fail' or 'mask'")
        self.table = table
        self.bad_images = bad_images
        self.size = size

    def __len__(self) -> int:
        return len(self.table)

    def _decode(self, row: int, view: int) -> np.ndarray:
        return decode_view(resolve_image(self.table.images_dir, self.table.image_names[row, view]), self.size)

    def __getitem__(self, row: int):
        images = np.zeros((len(VIEWS), self.size, self.size, 3), dtype=np.uint8)
        ok = np.ones(len(VIEWS), dtype=bool)
        errors: list[str | None] = [None] * len(VIEWS)
        for view in range(len(VIEWS)):
            try:
                images[view] = self._decode(row, view)
            except ImageError as exc:
                ok[view], errors[view] = False, str(exc)
                if self.bad_images == "fail":
                    name = str(self.table.image_names[row, view])
                    errors[view] = (f"{self.table.csv_path} sample_id={self.table.sample_id[row]} "
                                    f"column image_{VIEWS[view]}={name!r}: {exc} (use --bad-images mask to skip such views)")
        return row, torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(ok), errors


def raise_bad_image(errors: list[list[str | None]]) -> None:
    """Raise the first bad image of a batch (the "fail" policy), in the process that reads the batch."""
    first = next((e for errs in errors for e in errs if e), None)
    if first is not None:
        raise ImageError(first)


def collate_views(items):
    rows, images, ok, errors = zip(*items)
    return torch.tensor(rows), torch.stack(images), torch.stack(ok), list(errors)


class ShardBatchSampler(Sampler):
    """Batches that never straddle a shard, so every shard is computed the same way on every run."""

    def __init__(self, shards: list[range], locations_per_batch: int):
        self.batches = [list(r[i:i + locations_per_batch]) for r in shards for i in range(0, len(r), locations_per_batch)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
