"""Layers point one way: cli -> run/stages -> extract / heads -> store -> data, geo and the other helpers.

A lower module never imports a higher one: checked on the import statements of every module, and on
what importing the lowest ones actually loads."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "geoscout"
# Higher number = higher layer. A module may import its own layer or lower ones only.
LAYERS = {
    "cli": 5,
    "run": 4, "stages": 4, "ablation": 4, "report": 4, "card": 4, "knn": 4, "doctor": 4, "locate": 4,
    "extract": 3, "heads": 3,
    "store": 2, "index": 2,
    "data": 1, "metric": 1, "synth": 1, "images": 1, "geo": 1, "borders": 1, "drawing": 1, "host": 1, "device": 1,
    "testing": 2,  # test data (planted features) built as the store hands them to the heads
    "competition": 0, "csvio": 0, "errors": 0, "problems": 0, "atomic": 0, "states": 0,
}


def _layer(module: str) -> int | None:
    """The layer of a geoscout module name like 'heads.api' or 'store'."""
    return LAYERS.get(module.split(".")[0])


def _imports(path: Path) -> set[str]:
    """geoscout modules imported by a file, as names relative to the package ('heads.api', 'store')."""
    relative = path.relative_to(PACKAGE).with_suffix("")
    package = list(relative.parts[:-1]) if relative.name != "__init__" else list(relative.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                names = [target] if node.module else [".".join([*base, a.name]) for a in node.names]
                found.update(n for n in names if n)
            elif node.module and node.module.startswith("geoscout"):
                found.add(node.module.removeprefix("geoscout").lstrip("."))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("geoscout").lstrip(".") for a in node.names if a.name.startswith("geoscout."))
    return {f for f in found if f}


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "resources" not in p.parts)


def test_every_module_has_a_layer():
    names = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in MODULES} - {"__init__"}
    assert names <= set(LAYERS), f"give these modules a layer: {sorted(names - set(LAYERS))}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path):
    own = _layer(path.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", "."))
    if own is None:  # geoscout/__init__.py
        return
    higher = {m for m in _imports(path) if (_layer(m) or 0) > own}
    assert not higher, f"{path.relative_to(PACKAGE)} (layer {own}) imports {sorted(higher)}"


@pytest.mark.parametrize("module, forbidden", [
    ("geoscout.data", ("geoscout.metric",)),
    ("geoscout.heads", ("geoscout.knn", "geoscout.stages", "geoscout.run", "geoscout.cli")),
])
def test_importing_a_low_module_loads_nothing_above_it(module, forbidden):
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('geoscout')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert not [m for m in loaded if m.startswith(forbidden)], loaded
