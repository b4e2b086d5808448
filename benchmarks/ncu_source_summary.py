"""Where a kernel's warps wait, by source line: a summary of Nsight Compute's source page (PC sampling).

On the GPU machine (``profile_decode_attention.py --once`` makes two bare calls; the second is profiled)::

    ncu --section SourceCounters --section MemoryWorkloadAnalysis_Tables -k regex:_attn_kernel \\
        --launch-skip 1 --launch-count 1 -o rep python benchmarks/profile_decode_attention.py --once --bits 2
    ncu --import rep.ncu-rep --page source --csv --print-source cuda,sass > src.csv

then anywhere: ``python benchmarks/ncu_source_summary.py src.csv``. It prints the warp-stall samples by
reason; the samples by how many times an instruction ran (a loop's instructions run once per iteration and
warp, a program's set-up once per warp, so these classes part the tile loop from the set-up and from other
programs), with each class's reasons and its source lines with the most samples; and the shared-memory
wavefronts and L2 sectors above the ideal, with the instructions that cause them. Triton attributes an inlined helper's
instructions to the helper's line (``standard.py`` is ``tl.sum``/``tl.max``).
"""

from __future__ import annotations

import argparse
import collections
import csv
from dataclasses import dataclass, field

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
WAVES, WAVES_IDEAL = "L1 Wavefronts Shared", "L1 Wavefronts Shared Ideal"
SECTORS, SECTORS_IDEAL = "L2 Theoretical Sectors Global", "L2 Theoretical Sectors Global Ideal"


@dataclass
class Instr:
    """One SASS instruction of the source page: the source line it belongs to and its counters."""

    where: str  # "file:line"
    source: str
    sass: str
    executed: float
    samples: float
    stalls: dict[str, float] = field(default_factory=dict)
    waves: float = 0.0
    waves_ideal: float = 0.0
    sectors: float = 0.0
    sectors_ideal: float = 0.0


def _num(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def parse(path: str) -> list[Instr]:
    """The instructions of a ``--page source --csv --print-source cuda,sass`` export. A file's rows are its
    source lines (line number first, counters summed over the line's instructions) each followed by the line's
    SASS rows (empty line number, then address and instruction). Refuses a file without the source page's
    header (a ``--print-source sass`` export has no source lines: run with ``cuda,sass``)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    out: list[Instr] = []
    col: dict[str, int] | None = None
    fname, where, text = "?", "?", ""
    for r in rows:
        if not r:
            continue
        if r[0] in ("File Path", "File Name"):
            fname = r[1].rsplit("/", 1)[-1]
        elif r[0] == "Line No":
            # "Line No","Source","Address","Source",<counters>: the second "Source" is the SASS text
            col = {name: i for i, name in enumerate(r) if i >= 4}
        elif col is None or r[0] == "Function Name":
            continue
        elif r[0]:
            where, text = f"{fname}:{r[0]}", r[1].strip()
        elif len(r) > 4 and r[2] not in ("", "-", "..."):
            stalls = {
                k: _num(r[i]) for k, i in col.items() if k.startswith("stall_") and "Not Issued" not in k
            }
            names = (EXECUTED, SAMPLES, WAVES, WAVES_IDEAL, SECTORS, SECTORS_IDEAL)
            ex, sa, wv, wi, se, si = (_num(r[col[k]]) if k in col else 0.0 for k in names)
            out.append(Instr(where, text, r[3].strip(), ex, sa, stalls, wv, wi, se, si))
    if col is None:
        raise ValueError(
            f"{path}: no 'Line No' header; export with --page source --csv --print-source cuda,sass"
        )
    return out


def _reasons(instrs: list[Instr], top: int) -> str:
    c: collections.Counter[str] = collections.Counter()
    for x in instrs:
        c.update(x.stalls)
    return ", ".join(f"{k.removeprefix('stall_')} {v:.0f}" for k, v in c.most_common(top) if v)


def summarize(instrs: list[Instr], classes: int = 4, lines: int = 12) -> str:
    """The report ``main`` prints (see the module docstring)."""
    total = sum(x.samples for x in instrs)
    out = [f"{len(instrs)} instructions, {total:.0f} samples; by reason: {_reasons(instrs, 12)}"]
    by: dict[float, list[Instr]] = collections.defaultdict(list)
    for x in instrs:
        by[x.executed].append(x)
    ranked = sorted(by.items(), key=lambda kv: -sum(x.samples for x in kv[1]))
    for ex, xs in ranked[:classes]:
        s = sum(x.samples for x in xs)
        out.append(
            f"== executed {ex:.0f} times: {len(xs)} instructions, {s:.0f} samples "
            f"({100 * s / max(total, 1):.1f}%); {_reasons(xs, 6)}"
        )
        per: dict[tuple[str, str], list[Instr]] = collections.defaultdict(list)
        for x in xs:
            per[(x.where, x.source)].append(x)
        for (where, src), ys in sorted(per.items(), key=lambda kv: -sum(y.samples for y in kv[1]))[:lines]:
            ns = sum(y.samples for y in ys)
            out.append(f"  {ns:6.0f} {len(ys):4d} instr  {where:28s} {src[:64]}  [{_reasons(ys, 2)}]")
    for name, val, ideal in (
        ("shared wavefronts", "waves", "waves_ideal"),
        ("L2 sectors", "sectors", "sectors_ideal"),
    ):
        got = sum(getattr(x, val) for x in instrs)
        want = sum(getattr(x, ideal) for x in instrs)
        out.append(f"== {name}: {got:.0f}, ideal {want:.0f} ({got - want:.0f} above)")
        worst = sorted(instrs, key=lambda x: getattr(x, ideal) - getattr(x, val))[:lines]
        for x in worst:
            if getattr(x, val) > getattr(x, ideal):
                out.append(
                    f"  {getattr(x, val) / max(getattr(x, ideal), 1):4.1f}x {getattr(x, val):9.0f}  "
                    f"{x.sass[:48]:48s} {x.where}"
                )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", help="ncu --page source --csv --print-source cuda,sass output")
    ap.add_argument("--classes", type=int, default=4, help="execution-count classes to list")
    ap.add_argument("--lines", type=int, default=12, help="source lines (and instructions) per list")
    a = ap.parse_args()
    print(summarize(parse(a.csv), a.classes, a.lines))


if __name__ == "__main__":
    main()
