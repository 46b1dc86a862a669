"""The README's command lines are real: every `geoscout` command in its code blocks parses with today's CLI
(command names, options and their values). The runs they describe are exercised by test_run.py on
synthetic data with tiny backbones."""

import re
import shlex
from pathlib import Path

import pytest
import typer

from geoscout.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    """Every `geoscout ...` (or `torchrun ... -m geoscout.cli ...`) line in the README's code blocks, with
    backslash continuations joined and comments dropped, as argument lists after the program name."""
    commands = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "geoscout.cli" in words:
                words = words[words.index("geoscout.cli") + 1:]
            elif words[:1] == ["geoscout"]:
                words = words[1:]
            else:
                continue
            commands.append(words)
    return commands


def test_the_readme_documents_commands():
    names = {words[0] for words in readme_commands()}
    assert {"validate", "run", "extract", "doctor"} <= names


@pytest.mark.parametrize("words", readme_commands(), ids=lambda w: " ".join(w)[:60])
def test_every_readme_command_line_parses(words):
    """click parses the arguments without running the command: a renamed option or command fails here."""
    group = typer.main.get_command(app)
    parent = group.context_class(group, info_name="geoscout")
    sub = group.get_command(parent, words[0])
    assert sub is not None, f"no command {words[0]!r}"
    with sub.make_context(words[0], list(words[1:]), parent=parent) as ctx:  # raises on an unknown option
        assert set(ctx.params) >= {p.name for p in sub.params if p.required}


def test_a_renamed_option_would_be_caught():
    group = typer.main.get_command(app)
    parent = group.context_class(group, info_name="geoscout")
    with pytest.raises(Exception, match="No such option"):
        group.get_command(parent, "run").make_context("run", ["data", "--work", "w", "--backbone-list", "a"], parent=parent)
