"""The ``pmkvq`` command: help, the demo on the embedded model, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pmkvq_compile.cli import main


def test_help_lists_commands(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_bad_arguments_are_one_line_errors(capsys) -> None:
    assert main(["demo", "--max-new-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "pmkvq demo: error: --max-new-tokens=0 must be >= 1" in err and "Traceback" not in err


@pytest.mark.slow
def test_demo_runs_on_the_embedded_model() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pmkvq_compile.cli", "demo", "--max-new-tokens", "12"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    assert "--- unquantized" in out and "--- PM-KVQ, 4-bit budget" in out
    assert "identical greedy prefix:" in out and "tok/s" in out and "MiB used of" in out
