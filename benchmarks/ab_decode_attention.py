"""A/B of two revisions of the decode kernel in one run: an old copy of ``decode_attention.py`` against the
tree's.

Each case builds one cache (Qwen2-7B geometry as in :mod:`bench_decode_attention`, 32768 tokens) and times
the old module's launcher, then every tree configuration of ``--cfgs`` in ``--rounds`` rounds, then the old
one again. A configuration is ``"PMKVQ_DECODE_CFG@programs per SM[@edge programs per head[@pool percent[@merge
cfg]]]"`` (``@0``: the defaults; ``@s11``: 11 splits in every case; the last three set
``PMKVQ_DECODE_EDGE``, ``PMKVQ_DECODE_DYN`` (branch ``wip-chunk-pool``) and ``PMKVQ_MERGE_CFG``; e.g.
``"@0;128,4,2,168@3;@s11@1;@0@@@64,4"``). Each tree
output is checked against the old one's (max |diff| < 2e-2). ``--f16-scales`` adds the cases with float16
scales and zeros (``scale_bytes=2``), which an old revision cannot read: those check every configuration
against the tree's defaults and time the old kernel on the float32-scale cache of the same draw, unless
``--old-reads-f16`` says the old revision reads them too (then they are compared as the others). ``--ragged``
adds B8 cases whose rows 1..7 stop at an eighth of the length (row 0 at all of it); ``--q-float32`` gives
every case float32 queries and new tokens. Prints CUDA-graph medians
in us and the fp16 SDPA time of the same shapes. GPU only::

    git show <rev>:pmkvq_compile/kernels/decode_attention.py > /tmp/old_decode_attention.py
    python benchmarks/ab_decode_attention.py --old /tmp/old_decode_attention.py --cfgs "@0;128,4,2,168@3"
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode_attention import HKV, body_chunk_count, graph_ms, load_kernel_copy, sdpa_ms, step_args

from pmkvq_compile.kernels import decode_attention as new

KNOBS = ("PMKVQ_DECODE_CFG", "PMKVQ_DECODE_EDGE", "PMKVQ_DECODE_DYN", "PMKVQ_MERGE_CFG")


def _float32_inputs(args: tuple) -> tuple:
    """A step's arguments with its queries and new keys and values in float32."""
    return (args[0].float(), args[1].float(), args[2].float(), *args[3:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="an old copy of pmkvq_compile/kernels/decode_attention.py")
    ap.add_argument("--cfgs", default="@0")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--f16-scales", action="store_true", help="also the float16-scale cases")
    ap.add_argument("--old-reads-f16", action="store_true", help="the old revision has scale_bytes too")
    ap.add_argument(
        "--ragged", action="store_true", help="also B8 4-bit / 2-bit with rows 1..7 at length / 8"
    )
    ap.add_argument("--q-float32", action="store_true", help="float32 queries (and new tokens) in every case")
    a = ap.parse_args()
    old = load_kernel_copy(a.old, "_ab_old")
    n = a.length
    nc = body_chunk_count(n)
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(), "SMs", sms)
    for b in (8, 1):
        t, form = sdpa_ms(b, n + 1)
        print(f"SDPA B{b}: {t * 1e3:.1f} us ({form})", flush=True)
    cases = [
        ("B8 4-bit", 8, [(4, 4)] * nc),
        ("B8 2-bit", 8, [(2, 2)] * nc),
        ("B8 mixed", 8, [(4, 4)] * (nc // 2) + [(2, 2)] * (nc - nc // 2)),
        ("B1 4-bit", 1, [(4, 4)] * nc),
    ]
    # (name, batch, chunk bits, scale bytes, length of rows 1.. (row 0 is at n))
    cases = [(*c, 4, n) for c in cases] + (
        [(f"{c[0]} f16s", c[1], c[2], 2, n) for c in cases] if a.f16_scales else []
    )
    if a.ragged:
        cases += [(f"B8 ragged {c[0][3:]}", 8, c[2], 4, n // 8) for c in cases[:2]]
    cfgs = a.cfgs.split(";")
    for name, b, chunks, scale_bytes, rest in cases:
        lay, args = step_args(b, n, chunks, scale_bytes)
        args[6][1:] = rest
        if a.q_float32:
            args = _float32_inputs(args)
        for knob in KNOBS:
            os.environ[knob] = ""
        if scale_bytes == 4 or a.old_reads_f16:
            ref = old.decode_attention(*args).float()
            old_args = args
        else:
            ref = new.decode_attention(*args).float()
            _, old_args = step_args(b, n, chunks)
            old_args[6][1:] = rest
            if a.q_float32:
                old_args = _float32_inputs(old_args)
        t_old = graph_ms(lambda args=old_args: old.decode_attention(*args)) * 1e3
        times: dict[str, list[float]] = {c: [] for c in cfgs}
        for _ in range(a.rounds):
            for c in cfgs:
                cfg, per, *more = [*c.split("@"), "", "", ""]
                os.environ["PMKVQ_DECODE_CFG"] = cfg
                os.environ["PMKVQ_DECODE_EDGE"] = more[0]
                os.environ["PMKVQ_DECODE_DYN"] = more[1]
                os.environ["PMKVQ_MERGE_CFG"] = more[2]
                sp = 0
                if per.startswith("s"):  # a literal split count
                    sp = int(per[1:])
                elif int(per):
                    sp = max(1, min(int(per) * sms // (b * HKV), (lay.max_chunks + 2) // 4, 128))
                ca = (*args[:-1], sp)
                err = (new.decode_attention(*ca).float() - ref).abs().max().item()
                if not err < 2e-2:
                    raise AssertionError(f"{name} [{c}]: max |diff| {err} against the old kernel")
                times[c].append(graph_ms(lambda ca=ca: new.decode_attention(*ca)) * 1e3)
        for knob in KNOBS:
            os.environ[knob] = ""
        t_old2 = graph_ms(lambda args=old_args: old.decode_attention(*args)) * 1e3
        res = "; ".join(f"[{c}] " + "/".join(f"{x:.1f}" for x in v) for c, v in times.items())
        print(f"{name}: old {t_old:.1f}/{t_old2:.1f} us; tree {res}", flush=True)
        del args, old_args


if __name__ == "__main__":
    main()
