"""benchmarks/ncu_source_summary.py reads Nsight Compute's source page (the GPU machine writes it; the
summary runs anywhere): a hand-made export in that format, whose sums are worked out below by hand."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"

HEADER = [
    "Line No", "Source", "Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
    "L1 Wavefronts Shared", "L1 Wavefronts Shared Ideal", "L2 Theoretical Sectors Global",
    "L2 Theoretical Sectors Global Ideal", "stall_short_sb", "stall_no_inst", "stall_short_sb (Not Issued)",
]  # fmt: skip


def _tool():
    sys.path.insert(0, str(BENCH))
    try:
        import ncu_source_summary as tool
    finally:
        sys.path.remove(str(BENCH))
    return tool


def _write(path: Path) -> None:
    rows = [
        ["File Name", "/x/kernels/decode_attention.py"],
        ["Line No", "Source"],
        ["1", "docstring"],
        ["File Path", "/x/kernels/decode_attention.py"],
        ["Function Name", "_attn_kernel"],
        HEADER,
        # a loop line: two instructions run 100 times, one with a 4-way shared-memory conflict
        ["303", "for t in tl.range(...)", "-", "-", "9", "200", "0", "0", "0", "0", "0", "0", "0"],
        ["", "", "0x10", "LDSM.16.MT88.4 R1, [R2]", "6", "100", "400", "100", "0", "0", "5", "1", "99"],
        ["", "", "0x20", "HMMA.16816.F32 R4, R8, R12, R4", "3", "100", "0", "0", "0", "0", "1", "0", "0"],
        ["", "", "...", "...", "-", "-", "-", "-", "-", "-", "-", "-", "-"],
        # a set-up line: one instruction run 4 times, waiting for instructions, reading 3 sectors for 1
        ["270", "q = tl.load(qp)", "-", "-", "7", "4", "0", "0", "3", "1", "0", "7", "0"],
        ["", "", "0x30", "LDG.E.U16 R0, desc[UR4][R2.64]", "7", "4", "0", "0", "3", "1", "0", "7", "0"],
    ]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_summary_groups_samples_by_execution_count(tmp_path) -> None:
    tool = _tool()
    p = tmp_path / "src.csv"
    _write(p)
    ins = tool.parse(str(p))
    assert [(x.where, x.executed, x.samples) for x in ins] == [
        ("decode_attention.py:303", 100.0, 6.0),
        ("decode_attention.py:303", 100.0, 3.0),
        ("decode_attention.py:270", 4.0, 7.0),
    ]
    # the "(Not Issued)" twin of a reason is not counted again
    assert ins[0].stalls == {"stall_short_sb": 5.0, "stall_no_inst": 1.0}
    out = tool.summarize(ins, classes=2, lines=3)
    lines = out.splitlines()
    assert lines[0] == "3 instructions, 16 samples; by reason: no_inst 8, short_sb 6"
    assert lines[1] == "== executed 100 times: 2 instructions, 9 samples (56.2%); short_sb 6, no_inst 1"
    assert "== executed 4 times: 1 instructions, 7 samples (43.8%); no_inst 7" in lines
    assert "== shared wavefronts: 400, ideal 100 (300 above)" in lines
    assert any(s.startswith("   4.0x       400  LDSM.16.MT88.4") for s in lines)
    assert "== L2 sectors: 3, ideal 1 (2 above)" in lines


def test_summary_refuses_an_export_without_source_lines(tmp_path) -> None:
    p = tmp_path / "sass.csv"
    p.write_text('"Kernel Name","_attn_kernel",\n"Address","Source"\n')
    with pytest.raises(ValueError, match="print-source cuda,sass"):
        _tool().parse(str(p))
