"""Resolve `--weights` (local file/folder or hub id), read checkpoints safely, and fingerprint them."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..errors import GeoscoutError

# Preferred first: safetensors cannot run code when read.
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip hub repos
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
HUB_ID = re.compile(r"^(?:hf-hub:)?(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
HUB_TIMEOUT_S = 10.0  # fail fast when there is no network rather than hang on retries
WRAPPER_KEYS = ("state_dict", "model")  # training checkpoints that nest the state dict one level down
KEYS_SHOWN = 8


class WeightsError(GeoscoutError, ValueError):
    """Weights are missing, unreachable, unsafe, or do not fit the backbone."""


@dataclass(frozen=True)
class WeightsSource:
    """Where resolved weights live on disk, and which hub revision they came from (if any)."""

    path: Path  # a checkpoint file or a folder
    repo_id: str | None = None
    revision: str | None = None  # the resolved commit, never a moving branch name


def hub_offline() -> bool:
    """True when Hugging Face hub access is switched off; read at call time, not at import."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(f is not None and f.upper() in {"1", "ON", "YES", "TRUE"} for f in flags)


def _local_hint(repo_id: str) -> str:
    return (
        f"download it where there is network (`huggingface-cli download {repo_id} --local-dir DIR`), "
        "copy DIR here and pass --weights DIR"
    )


def resolve_weights(
    weights: str | Path, *, weight_files: Sequence[str], extra_files: Sequence[str] = ()
) -> WeightsSource:
    """A local path as is, or a hub id downloaded (first of `weight_files` the repo has, plus `extra_files`)."""
    local = Path(weights).expanduser()
    if local.exists():
        return WeightsSource(local.resolve())
    match = HUB_ID.match(str(weights))
    if match is None:
        raise WeightsError(f"weights {str(weights)!r}: no such file or folder, and not a hub id (owner/name)")
    repo_id, revision = match["repo"], match["revision"]
    if hub_offline():
        raise WeightsError(
            f"weights {str(weights)!r} is not a local file or folder, and hub downloads are off "
            f"(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE); {_local_hint(repo_id)}"
        )
    return _download(repo_id, revision, weight_files, extra_files)


def _network_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError

    errors: tuple[type[BaseException], ...] = (OSError, HfHubHTTPError)
    try:  # recent huggingface_hub talks through httpx, whose errors are not OSErrors
        import httpx

        errors += (httpx.HTTPError,)
    except ImportError:
        pass
    return errors


def _download(
    repo_id: str, revision: str | None, weight_files: Sequence[str], extra_files: Sequence[str]
) -> WeightsSource:
    from huggingface_hub import HfApi, snapshot_download

    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
        present = {s.rfilename for s in info.siblings or []}
        chosen = next((f for f in weight_files if f in present), None)
        if chosen is None:
            raise WeightsError(f"hub repo {repo_id!r} has none of {', '.join(weight_files)}")
        wanted = [chosen] + [f for f in extra_files if f in present]
        folder = snapshot_download(repo_id, revision=info.sha, allow_patterns=wanted, etag_timeout=HUB_TIMEOUT_S)
    except _network_errors() as err:
        raise WeightsError(f"could not fetch {repo_id!r} from the hub ({err}); {_local_hint(repo_id)}") from err
    return WeightsSource(Path(folder), repo_id=repo_id, revision=info.sha)


def find_weight_file(folder: Path, names: Sequence[str] = WEIGHT_FILE_NAMES) -> Path:
    """The checkpoint inside a model folder, the first of `names` present (safetensors first)."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.iterdir())
    raise WeightsError(
        f"{folder} holds none of {', '.join(names)} (found: {', '.join(found) or 'nothing'})"
    )


def _read_safetensors(path: Path, prefix: str | None) -> dict[str, Tensor]:
    if prefix is None:
        return load_file(str(path), device="cpu")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:  # only the wanted tensors are read
        keys = list(f.keys())
        if not any(k.startswith(prefix) for k in keys):
            return {k: f.get_tensor(k) for k in keys}
        return {k: f.get_tensor(k) for k in keys if k.startswith(prefix)}


def read_state_dict(path: Path, prefix: str | None = None) -> dict[str, Tensor]:
    """Tensors of a .safetensors file, or of a pickled checkpoint read with weights_only (no code runs).

    With `prefix`, a checkpoint holding keys under it (e.g. an open_clip model's "visual.") gives
    only those, still prefixed; one without any such key is returned whole.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state = _read_safetensors(path, prefix)
    elif path.suffix in PICKLE_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise WeightsError(
                f"refusing to load {path}: it holds pickled objects other than tensors, which could run code "
                "when loaded; save just the state dict (or convert it to .safetensors)"
            ) from err
    else:
        raise WeightsError(
            f"{path}: unsupported checkpoint type; expected .safetensors or {', '.join(PICKLE_SUFFIXES)}"
        )
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a state dict of tensors")
    if prefix is not None and any(k.startswith(prefix) for k in state):
        state = {k: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _listing(keys: set[str]) -> str:
    shown = ", ".join(sorted(keys)[:KEYS_SHOWN])
    return shown + (f" (+{len(keys) - KEYS_SHOWN} more)" if len(keys) > KEYS_SHOWN else "")


def check_state_dict_keys(expected: Iterable[str], found: Iterable[str], source: str) -> None:
    """Refuse a checkpoint unless its keys are exactly the expected ones, naming the differences."""
    expected, found = set(expected), set(found)
    missing, unexpected = expected - found, found - expected
    if missing or unexpected:
        parts = ([f"missing keys: {_listing(missing)}"] if missing else []) + (
            [f"unexpected keys: {_listing(unexpected)}"] if unexpected else []
        )
        raise WeightsError(f"{source} does not match the backbone; " + "; ".join(parts))


def sha256_file(path: Path, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def weights_identity(source: WeightsSource, files: Iterable[Path]) -> dict:
    """JSON-serialisable identity of the weights: sha256 of every file read, plus the hub revision."""
    root = source.path if source.path.is_dir() else source.path.parent
    identity: dict = {"files": {str(Path(f).relative_to(root)): sha256_file(Path(f)) for f in files}}
    if source.repo_id is not None:
        identity.update(repo_id=source.repo_id, revision=source.revision)
    return identity
