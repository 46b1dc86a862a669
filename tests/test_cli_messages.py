"""What the CLI prints when something goes wrong: warnings as sentences, input errors as one line, bugs
with their traceback."""

import warnings

import pytest
import typer

from geoscout.cli import _expected_failures
from geoscout.errors import ConfigError, warn


def test_warnings_reach_the_terminal_as_plain_sentences(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with _expected_failures():
            warn("3 views are blank")
            warnings.warn("a library's own warning", DeprecationWarning)
    assert capsys.readouterr().err.splitlines() == [
        "warning: 3 views are blank", "warning (DeprecationWarning): a library's own warning"]


def test_input_errors_are_one_line_and_exit_1_and_bugs_keep_their_traceback(capsys):
    with pytest.raises(typer.Exit) as stopped, _expected_failures():
        raise ConfigError("data/train_ground_truth.csv line 3, column latitude: 'north' is not a number")
    assert stopped.value.exit_code == 1
    assert capsys.readouterr().err == "error: data/train_ground_truth.csv line 3, column latitude: 'north' is not a number\n"
    with pytest.raises(ValueError, match="a bug"), _expected_failures():
        raise ValueError("a bug")
