"""One pass over every view with frozen backbones, into the feature store (resumable, multi-GPU)."""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..competition import SPLITS, VIEWS
from ..data import Competition, SplitTable, find_image_problems, load_competition
from ..device import resolve_device
from ..errors import ConfigError, GeoscoutError
from ..problems import InputError
from ..store.layout import FLIP_DATASET, MANIFEST, SCHEMA_VERSION, backbone_fingerprint, features_path, samples_path, shard_dir
from ..store.writer import ShardedWriter, StoreIdentity, matches
from .backbones import get_spec, load_backbone, preprocessing_record
from .dataset import DECODE_SIZE, ShardBatchSampler, ViewsDataset, collate_views
from .distributed import init_ranks


@dataclass
class ExtractResult:
    store_dir: Path
    written: list[str] = field(default_factory=list)  # "split.backbone" sealed by this run
    skipped: list[str] = field(default_factory=list)  # already complete with the same identity
    views_per_second: float = 0.0


class StoreConflict(GeoscoutError, ValueError):
    """The store folder already holds features of other data, weights or preprocessing."""


def _write_manifest(store_dir: Path, competition: Competition) -> None:
    path = store_dir / MANIFEST
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "dataset_fingerprint": competition.fingerprint(),
        "classes": competition.classes.state_idx.tolist(),
        "data_dir": str(competition.root.resolve()),
    }
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("dataset_fingerprint") != manifest["dataset_fingerprint"]:
            raise StoreConflict(
                f"{store_dir} holds features of another dataset (fingerprint {old.get('dataset_fingerprint')}, "
                f"from {old.get('data_dir')}); this data's fingerprint is {manifest['dataset_fingerprint']}. "
                "Use another store folder."
            )
        return
    atomic_write_text(path, json.dumps(manifest, indent=2))


def _write_samples(store_dir: Path, competition: Competition, split: SplitTable) -> None:
    """The sample table beside the features: labels as class ids and coordinates (empty for test)."""
    labelled = split.state_idx is not None
    n = len(split)
    table = pl.DataFrame({
        "sample_id": split.sample_id,
        "state_idx": split.state_idx if labelled else pl.Series([None] * n, dtype=pl.Int64),
        "class_id": competition.classes.to_class(split.state_idx) if labelled else pl.Series([None] * n, dtype=pl.Int64),
        "latitude": split.latlon[:, 0] if labelled else pl.Series([None] * n, dtype=pl.Float64),
        "longitude": split.latlon[:, 1] if labelled else pl.Series([None] * n, dtype=pl.Float64),
    })
    path = samples_path(store_dir, split.name)
    tmp = path.with_name(path.name + ".tmp")
    table.write_csv(tmp)
    os.replace(tmp, path)


class _ShardAssembler:
    """Collects batch outputs per shard; hands a shard to the writer thread when it is whole."""

    def __init__(self, writers: dict[str, ShardedWriter], shards: list[int], pool: ThreadPoolExecutor, table: SplitTable):
        self.writers = writers
        self.pool = pool
        self.table = table
        self.futures = []
        first = next(iter(writers.values()))
        self.rows = {k: first.shard_rows(k) for k in shards}
        self.shard_of_row = {r: k for k, rows in self.rows.items() for r in rows}
        self.parts: dict[int, list] = {k: [] for k in shards}

    def add(self, rows: np.ndarray, outputs: dict[str, dict[str, np.ndarray]], ok: np.ndarray, errors: list) -> None:
        shard = self.shard_of_row[int(rows[0])]
        self.parts[shard].append((rows, outputs, ok, errors))
        if sum(len(p[0]) for p in self.parts[shard]) == len(self.rows[shard]):
            parts = self.parts.pop(shard)
            self.futures.append(self.pool.submit(self._write, shard, parts))

    def _write(self, shard: int, parts: list) -> None:
        ok = np.concatenate([p[2] for p in parts])
        bad_views = [
            {"sample_id": int(self.table.sample_id[r]), "view": VIEWS[v], "file": self.table.image_names[r, v], "error": err}
            for rows, _, _, errors in parts for r, errs in zip(rows, errors) for v, err in enumerate(errs) if err
        ]
        for name, writer in self.writers.items():
            outputs = {key: np.concatenate([p[1][name][key] for p in parts]) for key in parts[0][1][name]}
            writer.write_shard(shard, outputs, ok, bad_views)

    def wait(self) -> None:
        for f in self.futures:
            f.result()  # re-raises a failed write here


def _embed(embedders: dict, images: torch.Tensor, ok: torch.Tensor, *, flip: bool) -> dict[str, dict[str, np.ndarray]]:
    b = images.shape[0]
    flat = images.flatten(0, 1)  # (B*4, 3, S, S): every view is embedded independently
    out = {}
    for name, embedder in embedders.items():
        result = embedder(flat)
        if flip:  # mirrored on the device: the uint8 batch is already there, no second decode
            result[FLIP_DATASET] = embedder(flat.flip(-1))["features"]
        out[name] = {
            key: (value.float().reshape(b, len(VIEWS), -1) * ok[..., None].to(value.device)).to(torch.float16).cpu().numpy()
            for key, value in result.items()
        }
    return out


def extract(
    data_dir: Path,
    store_dir: Path,
    *,
    backbones: list[str],
    weights: dict[str, str | None] | None = None,
    splits: tuple[str, ...] = SPLITS,
    device: str = "auto",
    batch_size: int = 0,
    workers: int = -1,
    bad_images: str = "fail",
    shard_size: int = 1024,
    compile: bool = False,
    overwrite: bool = False,
    check_images: bool = True,
    flip: bool = False,
    layers: int = 0,
    progress: bool = True,
) -> ExtractResult:
    """Embed every view of `splits` with each backbone into `store_dir` (see store/layout.py).

    Rerunning after a crash resumes from the last whole shard. Under torchrun, ranks split the
    shards and rank 0 seals the files, which come out identical to a single-process run.
    `flip` also embeds every view mirrored left-right, as `features_flip` (flip test-time augmentation).
    `layers` K > 0 also stores the last K blocks' class tokens and the final patch-token mean (docs/store.md).
    """
    store_dir = Path(store_dir)
    # canonical names, so an alias never creates a second store of the same backbone
    weights = {get_spec(name).name: value for name, value in (weights or {}).items()}
    backbones = list(dict.fromkeys(get_spec(name).name for name in backbones))
    unknown = sorted(set(weights) - set(backbones))
    if unknown:
        raise ConfigError(f"--weights given for {unknown}, which are not among the backbones {backbones}")
    for s in splits:
        if s not in SPLITS:
            raise ConfigError(f"unknown split {s!r}; available: {', '.join(SPLITS)}")
    ranks = init_ranks(device)
    torch_device = resolve_device(device, local_rank=ranks.local_rank)
    # on CPU, 32 views keep the float copy of a batch under glibc's 32 MB mmap threshold (BENCHMARKS.md)
    batch_size = batch_size or (256 if torch_device.type == "cuda" else 32)
    locations_per_batch = max(1, batch_size // len(VIEWS))
    if workers < 0:
        workers = min(8, max(1, (os.cpu_count() or 1) // ranks.world_size))

    competition = load_competition(data_dir)
    if check_images and bad_images == "fail":
        # fail fast, listing every bad image, before any GPU time is spent
        problems = []
        if ranks.is_main:
            for s in splits:
                problems += find_image_problems(competition.split(s), workers=max(2, workers * 2), progress=progress)
        if not ranks.all_ok(not problems):
            raise InputError(problems or [], f"{data_dir} images") if problems else RuntimeError("image check failed on rank 0")

    store_dir.mkdir(parents=True, exist_ok=True)
    if ranks.is_main:
        _write_manifest(store_dir, competition)
        for s in splits:
            _write_samples(store_dir, competition, competition.split(s))
    ranks.barrier()

    loaded = {name: load_backbone(name, weights.get(name), torch_device, layers=layers) for name in backbones}
    result = ExtractResult(store_dir)
    started, n_views = time.perf_counter(), 0
    for split_name in splits:
        table = competition.split(split_name)
        writers = {}
        for name in backbones:
            spec = loaded[name].spec  # as loaded: a CLIP checkpoint's config decides its sizes
            spec_dict = json.loads(json.dumps(asdict(spec), default=str))
            preprocessing = {**preprocessing_record(spec), "decode_size": DECODE_SIZE}
            dims = {**loaded[name].output_dims, **({FLIP_DATASET: spec.embed_dim} if flip else {})}
            identity = StoreIdentity(
                split=split_name, backbone=name, n_rows=len(table), split_fingerprint=table.fingerprint(),
                dataset_fingerprint=competition.fingerprint(),
                backbone_fingerprint=backbone_fingerprint(spec_dict, loaded[name].weights_identity, preprocessing),
                spec=spec_dict, weights_identity=loaded[name].weights_identity, preprocessing=preprocessing,
                classes=competition.classes.state_idx.tolist(), dims=dims, shard_size=shard_size,
            )
            final = features_path(store_dir, split_name, name)
            if matches(final, identity):
                if ranks.is_main:  # a kill between sealing and cleaning up leaves shards behind
                    shutil.rmtree(shard_dir(store_dir, split_name, name), ignore_errors=True)
                result.skipped.append(f"{split_name}.{name}")
                continue
            if final.exists() and not overwrite:
                raise StoreConflict(
                    f"{final} exists but was made from other rows, weights, preprocessing or --layers"
                    f"{' or without --flip' if flip else ''}; pass --overwrite to replace it, or use another store folder"
                )
            writers[name] = ShardedWriter(store_dir, identity)
        if not writers:
            continue
        if ranks.is_main:
            for w in writers.values():
                w.prepare()
        ranks.barrier()  # every rank sees the same pending list before anyone writes
        first = next(iter(writers.values()))
        pending = sorted(set().union(*(w.pending_shards() for w in writers.values())))
        mine = pending[ranks.rank::ranks.world_size]
        n_views += _run_split(
            table, writers, mine, {n: loaded[n].embedder for n in writers}, torch_device,
            locations_per_batch=locations_per_batch, workers=workers, bad_images=bad_images,
            compile=compile, flip=flip, progress=progress and ranks.is_main, first=first,
        )
        ok = ranks.all_ok(True)
        if ranks.is_main and ok:
            for name, w in writers.items():
                w.seal(table.sample_id)
                result.written.append(f"{split_name}.{name}")
        ranks.barrier()
    elapsed = time.perf_counter() - started
    result.views_per_second = n_views / elapsed if elapsed > 0 else 0.0
    return result


def _run_split(table, writers, shards, embedders, device, *, locations_per_batch, workers, bad_images, compile, flip, progress, first) -> int:
    if not shards:
        return 0
    if compile:
        embedders = {n: torch.compile(e) for n, e in embedders.items()}
    dataset = ViewsDataset(table, bad_images=bad_images)
    sampler = ShardBatchSampler([first.shard_rows(k) for k in shards], locations_per_batch)
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_views,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None, persistent_workers=False,
    )
    total_views = sum(len(first.shard_rows(k)) for k in shards) * len(VIEWS)
    names = ",".join(embedders)
    bar = tqdm(total=total_views, desc=f"extract {table.name} [{names}]", unit="view", disable=not progress, smoothing=0.05)
    with ThreadPoolExecutor(1) as pool:  # shard files are written off the critical path
        assembler = _ShardAssembler(writers, shards, pool, table)
        for rows, images, ok, errors in loader:
            images = images.to(device, non_blocking=True)
            outputs = _embed(embedders, images, ok, flip=flip)
            assembler.add(rows.numpy(), outputs, ok.numpy(), errors)
            bar.update(len(rows) * len(VIEWS))
        assembler.wait()
    bar.close()
    return total_views
