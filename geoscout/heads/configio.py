"""Head configs as JSON: what a head card stores, and how a config is rebuilt from it."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from ..errors import ConfigError

T = TypeVar("T")


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(cls: type[T], data: dict) -> T:
    """Rebuild a (nested) config dataclass; unknown keys are an error, missing keys take the defaults.
    Lists become tuples where the field is a tuple (JSON has no tuples)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; valid: {sorted(names)}")
    values = {}
    for key, value in data.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = config_from_dict(kind, value)
        elif isinstance(value, list) and typing.get_origin(kind) is tuple:
            values[key] = tuple(value)
        else:
            values[key] = value
    return cls(**values)
