"""The timeline tool's instrumented copy of the decode kernel (benchmarks/trace_decode_attention.py) still
finds every anchor in the tree's kernel source and gives valid Python: the tool runs only on a GPU, so this
is where a kernel edit that breaks it shows up first."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_instrumented_source_patches_every_anchor() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import trace_decode_attention as tool
    finally:
        sys.path.remove(str(BENCH))
    src = Path(tool.KERNEL).read_text()
    out = tool.instrumented_source(src)
    tree = ast.parse(out)
    fns = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    args = [x.arg for x in fns["_attn_kernel"].args.args]
    assert args[args.index("qk_scale") + 1] == "trace"
    assert out.count("%globaltimer") == 2 and out.count("%smid") == 1
    assert "TRACE_SHAPE = (b, hkv, num_splits, edge_splits)" in out and "if SKIP_MERGE:" in out
    # an anchor that is gone is named, not silently skipped
    with pytest.raises(RuntimeError, match="anchor"):
        tool.instrumented_source(src.replace("arena.shape[1], qk_scale)  # fmt: skip", "arena.shape[1])"))
