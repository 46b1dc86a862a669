"""Reading CSV files as text, so a bad value is reported by its row and column, not by a failed parse."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from .problems import InputError, Problem


def read_csv_as_text(path: Path) -> pl.DataFrame:
    """Every column as text; an empty cell is "" (nothing to parse), like any other text."""
    path = Path(path)
    if not path.is_file():
        raise InputError([Problem(str(path), "file not found")], str(path))
    try:
        df = pl.read_csv(path, infer_schema=False)
    except pl.exceptions.NoDataError:
        return pl.DataFrame()
    except Exception as exc:  # polars raises several types for malformed CSV
        raise InputError([Problem(str(path), f"not a readable CSV file: {exc}")], str(path)) from None
    return df.with_columns(pl.all().fill_null(""))


def parse_int(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def parse_float(text: str) -> float | None:
    """A finite float, or None (so "nan" and "inf" are reported like any other bad value)."""
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None
