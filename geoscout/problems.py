"""Bad input is reported as a list of problems, each naming the file, row, column and value."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import GeoscoutError


@dataclass(frozen=True)
class Problem:
    file: str
    message: str
    line: int | None = None  # line in the file as an editor shows it (the CSV header is line 1)
    sample_id: str | None = None
    column: str | None = None
    value: object = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        parts = [where]
        if self.sample_id is not None:
            parts.append(f"sample_id={self.sample_id}")
        if self.column is not None:
            parts.append(f"column {self.column}" + ("" if self.value is None else f"={self.value!r}"))
        return " ".join(parts) + f": {self.message}"


class InputError(GeoscoutError):
    """Raised with every problem found, not just the first, so one run shows all that needs fixing."""

    def __init__(self, problems: list[Problem], what: str = "input"):
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{len(self.problems)} problem(s) in {what}:\n{shown}{more}")


def csv_line(row_index: int) -> int:
    """Editor line of a 0-based data row (after the header line)."""
    return row_index + 2
