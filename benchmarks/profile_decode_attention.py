"""Where a decode step's time goes: per-kernel device time of ``pmkvq::decode_attention`` (torch profiler),
or one bare call for Nsight Compute (``--once``).

Same geometry and cache as :mod:`bench_decode_attention` (Hq=28, Hkv=4, D=128, 32768 tokens). GPU only.

    python benchmarks/profile_decode_attention.py                 # B8 4-bit, B1 4-bit, B8 2-bit
    ncu --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \\
        -k regex:_attn_kernel --launch-skip 1 --launch-count 1 \\
        python benchmarks/profile_decode_attention.py --once --batch 8 --bits 4

Per source line and instruction (PC sampling, bank conflicts, sectors): ``--section SourceCounters`` and
``benchmarks/ncu_source_summary.py``, whose docstring has the commands.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode_attention import HKV, HQ, NW, D, graph_ms, make_cache

from pmkvq_compile import ops

LENGTH = 32768


def step_args(batch: int, bits: int) -> tuple:
    """The op's arguments for a body of ``bits``-bit chunks holding ``LENGTH`` tokens."""
    lay, arena, state, table = make_cache(batch, LENGTH, [(bits, bits)] * ((LENGTH - 1) // NW))
    q = torch.randn(batch, HQ, D, dtype=torch.float16, device="cuda")
    kn = torch.randn(batch, HKV, 1, D, dtype=torch.float16, device="cuda")
    lengths = torch.full((batch,), LENGTH, dtype=torch.int32, device="cuda")
    return (q, kn, kn, arena, state, table, lengths, None, lay.to_list(), D**-0.5, 0)


def kernel_times(args: tuple, reps: int = 20) -> dict[str, float]:
    """Mean device time per call of each kernel the op launches, in us."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            ops.decode_attention(*args)
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            times[e.name] = times.get(e.name, 0.0) + e.device_time / reps
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--once", action="store_true", help="two bare calls (compile, then the one to profile)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bits", type=int, default=4)
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.once:
        args = step_args(a.batch, a.bits)
        for _ in range(2):
            ops.decode_attention(*args)
        torch.cuda.synchronize()
        return
    for batch, bits in ((8, 4), (1, 4), (8, 2)):
        args = step_args(batch, bits)
        ops.decode_attention(*args)  # compile
        torch.cuda.synchronize()
        per = ", ".join(f"{k} {v:.1f} us" for k, v in kernel_times(args).items())
        total = graph_ms(lambda args=args: ops.decode_attention(*args)) * 1e3
        print(f"B{batch} {bits}-bit: graph {total:.1f} us; per kernel: {per}")
        del args


if __name__ == "__main__":
    main()
