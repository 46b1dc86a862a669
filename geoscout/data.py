"""The competition folder, read exactly as published, and checked before any GPU time is spent."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .competition import (
    CSV_OF_SPLIT,
    IMAGE_COLUMNS,
    IMAGE_DIRS,
    LABEL_COLUMNS,
    MAPPING_CSV,
    SPLITS,
    TEST_CSV,
    TRAIN_CSV,
    VIEWS,
)
from .csvio import parse_float, parse_int, read_csv_as_text
from .errors import ConfigError
from .images import ImageError, check_jpeg
from .problems import InputError, Problem, csv_line
from .states import NUM_STATES, STATES


@dataclass(frozen=True)
class SplitTable:
    """One split's rows in CSV order; labels are None for the test split."""

    name: str
    csv_path: Path
    images_dir: Path
    sample_id: np.ndarray  # (N,) int64
    image_names: np.ndarray  # (N, 4) str, N/E/S/W, relative to images_dir
    state_idx: np.ndarray | None = None  # (N,) int64
    latlon: np.ndarray | None = None  # (N, 2) float64

    def __len__(self) -> int:
        return len(self.sample_id)

    def fingerprint(self) -> str:
        """Identity of the rows (ids, image names, labels, in order): features are keyed to it."""
        h = hashlib.sha256(f"{self.name}\n".encode())
        h.update(self.sample_id.astype("<i8").tobytes())
        h.update("\0".join(self.image_names.ravel().tolist()).encode())
        if self.state_idx is not None:
            h.update(self.state_idx.astype("<i8").tobytes())
            h.update(self.latlon.astype("<f8").tobytes())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class ClassMap:
    """The states that occur in training, as contiguous class ids (sorted by state_idx)."""

    state_idx: np.ndarray  # (C,) int64

    @property
    def names(self) -> list[str]:
        return [STATES[i] for i in self.state_idx]

    def __len__(self) -> int:
        return len(self.state_idx)

    def to_class(self, state_idx: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.state_idx, state_idx)
        pos = np.clip(pos, 0, len(self.state_idx) - 1)
        if not np.all(self.state_idx[pos] == state_idx):
            unknown = sorted(set(np.asarray(state_idx).tolist()) - set(self.state_idx.tolist()))
            raise ValueError(f"state_idx {unknown} not among the training classes {self.state_idx.tolist()}")
        return pos

    def to_state_idx(self, class_id: np.ndarray) -> np.ndarray:
        """Class ids back to state_idx; negative ids (no prediction) stay -1."""
        class_id = np.asarray(class_id)
        return np.where(class_id >= 0, self.state_idx[np.clip(class_id, 0, None)], -1)


@dataclass(frozen=True)
class Competition:
    root: Path
    train: SplitTable
    test: SplitTable
    classes: ClassMap

    def split(self, name: str) -> SplitTable:
        if name not in IMAGE_DIRS:
            raise ConfigError(f"unknown split {name!r}; available: {', '.join(SPLITS)}")
        return self.train if name == "train" else self.test

    def fingerprint(self) -> str:
        """Identity of the whole dataset: a head trained on it may predict on either split."""
        parts = [self.train.fingerprint(), self.test.fingerprint(), ",".join(map(str, self.classes.state_idx))]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _read_mapping(path: Path) -> tuple[dict[int, str], list[Problem]]:
    file = str(path)
    df = read_csv_as_text(path)
    name_col = "state" if "state" in df.columns else "state_name"
    problems = [Problem(file, f"missing required column {c!r}; found {df.columns}", column=c)
                for c in ("state_idx", name_col) if c not in df.columns]
    if df.width == 0:
        return {}, [Problem(file, "the CSV is empty (no header)")]
    if problems:
        return {}, problems
    mapping: dict[int, str] = {}
    for i, (s, name) in enumerate(df.select("state_idx", name_col).iter_rows()):
        idx = parse_int(s)
        where = dict(line=csv_line(i))
        if idx is None or not 0 <= idx < NUM_STATES:
            problems.append(Problem(file, f"state_idx must be an integer in 0..{NUM_STATES - 1}", column="state_idx", value=s, **where))
        elif name.strip() != STATES[idx]:
            problems.append(Problem(file, f"state_idx {idx} is {STATES[idx]!r} in the alphabetical list of states", column=name_col, value=name, **where))
        elif idx in mapping:
            problems.append(Problem(file, "state_idx listed twice", column="state_idx", value=s, **where))
        else:
            mapping[idx] = name.strip()
    return mapping, problems


def _image_name_problem(name: str) -> str | None:
    if name == "":
        return "empty image name"
    if "\0" in name:
        return "image name contains a NUL byte"
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        return "image name is an absolute path; it must be relative to the images folder"
    if ".." in Path(name.replace("\\", "/")).parts:
        return "image name contains '..'; it must stay inside the images folder"
    return None


def _read_split(root: Path, split: str, mapping: dict[int, str]) -> tuple[SplitTable | None, list[Problem]]:
    path = root / CSV_OF_SPLIT[split]
    file = str(path)
    labelled = split == "train"
    try:
        df = read_csv_as_text(path)
    except InputError as exc:
        return None, exc.problems
    required = ("sample_id", *IMAGE_COLUMNS, *(LABEL_COLUMNS if labelled else ()))
    if df.width == 0:
        return None, [Problem(file, "the CSV is empty (no header)")]
    problems = [Problem(file, f"missing required column {c!r}; found {df.columns}", column=c) for c in required if c not in df.columns]
    if problems:
        return None, problems
    if df.height == 0:
        return None, [Problem(file, "the CSV has a header but no rows")]

    n = df.height
    ids = np.zeros(n, dtype=np.int64)
    names = np.array(df.select(IMAGE_COLUMNS).rows(), dtype=object).astype(str)
    state_idx = np.zeros(n, dtype=np.int64)
    latlon = np.zeros((n, 2), dtype=np.float64)
    seen: dict[int, int] = {}
    for i, row in enumerate(df.select(required).iter_rows(named=True)):
        raw_id = row["sample_id"]
        sid = parse_int(raw_id)
        where = dict(line=csv_line(i), sample_id=raw_id.strip())
        if sid is None:
            problems.append(Problem(file, "sample_id must be an integer", column="sample_id", value=raw_id, **where))
        elif sid in seen:
            problems.append(Problem(file, f"duplicate sample_id (first at line {csv_line(seen[sid])})", column="sample_id", value=raw_id, **where))
        else:
            seen[sid] = i
            ids[i] = sid
        for col in IMAGE_COLUMNS:
            why = _image_name_problem(row[col])
            if why:
                problems.append(Problem(file, why, column=col, value=row[col], **where))
        if not labelled:
            continue
        idx = parse_int(row["state_idx"])
        if idx is None or not 0 <= idx < NUM_STATES:
            problems.append(Problem(file, f"state_idx must be an integer in 0..{NUM_STATES - 1}", column="state_idx", value=row["state_idx"], **where))
        elif mapping and idx not in mapping:
            problems.append(Problem(file, f"state_idx {idx} is not in {MAPPING_CSV}", column="state_idx", value=row["state_idx"], **where))
        elif row["state"].strip() != STATES[idx]:
            problems.append(Problem(file, f"state disagrees with state_idx {idx} ({STATES[idx]!r})", column="state", value=row["state"], **where))
        else:
            state_idx[i] = idx
        for j, (col, bound) in enumerate((("latitude", 90), ("longitude", 180))):
            value = parse_float(row[col])
            if value is None or not -bound <= value <= bound:
                problems.append(Problem(file, f"must be a finite number in [-{bound}, {bound}]", column=col, value=row[col], **where))
            else:
                latlon[i, j] = value
    if problems:
        return None, problems
    table = SplitTable(
        name=split, csv_path=path, images_dir=root / IMAGE_DIRS[split], sample_id=ids, image_names=names,
        state_idx=state_idx if labelled else None, latlon=latlon if labelled else None,
    )
    return table, []


def load_competition(root: Path) -> Competition:
    """Read and check the three CSVs (not the images); raise InputError listing every problem."""
    root = Path(root)
    if not root.is_dir():
        raise InputError([Problem(str(root), "data folder not found")], str(root))
    problems: list[Problem] = []
    try:
        mapping, mapping_problems = _read_mapping(root / MAPPING_CSV)
    except InputError as exc:
        mapping, mapping_problems = {}, exc.problems
    problems += mapping_problems
    train, p = _read_split(root, "train", mapping)
    problems += p
    test, p = _read_split(root, "test", mapping)
    problems += p
    if train is not None and test is not None:
        overlap = set(train.sample_id.tolist()) & set(test.sample_id.tolist())
        if overlap:
            problems.append(Problem(str(root / TEST_CSV), f"{len(overlap)} sample_id(s) also in {TRAIN_CSV}, e.g. {sorted(overlap)[:5]}", column="sample_id"))
    if problems:
        raise InputError(problems, str(root))
    classes = ClassMap(np.unique(train.state_idx))
    return Competition(root=root, train=train, test=test, classes=classes)


@lru_cache(maxsize=8)
def _resolved_dir(images_dir: Path) -> Path:
    # resolved once, not once per image: 330k resolves of the same folder showed up in profiles
    return images_dir.resolve()


def resolve_image(images_dir: Path, name: str) -> Path:
    """The file an image name points to; refuses names that escape the images folder (symlinks too)."""
    why = _image_name_problem(name)
    if why:
        raise ImageError(why)
    try:
        resolved = (images_dir / name).resolve(strict=True)
    except FileNotFoundError:
        raise ImageError("image file not found") from None
    except OSError as exc:  # e.g. a symlink loop
        raise ImageError(f"cannot resolve image path: {exc}") from None
    if not resolved.is_relative_to(_resolved_dir(images_dir)):
        raise ImageError(f"resolves outside the images folder (to {resolved})")
    return resolved


def _check_one_image(images_dir: Path, name: str) -> str | None:
    try:
        check_jpeg(resolve_image(images_dir, name))
    except ImageError as exc:
        return str(exc)
    return None


def find_image_problems(split: SplitTable, *, workers: int | None = None, progress: bool = True) -> list[Problem]:
    """Decode every image of a split in parallel (PIL releases the GIL while decoding)."""
    workers = workers or min(32, (os.cpu_count() or 1) * 2)
    names = split.image_names.ravel().tolist()
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda n: _check_one_image(split.images_dir, n), names, chunksize=64)
        results = list(tqdm(results, total=len(names), desc=f"checking {split.name} images", unit="img", disable=not progress))
    problems = []
    for flat, why in enumerate(results):
        if why is not None:
            row, view = divmod(flat, len(VIEWS))
            problems.append(Problem(
                str(split.csv_path), why, line=csv_line(row), sample_id=str(split.sample_id[row]),
                column=IMAGE_COLUMNS[view], value=names[flat],
            ))
    return problems


@dataclass(frozen=True)
class ValidationReport:
    competition: Competition | None
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        c = self.competition
        if c is None:
            return "no summary: the CSVs could not be read"
        counts = Counter(c.train.state_idx.tolist())
        lines = [
            f"data folder: {c.root}",
            f"train: {len(c.train)} locations, {len(c.train) * len(VIEWS)} images",
            f"test:  {len(c.test)} locations, {len(c.test) * len(VIEWS)} images",
            f"states in train: {len(c.classes)} (classes), fingerprint {c.fingerprint()}",
            "per-state training locations:",
        ]
        for idx in c.classes.state_idx:
            lines.append(f"  {idx:>2} {STATES[idx]:<16} {counts[int(idx)]:>7}")
        return "\n".join(lines)


def validate_competition(root: Path, *, check_images: bool = True, workers: int | None = None, progress: bool = True) -> ValidationReport:
    """Everything `geoscout validate` checks: CSVs first, then every image of both splits."""
    try:
        competition = load_competition(root)
    except InputError as exc:
        return ValidationReport(None, exc.problems)
    problems: list[Problem] = []
    if check_images:
        for split in (competition.train, competition.test):
            if not split.images_dir.is_dir():
                problems.append(Problem(str(split.images_dir), "images folder not found"))
                continue
            problems += find_image_problems(split, workers=workers, progress=progress)
    return ValidationReport(competition, problems)
