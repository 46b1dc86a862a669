"""One pass over every view with frozen backbones, into the feature store (resumable, multi-GPU)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..competition import SPLITS, VIEWS
from ..data import Competition, SplitTable, find_image_problems, load_competition
from ..device import resolve_device, resolve_precision
from ..errors import ConfigError, GeoscoutError, warn
from ..host import default_workers, plan_loader, shm_free_bytes, usable_cpus
from ..problems import InputError, Problem
from ..store.layout import FLIP_DATASET, MANIFEST, SCHEMA_VERSION, backbone_fingerprint, features_path, samples_path, shard_dir
from ..store.writer import ShardedWriter, StoreIdentity, matches, mismatch
from .backbones import LoadedBackbone, get_spec, load_backbone, preprocessing_record
from .dataset import DECODE_SIZE, ShardBatchSampler, ViewsDataset, collate_views, raise_bad_image
from .distributed import PeerFailed, Ranks, init_ranks

FP16_MAX = float(torch.finfo(torch.float16).max)  # the store keeps float16: anything beyond is inf there
BAD_ROWS_SHOWN = 5


@dataclass
class ExtractResult:
    store_dir: Path
    written: list[str] = field(default_factory=list)  # "split.backbone" sealed by this run
    skipped: list[str] = field(default_factory=list)  # already complete with the same identity
    views_per_second: float = 0.0  # of this process (under torchrun: each process its own share)
    device: str = "cpu"
    precision: str = "fp32"
    compiled: bool = False
    workers: int = 0


class StoreConflict(GeoscoutError, ValueError):
    """The store folder already holds features of other data, weights, preprocessing or precision."""


class NonFiniteFeatures(GeoscoutError, FloatingPointError):
    """A backbone produced inf/nan (or values float16 cannot hold) for some views."""


class CompileFailed(GeoscoutError, RuntimeError):
    """torch.compile could not compile a backbone on this machine (no C compiler, an unsupported op...)."""


def _compiled(embedder):
    """The embedder compiled for one batch shape; a compiler failure becomes one line naming --no-compile."""
    compiled = torch.compile(embedder, dynamic=False)

    def run(images: torch.Tensor) -> dict[str, torch.Tensor]:
        try:
            return compiled(images)
        except torch._dynamo.exc.TorchDynamoException as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CompileFailed(f"torch.compile failed for {embedder.spec.name} ({first}); rerun with --no-compile "
                                "(`geoscout doctor` says whether compile works here)") from exc
    return run


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


def _embed(runners: dict, images: torch.Tensor, *, flip: bool, pad_to: int | None) -> dict[str, dict[str, torch.Tensor]]:
    """{backbone: {output: (B, 4, D) float32 on the device}} for a (B, 4, 3, S, S) uint8 batch.

    With `pad_to`, a short batch is padded with blank locations to that many, so that a compiled
    model always sees one shape (no recompilation for a shard's last batch); the padding is cut off.
    """
    b = images.shape[0]
    if pad_to is not None and b < pad_to:
        images = torch.cat([images, images.new_zeros((pad_to - b, *images.shape[1:]))])
    flat = images.flatten(0, 1)  # every view is embedded independently
    out = {}
    for name, run in runners.items():
        result = run(flat)
        if flip:  # mirrored on the device: the uint8 batch is already there, no second decode
            result[FLIP_DATASET] = run(flat.flip(-1))["features"]
        out[name] = {key: value.float().reshape(-1, len(VIEWS), value.shape[-1])[:b] for key, value in result.items()}
    return out


def embed_batch(runners: dict, images: torch.Tensor, ok: torch.Tensor, rows: np.ndarray, table: SplitTable, *,
                precision: str, flip: bool = False, pad_to: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """What the store holds for a (B, 4, 3, S, S) uint8 batch of `table`'s `rows`: {backbone: {dataset: (B, 4, D)
    float16}}, masked views zeroed, every value checked to be finite and to fit float16."""
    outputs = _embed(runners, images, flip=flip, pad_to=pad_to)
    return {name: _to_store(name, out, ok, rows, table, precision) for name, out in outputs.items()}


def _to_store(name: str, outputs: dict[str, torch.Tensor], ok: torch.Tensor, rows: np.ndarray, table: SplitTable,
              precision: str) -> dict[str, np.ndarray]:
    """float16 arrays for the store, after checking every embedded view is finite and fits float16."""
    arrays = {}
    for key, value in outputs.items():
        keep = ok.to(value.device)[..., None]
        value = torch.where(keep, value, 0.0)  # a masked view is zeros, whatever the model made of a blank image
        bad = ~(torch.isfinite(value) & (value.abs() <= FP16_MAX)).all(-1)
        arrays[key], bad = value.to(torch.float16).cpu().numpy(), bad.cpu().numpy()
        if bad.any():
            found = [f"sample_id={table.sample_id[rows[i]]} view={VIEWS[v]}" for i, v in zip(*np.nonzero(bad))]
            more = f" and {len(found) - BAD_ROWS_SHOWN} more" if len(found) > BAD_ROWS_SHOWN else ""
            fix = "; rerun with --precision fp32" if precision != "fp32" else ""
            raise NonFiniteFeatures(
                f"backbone {name} produced inf/nan (or values beyond float16's +-65504, which the store cannot hold) "
                f"in {key!r} at precision {precision} for {table.name} {', '.join(found[:BAD_ROWS_SHOWN])}{more}{fix}; "
                "check those images"
            )
    return arrays


def backbone_identity(loaded: LoadedBackbone, precision: str) -> tuple[dict, dict, str]:
    """(spec, preprocessing, backbone_fingerprint) as a store records them for this loaded backbone at `precision`."""
    spec = loaded.spec  # as loaded: a CLIP checkpoint's config decides its sizes
    spec_dict = json.loads(json.dumps(asdict(spec), default=str))
    preprocessing = {**preprocessing_record(spec), "decode_size": DECODE_SIZE}
    return spec_dict, preprocessing, backbone_fingerprint(spec_dict, loaded.weights_identity, preprocessing,
                                                          precision=precision)


def _identity(loaded: LoadedBackbone, name: str, table: SplitTable, competition: Competition, *, flip: bool,
              shard_size: int, precision: str) -> StoreIdentity:
    spec_dict, preprocessing, fingerprint = backbone_identity(loaded, precision)
    dims = {**loaded.output_dims, **({FLIP_DATASET: loaded.spec.embed_dim} if flip else {})}
    return StoreIdentity(
        split=table.name, backbone=name, n_rows=len(table), split_fingerprint=table.fingerprint(),
        dataset_fingerprint=competition.fingerprint(), backbone_fingerprint=fingerprint, spec=spec_dict,
        weights_identity=loaded.weights_identity, preprocessing=preprocessing,
        classes=competition.classes.state_idx.tolist(), dims=dims, shard_size=shard_size, precision=precision,
    )


def _plan(store_dir: Path, competition: Competition, splits: tuple[str, ...], loaded: dict[str, LoadedBackbone], *,
          flip: bool, shard_size: int, precision: str, overwrite: bool, device: str) -> list[dict]:
    """Rank 0's decision, shared with every rank: per split, which stores are complete, which are
    to be written (their identities) and which shards are still to compute."""
    plan = []
    for split_name in splits:
        table = competition.split(split_name)
        entry: dict = {"split": split_name, "skipped": [], "identities": {}, "pending": []}
        writers = []
        for name, backbone in loaded.items():
            identity = _identity(backbone, name, table, competition, flip=flip, shard_size=shard_size, precision=precision)
            final = features_path(store_dir, split_name, name)
            if matches(final, identity):
                shutil.rmtree(shard_dir(store_dir, split_name, name), ignore_errors=True)  # a kill after sealing leaves them
                entry["skipped"].append(name)
                continue
            if final.exists() and not overwrite:
                raise StoreConflict(
                    f"{final} exists but {mismatch(final, identity)}; pass --overwrite to replace it, or use another store folder"
                )
            writer = ShardedWriter(store_dir, identity)
            writer.prepare(device)
            writers.append(writer)
            entry["identities"][name] = asdict(identity)
        if writers:
            entry["pending"] = sorted(set().union(*(w.pending_shards() for w in writers)))
        plan.append(entry)
    return plan


def _rows(table: SplitTable, start: int, stop: int) -> SplitTable:
    return replace(
        table, sample_id=table.sample_id[start:stop], image_names=table.image_names[start:stop],
        state_idx=None if table.state_idx is None else table.state_idx[start:stop],
        latlon=None if table.latlon is None else table.latlon[start:stop],
    )


def _check_images(ranks: Ranks, competition: Competition, splits: tuple[str, ...], *, progress: bool) -> None:
    """Decode every image before any GPU time is spent, each rank a contiguous share of the rows."""
    threads = max(2, 2 * usable_cpus() // ranks.local_world_size)

    def my_share() -> list[dict]:
        found = []
        for split_name in splits:
            table = competition.split(split_name)
            start, stop = (len(table) * ranks.rank // ranks.world_size, len(table) * (ranks.rank + 1) // ranks.world_size)
            for p in find_image_problems(_rows(table, start, stop), workers=threads, progress=progress and ranks.is_main):
                found.append(asdict(replace(p, line=None if p.line is None else p.line + start)))
        return found

    problems = [Problem(**p) for share in ranks.gather("check images", my_share) for p in share]
    if problems and ranks.is_main:
        raise InputError(problems, f"{competition.root} images")
    if problems:
        raise PeerFailed(f"stopped: {len(problems)} bad image(s), listed by the torchrun process of rank 0")


def default_batch_size(device: torch.device) -> int:
    """Views per forward pass when none is given."""
    # on CPU, 32 views keep the float copy of a batch under glibc's 32 MB mmap threshold (BENCHMARKS.md)
    return 256 if device.type == "cuda" else 32


def _select_device(name: str, ranks: Ranks) -> torch.device:
    device = resolve_device(name, local_rank=ranks.local_rank, world_size=ranks.world_size)
    if device.type == "cuda":
        # before any CUDA work: otherwise the pin-memory thread of every rank opens a context on GPU 0
        torch.cuda.set_device(device)
    return device


def _describe(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


def extract(
    data_dir: Path,
    store_dir: Path,
    *,
    backbones: list[str],
    weights: dict[str, str | None] | None = None,
    splits: tuple[str, ...] = SPLITS,
    device: str = "auto",
    precision: str = "auto",
    compile: bool | None = None,
    batch_size: int = 0,
    workers: int = -1,
    bad_images: str = "fail",
    shard_size: int = 1024,
    overwrite: bool = False,
    check_images: bool = True,
    flip: bool = False,
    layers: int = 0,
    progress: bool = True,
) -> ExtractResult:
    """Embed every view of `splits` with each backbone into `store_dir` (see store/layout.py).

    Rerunning after a crash resumes from the last whole shard. Under torchrun, ranks split the
    shards and rank 0 seals the files, which come out identical to a single-process run.
    `precision` (auto, fp32, bf16, fp16; see device.resolve_precision) is part of each store's
    identity: a store is never completed or reused at another precision. `compile` (None: on for
    CUDA, off on the CPU) compiles each backbone once, for one batch shape. `flip` also embeds
    every view mirrored left-right, as `features_flip` (flip test-time augmentation). `layers` K > 0
    also stores the last K blocks' class tokens and the final patch-token mean (docs/store.md).
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
    if bad_images not in ("fail", "mask"):
        raise ConfigError(f"bad-image policy {bad_images!r}; choose 'fail' or 'mask'")
    ranks = init_ranks()
    try:
        return _extract(ranks, Path(data_dir), store_dir, backbones=backbones, weights=weights, splits=tuple(splits),
                        device=device, precision=precision, compile=compile, batch_size=batch_size, workers=workers,
                        bad_images=bad_images, shard_size=shard_size, overwrite=overwrite, check_images=check_images,
                        flip=flip, layers=layers, progress=progress)
    except BaseException as exc:
        ranks.publish_failure(exc)  # no-op alone; under torchrun the other ranks stop at once
        raise
    finally:
        ranks.close()


def _extract(ranks: Ranks, data_dir: Path, store_dir: Path, *, backbones, weights, splits, device, precision, compile,
             batch_size, workers, bad_images, shard_size, overwrite, check_images, flip, layers, progress) -> ExtractResult:
    torch_device = ranks.step("choose the device", lambda: _select_device(device, ranks))
    precision = resolve_precision(precision, torch_device)
    compiled = torch_device.type == "cuda" if compile is None else bool(compile)
    batch_size = batch_size or default_batch_size(torch_device)
    locations_per_batch = max(1, batch_size // len(VIEWS))
    if workers < 0:
        workers = default_workers(ranks.local_world_size)
    loader = plan_loader(workers=workers, batch_bytes=locations_per_batch * len(VIEWS) * 3 * DECODE_SIZE**2,
                         processes_on_node=ranks.local_world_size, shm_free=shm_free_bytes())
    if loader.warning and ranks.local_rank == 0:
        warn(loader.warning)
    show = progress and ranks.is_main
    if show:
        print(f"extract: {_describe(torch_device)}, precision {precision}, compile {'on' if compiled else 'off'}, "
              f"batch {locations_per_batch * len(VIEWS)} views, {loader.workers} decoding worker(s)"
              + (f" in each of {ranks.world_size} processes" if ranks.distributed else ""), file=sys.stderr, flush=True)

    competition = ranks.step("read the data", lambda: load_competition(data_dir))
    if check_images and bad_images == "fail":
        _check_images(ranks, competition, splits, progress=show)

    def write_tables() -> None:
        store_dir.mkdir(parents=True, exist_ok=True)
        _write_manifest(store_dir, competition)
        for s in splits:
            _write_samples(store_dir, competition, competition.split(s))

    ranks.step("write the store's tables", write_tables if ranks.is_main else None)
    # the weights are hashed once, by rank 0, whose plan carries the identities to the others
    loaded = ranks.step("load the backbones", lambda: {
        name: load_backbone(name, weights.get(name), torch_device, precision=precision, hash_weights=ranks.is_main,
                            layers=layers)
        for name in backbones
    })
    plan = ranks.broadcast("plan the shards", lambda: _plan(
        store_dir, competition, splits, loaded, flip=flip, shard_size=shard_size, precision=precision, overwrite=overwrite,
        device=torch_device.type))
    # compiled once per backbone (not per split), for one batch shape: short batches are padded
    runners = {name: _compiled(b.embedder) if compiled else b.embedder for name, b in loaded.items()}
    result = ExtractResult(store_dir, device=str(torch_device), precision=precision, compiled=compiled, workers=loader.workers)

    def embed_my_shards() -> int:
        n_views = 0
        for entry in plan:
            if not entry["identities"]:
                continue
            writers = {name: ShardedWriter(store_dir, StoreIdentity(**ident)) for name, ident in entry["identities"].items()}
            n_views += _run_split(
                competition.split(entry["split"]), writers, entry["pending"][ranks.rank::ranks.world_size],
                {name: runners[name] for name in writers}, torch_device, ranks=ranks,
                locations_per_batch=locations_per_batch, loader=loader, bad_images=bad_images, precision=precision,
                pad=compiled, flip=flip, progress=show,
            )
        return n_views

    started = time.perf_counter()
    n_views = ranks.step("embed the views", embed_my_shards)
    elapsed = time.perf_counter() - started
    result.views_per_second = n_views / elapsed if elapsed > 0 else 0.0
    if ranks.is_main:  # the other ranks may leave now: sealing needs only the shard files
        for entry in plan:
            result.skipped += [f"{entry['split']}.{name}" for name in entry["skipped"]]
            for name, ident in entry["identities"].items():
                ShardedWriter(store_dir, StoreIdentity(**ident)).seal(competition.split(entry["split"]).sample_id)
                result.written.append(f"{entry['split']}.{name}")
    return result


def _run_split(table, writers, shards, runners, device, *, ranks, locations_per_batch, loader, bad_images, precision,
               pad, flip, progress) -> int:
    if not shards:
        return 0
    first = next(iter(writers.values()))
    sampler = ShardBatchSampler([first.shard_rows(k) for k in shards], locations_per_batch)
    batches = DataLoader(
        ViewsDataset(table, bad_images=bad_images), batch_sampler=sampler, num_workers=loader.workers,
        collate_fn=collate_views, pin_memory=device.type == "cuda", prefetch_factor=loader.prefetch,
        persistent_workers=False,
    )
    total_views = sum(len(first.shard_rows(k)) for k in shards) * len(VIEWS)
    names = ",".join(runners)
    bar = tqdm(total=total_views, desc=f"extract {table.name} [{names}]", unit="view", disable=not progress, smoothing=0.05)
    with ThreadPoolExecutor(1) as pool:  # shard files are written off the critical path
        assembler = _ShardAssembler(writers, shards, pool, table)
        for rows, images, ok, errors in batches:
            ranks.check(throttle=True)  # another rank's failure stops this one between batches
            if bad_images == "fail":
                raise_bad_image(errors)
            rows = rows.numpy()
            arrays = embed_batch(runners, images.to(device, non_blocking=True), ok, rows, table, precision=precision,
                                 flip=flip, pad_to=locations_per_batch if pad else None)
            assembler.add(rows, arrays, ok.numpy(), errors)
            bar.update(len(rows) * len(VIEWS))
        assembler.wait()
    bar.close()
    return total_views
