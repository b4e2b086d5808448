"""Per-program timeline of the decode attention launch: when each program starts and ends, and on which SM.

Builds an instrumented copy of the tree's ``pmkvq_compile/kernels/decode_attention.py`` (source patched at
fixed anchors; it fails by name if an anchor moved): each program of ``_attn_kernel`` reads ``%globaltimer``
at its start and after its last store, and ``%smid``, into a trace buffer. Then, for each case (the
geometry of :mod:`bench_decode_attention`, 32768 tokens), it prints the CUDA-graph time of the tree's
launcher, of the instrumented copy, and of the copy without the merge launch, and from one traced launch:
the span, body program durations per split index, their end times (min / p10 / p50 / p90 / max), the edge
programs' start, duration and end (and per edge split index: mean duration, last end), the mean body
duration per batch row, and the ideal span if every program's time were spread evenly over three slots per
SM (the default launch's occupancy). GPU only (inline PTX)::

    python benchmarks/trace_decode_attention.py --cases "B8 4-bit;B8 2-bit;B1 4-bit" --json /tmp/trace.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

KERNEL = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "pmkvq_compile",
    "kernels",
    "decode_attention.py",
)
_TIMER = 'tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [b], dtype=tl.int64, is_pure=False, pack=1)'
_SMID = 'tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [b], dtype=tl.int32, is_pure=False, pack=1)'


def _patch(src: str, old: str, new: str) -> str:
    if src.count(old) != 1:
        raise RuntimeError(
            f"decode_attention.py changed: the anchor {old!r} occurs {src.count(old)} times, not once"
        )
    return src.replace(old, new)


def instrumented_source(src: str) -> str:
    """``decode_attention.py``'s source with the per-program timeline: ``_attn_kernel`` takes a ``trace``
    pointer (int64 ``[programs, 3]``: start ns, end ns, SM id; program ``(b * Hkv + h) * (splits + edge) +
    z``), the launcher passes the module's ``TRACE`` and records ``TRACE_SHAPE = (B, Hkv, splits, edge)``,
    and ``SKIP_MERGE = True`` returns before the merge launch."""
    start = src.index("def _attn_kernel(")
    at = src.index("    qk_scale,\n", start) + len("    qk_scale,\n")
    src = src[:at] + "    trace,\n" + src[at:]
    src = _patch(
        src,
        "    z = tl.program_id(2)\n",
        f"    z = tl.program_id(2)\n    t0 = {_TIMER}\n    smid = {_SMID}\n"
        "    lin = (b * HKV + h) * tl.num_programs(2) + tl.program_id(2)\n",
    )
    src = _patch(
        src,
        "\n\n@triton.jit\ndef _merge_kernel(",
        f"\n    tl.debug_barrier()\n    t1 = {_TIMER}\n    tl.store(trace + lin * 3, t0)\n"
        "    tl.store(trace + lin * 3 + 1, t1)\n    tl.store(trace + lin * 3 + 2, smid.to(tl.int64))\n"
        "\n\n@triton.jit\ndef _merge_kernel(",
    )
    src = _patch(
        src, "arena.shape[1], qk_scale)  # fmt: skip", "arena.shape[1], qk_scale, TRACE)  # fmt: skip"
    )
    src = _patch(
        src,
        "    block_m = max(8, triton.next_power_of_2(gq))\n",
        "    global TRACE_SHAPE\n    TRACE_SHAPE = (b, hkv, num_splits, edge_splits)\n"
        "    block_m = max(8, triton.next_power_of_2(gq))\n",
    )
    src = _patch(
        src,
        "    block_d, merge_warps = _merge_cfg(d)\n",
        "    if SKIP_MERGE:\n        return out\n    block_d, merge_warps = _merge_cfg(d)\n",
    )
    return _patch(src, "\nLOG2E = ", "\nTRACE = None\nTRACE_SHAPE = None\nSKIP_MERGE = False\nLOG2E = ")


def load_instrumented():
    """The instrumented copy, imported as a sibling of the tree's kernel module (its relative imports
    resolve)."""
    with open(KERNEL) as f:
        src = instrumented_source(f.read())
    path = os.path.join(tempfile.mkdtemp(prefix="pmkvq_trace_"), "decode_attention_traced.py")
    with open(path, "w") as f:
        f.write(src)
    from bench_decode_attention import load_kernel_copy

    return load_kernel_copy(path, "_traced")


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def main() -> None:
    import torch
    from bench_decode_attention import body_chunk_count, graph_ms, step_args

    from pmkvq_compile.kernels import decode_attention as cur

    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--cases", default="B8 4-bit;B8 2-bit;B1 4-bit", help='"B<batch> <bits>-bit", ";"-separated'
    )
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    mod = load_instrumented()
    n = a.length
    nc = body_chunk_count(n)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(), "SMs", sms, flush=True)
    torch.manual_seed(0)
    mod.TRACE = torch.zeros(1 << 20, dtype=torch.int64, device="cuda")
    results = {}
    for case in a.cases.split(";"):
        batch, bits = int(case.split()[0][1:]), int(case.split()[1].split("-")[0])
        _, args = step_args(batch, n, [(bits, bits)] * nc)
        err = (mod.decode_attention(*args).float() - cur.decode_attention(*args).float()).abs().max().item()
        if not err < 2e-2:
            raise AssertionError(f"{case}: the instrumented copy differs from the tree's kernel by {err}")
        r = {"graph_us": graph_ms(lambda args=args: cur.decode_attention(*args)) * 1e3}
        r["graph_us_traced"] = graph_ms(lambda args=args: mod.decode_attention(*args)) * 1e3
        mod.SKIP_MERGE = True
        r["graph_us_attention_only"] = graph_ms(lambda args=args: mod.decode_attention(*args)) * 1e3
        mod.SKIP_MERGE = False
        mod.TRACE.zero_()
        torch.cuda.synchronize()
        mod.decode_attention(*args)
        torch.cuda.synchronize()
        b, h, s, e = mod.TRACE_SHAPE
        tr = mod.TRACE[: b * h * (s + e) * 3].view(b, h, s + e, 3).cpu()
        t0 = (tr[..., 0] - tr[..., 0].min()).double() / 1e3
        t1 = (tr[..., 1] - tr[..., 0].min()).double() / 1e3
        dur = t1 - t0
        body_end = t1[:, :, :s].flatten().tolist()
        edge_dur = dur[:, :, s:].flatten().tolist()
        r.update(
            span=t1.max().item(),
            splits=s,
            edge_programs=e,
            body_us_per_split=[round(x, 2) for x in dur[:, :, :s].mean(dim=(0, 1)).tolist()],
            body_end=[round(_pct(body_end, p), 2) for p in (0, 0.1, 0.5, 0.9, 1)],
            edge_start=[round(_pct(t0[:, :, s:].flatten().tolist(), p), 2) for p in (0, 0.5, 1)],
            edge_us=[round(_pct(edge_dur, p), 2) for p in (0, 0.5, 1)] if e else [],
            edge_end=round(t1[:, :, s:].max().item(), 2) if e else None,
            edge_us_per_split=[round(x, 2) for x in dur[:, :, s:].mean(dim=(0, 1)).tolist()],
            edge_end_per_split=[round(x, 2) for x in t1[:, :, s:].amax(dim=(0, 1)).tolist()],
            body_us_per_row=[round(dur[i, :, :s].mean().item(), 2) for i in range(b)],
            ideal_span=dur.sum().item() / min(3 * sms, dur.numel()),
            sms_used=int(tr[..., 2].unique().numel()),
        )
        results[case] = r
        print(
            case,
            json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}),
            flush=True,
        )
        del args
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
