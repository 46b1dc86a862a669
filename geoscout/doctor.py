"""`geoscout doctor`: is this machine ready to extract, and how long would it take?

Checks what `extract` depends on (torch, CUDA, bf16, torch.compile, FAISS, /dev/shm, HDF5
locking, free disk, the weights), then times a few batches of each chosen backbone on the
device, as `extract` would run it, and projects the time for the data folder (or for the
competition's size). Every check is a row: ok, warn (works, but slower or with a caveat),
fail (`extract` or a later stage would fail), or info.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .competition import VIEWS
from .device import native_bf16, resolve_device, resolve_precision
from .errors import GeoscoutError
from .extract.backbones import get_spec, load_backbone
from .extract.dataset import DECODE_SIZE, ShardBatchSampler, ViewsDataset, collate_views
from .host import default_workers, free_disk_bytes, plan_loader, shm_free_bytes, usable_cpus

COMPETITION_LOCATIONS = 65_980 + 16_495  # train + test
FP16_BYTES = 2
GIB = 2**30
STATUS_MARK = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "info": ""}


@dataclass
class Finding:
    section: str
    name: str
    value: str
    status: str = "info"  # ok, warn, fail, info


@dataclass
class DoctorReport:
    findings: list[Finding] = field(default_factory=list)
    speeds: dict[str, float] = field(default_factory=dict)  # backbone (and "together") -> views/s on the device
    projected_s: float | None = None

    def add(self, section: str, name: str, value: str, status: str = "info") -> None:
        self.findings.append(Finding(section, name, value, status))

    @property
    def failed(self) -> bool:
        return any(f.status == "fail" for f in self.findings)

    def table(self) -> str:
        width = max(len(f.name) for f in self.findings)
        lines, section = [], None
        for f in self.findings:
            head = f.section if f.section != section else ""
            section = f.section
            lines.append(f"{STATUS_MARK[f.status]:<5} {head:<9} {f.name:<{width}}  {f.value}")
        failures = sum(f.status == "fail" for f in self.findings)
        warnings = sum(f.status == "warn" for f in self.findings)
        lines.append(f"\n{failures} failure(s), {warnings} warning(s)")
        return "\n".join(lines)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _torch(report: DoctorReport, device: torch.device, precision: str) -> None:
    s = "torch"
    report.add(s, "version", torch.__version__)
    report.add(s, "CUDA build", torch.version.cuda or "none (a CPU-only build of torch)")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    report.add(s, "cuDNN", str(cudnn) if cudnn else "none")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    report.add(s, "GPUs", str(count) if count else "none usable", "info")
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        report.add(s, f"GPU {i}", f"{props.name}, {props.total_memory / GIB:.0f} GiB, compute capability {props.major}.{props.minor}")
    report.add(s, "device", str(device), "ok")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if native_bf16(device):
            report.add(s, "bf16", f"native (compute capability {major}.{minor})", "ok")
        else:
            report.add(s, "bf16", f"emulated only (compute capability {major}.{minor}): auto precision is fp16", "warn")
    else:
        report.add(s, "bf16", "CPU autocast (auto precision on the CPU is fp32)")
    report.add(s, "precision", f"{precision} (part of each store's identity)", "ok")


def _compile(report: DoctorReport, device: torch.device) -> bool:
    default = device.type == "cuda"
    started = time.perf_counter()
    # Importing inductor's C++ helpers logs "No CUDA runtime is found" where CUDA_HOME exists without a driver:
    # this table says it in its own words (GPUs: none usable).
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        fn = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2 + 1, dynamic=False)
        x = torch.randn(64, 64, device=device)
        if not torch.allclose(fn(x), torch.nn.functional.gelu(x) * 2 + 1, atol=1e-5):
            raise RuntimeError("compiled result differs from eager")
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        fix = "extract compiles by default here: pass --no-compile" if default else "extract does not compile on the CPU by default"
        report.add("compile", "torch.compile", f"fails ({_first_line(exc)}); {fix}", "fail" if default else "warn")
        return False
    when = "on by default with CUDA (--no-compile to opt out)" if default else "off by default on the CPU (--compile to opt in)"
    report.add("compile", "torch.compile", f"works ({time.perf_counter() - started:.1f} s for a small function); {when}", "ok")
    return True


def _faiss(report: DoctorReport) -> None:
    s = "faiss"
    installed = {d.metadata["Name"].lower() for d in importlib.metadata.distributions() if d.metadata["Name"]}
    wheels = sorted(n for n in installed if n == "faiss-cpu" or n.startswith("faiss-gpu"))
    if len(wheels) > 1:
        report.add(s, "wheels", f"{' and '.join(wheels)} are both installed and overwrite each other's faiss package: "
                   f"pip uninstall -y {' '.join(wheels)}, then install one (geoscout[cpu] or geoscout[gpu])", "fail")
    try:
        import faiss

        from .index import index_name
    except ImportError as exc:
        report.add(s, "faiss", f"{_first_line(exc)} (knn and the retrieval head need it)", "fail")
        return
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    report.add(s, "version", f"{faiss.__version__} ({', '.join(wheels) or 'not from a pip wheel'})", "ok" if len(wheels) <= 1 else "fail")
    if torch.cuda.is_available() and not gpus:
        report.add(s, "index", f"{index_name('auto')}: this faiss build sees no GPU "
                   "(pip uninstall faiss-cpu, then pip install 'geoscout[gpu]' to search on the GPU)", "warn")
    else:
        report.add(s, "index", f"{index_name('auto')} (GPUs seen by faiss: {gpus})", "ok")


def _host(report: DoctorReport, *, workers: int, batch_views: int) -> int:
    s = "host"
    report.add(s, "CPUs", f"{usable_cpus()} usable by this process (of {os.cpu_count()} on the machine)")
    batch_bytes = (batch_views // len(VIEWS)) * len(VIEWS) * 3 * DECODE_SIZE**2
    shm = shm_free_bytes()
    plan = plan_loader(workers=workers, batch_bytes=batch_bytes, shm_free=shm)
    if shm is None:
        report.add(s, "/dev/shm", "none here: DataLoader workers share batches another way")
    elif plan.warning:
        report.add(s, "/dev/shm", plan.warning, "warn")
    else:
        report.add(s, "/dev/shm", f"{shm / GIB:.1f} GiB free; {plan.workers} workers x {plan.prefetch} batches of "
                   f"{batch_bytes / 2**20:.0f} MiB fit", "ok")
    report.add(s, "workers", f"{plan.workers} decoding worker(s) (--workers)")
    return plan.workers


def _hdf5(report: DoctorReport, folder: Path) -> None:
    import h5py

    from .store.h5 import FileLockError, open_h5

    s = "store"
    report.add(s, "HDF5", f"{h5py.version.hdf5_version} (h5py {h5py.version.version}); "
               f"HDF5_USE_FILE_LOCKING={os.environ.get('HDF5_USE_FILE_LOCKING', 'unset')}")
    probe_dir = folder if folder.exists() else next(p for p in folder.absolute().parents if p.exists())
    try:
        fd, name = tempfile.mkstemp(prefix=".geoscout-doctor-", suffix=".h5", dir=probe_dir)
        os.close(fd)
    except OSError as exc:
        report.add(s, "locking", f"cannot write in {probe_dir}: {_first_line(exc)}", "fail")
        return
    try:
        with open_h5(Path(name), "w") as f:
            f["x"] = [1]
        with open_h5(Path(name), "r") as f:
            f["x"][()]
        report.add(s, "locking", f"HDF5 files lock and reopen in {probe_dir}", "ok")
    except FileLockError as exc:
        report.add(s, "locking", str(exc), "fail")
    finally:
        os.unlink(name)


def _disk(report: DoctorReport, folder: Path, locations: int, dims: dict[str, int]) -> None:
    per_backbone = {name: locations * len(VIEWS) * dim * FP16_BYTES for name, dim in dims.items()}
    total = sum(per_backbone.values())
    peak = total + max(per_backbone.values(), default=0)  # one store's shards beside the files being sealed
    free = free_disk_bytes(folder)
    sizes = ", ".join(f"{n} {_size(b)}" for n, b in per_backbone.items())
    verdict = "ok" if free >= peak else "fail"
    report.add("store", "disk", f"{_size(free)} free at {folder}; the store needs {_size(total)} "
               f"({sizes}: {locations:,} locations x 4 views x dims x 2 bytes), {_size(peak)} at its peak", verdict)


def _size(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.1f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.1f} MiB"


def _load(report: DoctorReport, name: str, weights: str | None, device: torch.device, precision: str):
    """The backbone as extract would load it; a real one without usable weights is timed with random
    weights (speed does not depend on them), and the row says so."""
    spec = get_spec(name)
    if weights is not None:
        try:
            loaded = load_backbone(spec, weights, device, precision=precision)
        except GeoscoutError as exc:
            report.add("weights", name, f"{exc}; timed with random weights", "fail")
        else:
            identity = loaded.weights_identity or {}
            files = ", ".join(f"{f} sha256 {h[:16]}" for f, h in identity.get("files", {}).items())
            revision = f" (hub {identity['repo_id']}@{identity['revision'][:12]})" if identity.get("repo_id") else ""
            report.add("weights", name, f"{weights}: {files}{revision}", "ok")
            return loaded
    elif spec.random_init:
        report.add("weights", name, "random init by design (tests and demos)")
    else:
        report.add("weights", name, f"none given: extract refuses it without --weights {name}=PATH "
                   f"(a local copy of {spec.default_weights}); timed with random weights", "warn")
    random = spec if spec.random_init else get_spec(f"random:{spec.name}")
    return load_backbone(random, None, device, precision=precision)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_backbone(embedder, device: torch.device, *, batch_views: int, batches: int, compile: bool) -> tuple[float, float]:
    """(views/s in steady state, seconds of warm-up including compilation) on random uint8 views."""
    run = torch.compile(embedder, dynamic=False) if compile else embedder
    images = torch.randint(0, 256, (batch_views, 3, DECODE_SIZE, DECODE_SIZE), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    started = time.perf_counter()
    for _ in range(2 if compile else 1):
        run(images)
    _sync(device)
    warmup = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(batches):
        run(images)
    _sync(device)
    return batches * batch_views / (time.perf_counter() - started), warmup


def _decode_rate(competition, *, batch_views: int, batches: int, workers: int) -> float:
    """Views/s of extract's DataLoader over the first batches of the train split (no model)."""
    from torch.utils.data import DataLoader

    table = competition.train
    per_batch = max(1, batch_views // len(VIEWS))
    rows = range(min(len(table), per_batch * (batches + 1)))
    loader = DataLoader(ViewsDataset(table, bad_images="mask"), batch_sampler=ShardBatchSampler([rows], per_batch),
                        num_workers=workers, collate_fn=collate_views, prefetch_factor=2 if workers else None)
    it = iter(loader)
    next(it)  # worker start-up is not decoding speed
    started, views = time.perf_counter(), 0
    for row_ids, *_ in it:
        views += len(row_ids) * len(VIEWS)
    seconds = time.perf_counter() - started
    return views / seconds if views and seconds > 0 else float("nan")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def run_doctor(
    data_dir: Path | None = None,
    *,
    backbones: list[str],
    weights: dict[str, str] | None = None,
    store_dir: Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    compile: bool | None = None,
    batch_size: int = 0,
    batches: int = 3,
    workers: int = -1,
) -> DoctorReport:
    """Every check, then the timing; a bad device name is an error (ConfigError), all else is a row."""
    report = DoctorReport()
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)
    compile = torch_device.type == "cuda" if compile is None else compile
    batch_views = batch_size or (256 if torch_device.type == "cuda" else 32)
    weights = {get_spec(n).name: w for n, w in (weights or {}).items()}
    names = list(dict.fromkeys(get_spec(n).name for n in backbones))
    folder = Path(store_dir) if store_dir is not None else Path.cwd()

    _torch(report, torch_device, precision)
    if not _compile(report, torch_device) and compile:
        compile = False  # timed eager, as `extract --no-compile` would run
    _faiss(report)
    workers = _host(report, workers=workers if workers >= 0 else default_workers(), batch_views=batch_views)

    competition, locations = None, COMPETITION_LOCATIONS
    if data_dir is not None:
        from .data import load_competition

        try:
            competition = load_competition(data_dir)
            locations = len(competition.train) + len(competition.test)
            report.add("data", "folder", f"{data_dir}: {len(competition.train):,} train + {len(competition.test):,} test locations", "ok")
        except GeoscoutError as exc:
            report.add("data", "folder", f"{data_dir}: {_first_line(exc)} (see `geoscout validate`)", "fail")
    what = f"{data_dir}" if competition is not None else "the competition"

    loaded = {name: _load(report, name, weights.get(name), torch_device, precision) for name in names}
    _hdf5(report, folder)
    _disk(report, folder, locations, {name: b.spec.embed_dim + (b.spec.projected_dim or 0) for name, b in loaded.items()})

    s = "speed"
    report.add(s, "setting", f"{torch_device}, precision {precision}, compile {'on' if compile else 'off'}, "
               f"batch {batch_views} views, {batches} timed batch(es) after warm-up")
    for name in names:
        embedder = loaded.pop(name).embedder  # one model on the device at a time
        rate, warmup = _time_backbone(embedder, torch_device, batch_views=batch_views, batches=batches, compile=compile)
        report.speeds[name] = rate
        report.add(s, name, f"{rate:,.0f} views/s (warm-up {'and compilation ' if compile else ''}{warmup:.1f} s)")
        del embedder
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()
    together = 1 / sum(1 / r for r in report.speeds.values())
    report.speeds["together"] = together
    report.add(s, "together", f"{together:,.0f} views/s: each view through {' and '.join(names)}")
    n_views = locations * len(VIEWS)
    bound = together
    if competition is not None:
        decode = _decode_rate(competition, batch_views=batch_views, batches=batches, workers=workers)
        report.add(s, "decoding", f"{decode:,.0f} views/s of {what}'s JPEGs with {workers} worker(s)")
        bound = min(together, decode) if decode == decode else together
    report.projected_s = n_views / bound
    limit = "the slower of the models and decoding" if competition is not None else "the models alone (no DATA: decoding not timed)"
    report.add(s, "projected", f"{_minutes(report.projected_s)} for {what} ({n_views:,} views) on this one "
               f"{'GPU' if torch_device.type == 'cuda' else 'CPU'}, bounded by {limit}", "ok")
    return report
