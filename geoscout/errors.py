"""What the user can fix, as opposed to what is a bug.

`GeoscoutError` is the one base of every expected failure: bad input, a missing file, a store or
head that does not fit, an unknown setting. The CLI prints such errors as one line and exits 1;
anything else is a bug and keeps its traceback. `GeoscoutWarning` is the category of the plain
sentences geoscout warns with; the CLI prints them without Python's source-line echo.
"""

from __future__ import annotations

import warnings


class GeoscoutError(Exception):
    """An expected failure the user can act on; the message says what is wrong and what to do."""


class ConfigError(GeoscoutError, ValueError):
    """A setting that is not valid: an unknown backbone, preset, split, device or config key."""


class MissingFileError(GeoscoutError, FileNotFoundError):
    """A file or folder a command needs is not there (usually: an earlier stage has not run)."""


class GeoscoutWarning(UserWarning):
    """Something the user should know that does not stop the work."""


def warn(message: str) -> None:
    """Warn in a plain sentence (the CLI shows `warning: <message>`)."""
    warnings.warn(message, GeoscoutWarning, stacklevel=3)
