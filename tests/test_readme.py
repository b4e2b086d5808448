"""The README's first Python example runs as written, and its claim (compiled == eager reference) holds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_readme_example_runs(tmp_path, monkeypatch, capsys) -> None:
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(block, str(README), "exec"), ns)
    assert torch.equal(ns["out"], ns["ref"])
    assert (tmp_path / "plan-4bit" / "plan.json").is_file()
    assert "compiled == eager reference: True" in capsys.readouterr().out
    assert ns["cm"].cache.nbytes() <= ns["plan"].total_budget_bytes
