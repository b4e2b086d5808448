"""Decode attention over the packed arena vs ``F.scaled_dot_product_attention`` on fp16 K/V (same run).

Qwen2-7B geometry (Hq=28, Hkv=4, D=128, group 128), sink 1 @ 16 bits, window 128 @ 16 bits; cases marked
``f16 scales`` store the body's scales and zeros as float16 (a plan's ``scale_dtype="float16"``), the others
as float32 (the default). Prints, per
case, the time of ``pmkvq::decode_attention`` (Triton), the best fp16 SDPA time on the same shape (SDPA
with ``enable_gqa=True``, and the GQA group folded into the query axis, whichever is faster), the ratio,
and the achieved bandwidth as a fraction of a plain device-to-device copy measured in the same run.
Also the cost of ``pmkvq::append`` of one token (amortized over a full window, flush included) and of a
full-body ERS pass (``pmkvq::requantize_body``, 4 -> 2 bits; ``--costs-only``: only these two). GPU only;
run: ``python benchmarks/bench_decode_attention.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from pmkvq_compile import ops
from pmkvq_compile.kernels import decode_attention as dk
from pmkvq_compile.kernels.layout import ArenaLayout

HQ, HKV, D, GS, NW = 28, 4, 128, 128, 128


def make_cache(
    batch: int, length: int, chunk_bits: list[tuple[int, int]], spare_chunks: int = 0, scale_bytes: int = 4
):
    """A filled arena (random codes, scales in [0.01, 0.05]) holding ``length`` tokens: 1 sink token, the
    given body chunks, and the rest in the window; ``scale_bytes`` 2 stores <= 8-bit chunks' scales and
    zeros as float16. Returns layout, arena, state, table."""
    nc = len(chunk_bits)
    wl = length - 1 - nc * NW
    assert 0 <= wl < NW, (length, nc)
    proto = ArenaLayout(HKV, D, GS, 1, NW, 16, 16, 16, 4, 4, 1 << 30, scale_bytes)
    body = sum(proto.chunk_bytes(kb, vb) for kb, vb in chunk_bits) + spare_chunks * proto.chunk_bytes(16, 16)
    budget = proto.body_offset + body
    budget += (-budget) % 16
    lay = ArenaLayout(HKV, D, GS, 1, NW, 16, 16, 16, 2, 2, budget, scale_bytes)
    dev = "cuda"
    arena = torch.randint(0, 256, (batch, budget), dtype=torch.uint8, device=dev)
    state = lay.initial_state(dev)
    table = lay.empty_table(dev)
    rows, off = [], lay.body_offset
    for kb, vb in chunk_bits:
        rows.append((off, kb, vb))
        off += lay.chunk_bytes(kb, vb)
    if rows:
        table[:nc] = torch.tensor(rows, dtype=torch.int32, device=dev)
    state[0], state[1], state[2] = length, wl, nc
    if chunk_bits:
        state[3], state[4] = chunk_bits[-1]
    # meta: every region's [4, Hkv, cap, G] (float32, or float16: lay.meta_dtype) gets sane scales and zeros;
    # 16-bit codes get smaller scales (scale * code stays reasonable)
    regions = [(0, 1, 16, 16), (lay.window_offset, NW, 16, 16)] + [(o, NW, kb, vb) for o, kb, vb in rows]
    for o, cap, kb, vb in regions:
        _, _, m0, end = lay.region_parts(o, cap, kb, vb)
        meta = arena[:, m0:end].view(lay.meta_dtype(kb, vb)).view(batch, 4, -1)
        meta[:, 0::2] = (torch.rand_like(meta[:, 0::2]) * 0.04 + 0.01) * (1e-3 if kb == 16 else 1.0)
        meta[:, 1::2] = torch.rand_like(meta[:, 1::2]) * 2
    return lay, arena, state, table


def body_chunk_count(length: int) -> int:
    """Body chunks of a :func:`make_cache` cache of ``length`` tokens (one sink token, 0..NW-1 in the window:
    the cache flushes a full window into a chunk, so it never holds NW tokens after an update)."""
    return (length - 1) // NW


def step_args(batch: int, length: int, chunk_bits: list[tuple[int, int]], scale_bytes: int = 4):
    """A :func:`make_cache` cache and one decode step's arguments for ``decode_attention``: fp16 queries, one
    new token used as both key and value, every row at ``length``, default splits (the last argument).
    Returns ``(layout, args)``; ``args[3]`` is the arena."""
    lay, arena, state, table = make_cache(batch, length, chunk_bits, scale_bytes=scale_bytes)
    q = torch.randn(batch, HQ, D, dtype=torch.float16, device="cuda")
    kn = torch.randn(batch, HKV, 1, D, dtype=torch.float16, device="cuda")
    lengths = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    return lay, (q, kn, kn, arena, state, table, lengths, None, lay.to_list(), D**-0.5, 0)


def load_kernel_copy(path: str, name: str):
    """A copy of ``decode_attention.py`` at ``path``, imported as ``pmkvq_compile.kernels.<name>``: a sibling
    of the tree's kernel module, so its relative imports resolve."""
    spec = importlib.util.spec_from_file_location(f"pmkvq_compile.kernels.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def bench_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def graph_ms(fn, reps: int = 50) -> float:
    """Median time of one call replayed from a CUDA graph of ``reps`` calls (no host overhead)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return bench_ms(g.replay) / reps


def copy_bandwidth() -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a))
    return 2 * n / (ms * 1e-3)


def sdpa_ms(batch: int, length: int) -> tuple[float, str]:
    q = torch.randn(batch, HQ, 1, D, dtype=torch.float16, device="cuda")
    k = torch.randn(batch, HKV, length, D, dtype=torch.float16, device="cuda")
    v = torch.randn_like(k)
    gqa = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    qf = q.view(batch, HKV, HQ // HKV, D)  # the group's heads as queries of one KV head (no mask)
    folded = bench_ms(lambda: F.scaled_dot_product_attention(qf, k, v))
    return (gqa, "enable_gqa") if gqa <= folded else (folded, "group-folded")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--json", default=None)
    ap.add_argument("--costs-only", action="store_true", help="only the append and ERS costs (no attention)")
    args = ap.parse_args()
    torch.manual_seed(0)
    length = args.length
    nc = body_chunk_count(length)
    copy_bw = copy_bandwidth()
    shapes = [
        ("B8 4-bit", 8, [(4, 4)] * nc),
        ("B8 2-bit", 8, [(2, 2)] * nc),
        ("B8 mixed 4/2", 8, [(4, 4)] * (nc // 2) + [(2, 2)] * (nc - nc // 2)),
        ("B8 8-bit", 8, [(8, 8)] * nc),
        ("B1 4-bit", 1, [(4, 4)] * nc),
        ("B1 2-bit", 1, [(2, 2)] * nc),
    ]
    # each shape with float32 scales, then each with float16 scales ("f16s")
    cases = [
        (name + suffix, b, chunks, sb) for sb, suffix in ((4, ""), (2, " f16s")) for name, b, chunks in shapes
    ]
    if args.costs_only:
        cases = []
    if os.environ.get("SWEEP"):
        lay, arena, state, table = make_cache(8, length, [(4, 4)] * nc)
        q = torch.randn(8, HQ, D, dtype=torch.float16, device="cuda")
        kn = torch.randn(8, HKV, 1, D, dtype=torch.float16, device="cuda")
        lengths = torch.full((8,), length, dtype=torch.int32, device="cuda")
        op_args = (q, kn, kn, arena, state, table, lengths, None, lay.to_list(), D**-0.5, 0)
        # "BLOCK_N,num_warps,num_stages[,splits[,maxnreg[,edge_first[,edge programs]]]]" (splits 0: the
        # default)
        for cfg in os.environ["SWEEP"].split(";"):
            knobs = cfg.split(",")
            os.environ["PMKVQ_DECODE_CFG"] = ",".join(knobs[:3] + knobs[4:6])
            os.environ["PMKVQ_DECODE_EDGE"] = knobs[6] if len(knobs) > 6 else ""
            a = (*op_args[:-1], int(knobs[3]) if len(knobs) > 3 else 0)
            print(f"sweep B8 4-bit cfg {cfg}: {graph_ms(lambda a=a: ops.decode_attention(*a)) * 1e3:.1f} us")
        os.environ["PMKVQ_DECODE_CFG"] = os.environ.get("BEST", "")
        os.environ["PMKVQ_DECODE_EDGE"] = ""
        del arena
    if os.environ.get("SWEEP_B1"):  # split counts at batch 1 (the default picks from static shapes)
        lay, arena, state, table = make_cache(1, length, [(4, 4)] * nc)
        q = torch.randn(1, HQ, D, dtype=torch.float16, device="cuda")
        kn = torch.randn(1, HKV, 1, D, dtype=torch.float16, device="cuda")
        lengths = torch.full((1,), length, dtype=torch.int32, device="cuda")
        for splits in (int(x) for x in os.environ["SWEEP_B1"].split(",")):
            op_args = (q, kn, kn, arena, state, table, lengths, None, lay.to_list(), D**-0.5, splits)
            us = graph_ms(lambda a=op_args: ops.decode_attention(*a)) * 1e3
            print(f"sweep B1 4-bit splits {splits}: {us:.1f} us")
        del arena
    results = {"copy_GBps": copy_bw / 1e9, "length": length, "cases": []}
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {copy_bw / 1e9:.0f} GB/s, {length} tokens")
    print(
        f"{'case':<18} {'eager us':>9} {'graph us':>9} {'sdpa us':>8} {'speedup':>8} {'GB/s':>7} {'of copy':>8}  sdpa form"
    )
    sdpa_cache: dict[int, tuple[float, str]] = {}
    for name, batch, chunks, scale_bytes in cases:
        lay, arena, state, table = make_cache(batch, length, chunks, scale_bytes=scale_bytes)
        q = torch.randn(batch, HQ, D, dtype=torch.float16, device="cuda")
        kn = torch.randn(batch, HKV, 1, D, dtype=torch.float16, device="cuda")
        vn = torch.randn_like(kn)
        lengths = torch.full((batch,), length, dtype=torch.int32, device="cuda")
        L = lay.to_list()
        op_args = (q, kn, vn, arena, state, table, lengths, None, L, D**-0.5, 0)
        ms = bench_ms(lambda op_args=op_args: ops.decode_attention(*op_args))
        gms = graph_ms(lambda op_args=op_args: ops.decode_attention(*op_args))
        if batch not in sdpa_cache:
            sdpa_cache[batch] = sdpa_ms(batch, length + 1)
        base, form = sdpa_cache[batch]
        nbytes = batch * (lay.body_offset + sum(lay.chunk_bytes(kb, vb) for kb, vb in chunks))
        bw = nbytes / (gms * 1e-3)
        print(f"{name:<18} {ms * 1e3:>9.1f} {gms * 1e3:>9.1f} {base * 1e3:>8.1f} {base / gms:>7.2f}x "
              f"{bw / 1e9:>7.0f} {bw / copy_bw:>7.0%}  {form}")  # fmt: skip
        results["cases"].append(
            {"case": name, "pmkvq_us": ms * 1e3, "pmkvq_graph_us": gms * 1e3, "sdpa_us": base * 1e3,
             "speedup": base / gms, "speedup_eager": base / ms, "GBps": bw / 1e9, "of_copy": bw / copy_bw,
             "sdpa_form": form, "scale_bytes": scale_bytes}
        )  # fmt: skip
        del arena
    for kern in (dk._attn_kernel, dk._merge_kernel):
        for cache in getattr(kern, "device_caches", {}).values():
            for ck in cache[0].values():
                consts = getattr(getattr(ck, "src", None), "constants", {}) or {}
                tag = {
                    str(k): v for k, v in consts.items() if str(k).strip("(),' ") in ("KB", "VB", "BLOCK_N")
                }
                print(f"{kern.fn.__name__} {tag} warps {ck.metadata.num_warps} stages {ck.metadata.num_stages}: "
                      f"{ck.n_regs} registers, {ck.n_spills} spills, {ck.metadata.shared} B smem")  # fmt: skip
    # append: one token per step, amortized over 2 windows (flushes included), body at 4 bits
    batch = 8
    lay, arena, state, table = make_cache(batch, length, [(4, 4)] * nc, spare_chunks=4)
    L = lay.to_list()
    kn = torch.randn(batch, HKV, 1, D, dtype=torch.float16, device="cuda")
    steps = 2 * NW
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        ops.append(arena, state, table, kn, kn, None, L)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        ops.append(arena, state, table, kn, kn, None, L)
    end.record()
    torch.cuda.synchronize()
    app_us = start.elapsed_time(end) * 1e3 / steps
    assert int(state[5]) == 0, "append overflowed in the benchmark"
    # the same, captured in a CUDA graph (what a compiled decode step does)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.append(arena, state, table, kn, kn, None, L)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        ops.append(arena, state, table, kn, kn, None, L)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    graph_us = start.elapsed_time(end) * 1e3 / steps
    # full-body ERS pass, 4 -> 2 bits, B=8
    lay, arena0, state0, table0 = make_cache(batch, length, [(4, 4)] * nc)
    L = lay.to_list()

    def ers_time(cache=None) -> float:
        """Median of 5 (after one warm-up) full-body ERS passes of copies of ``cache`` = (arena, state,
        table, layout list), default the 4-bit cache above."""
        a0, s0, t0, lay_list = cache or (arena0, state0, table0, L)
        times = []
        for _ in range(6):
            arena, state, table = a0.clone(), s0.clone(), t0.clone()
            torch.cuda.synchronize()
            start.record()
            ops.requantize_body(arena, state, table, 2, 2, lay_list)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times[1:])

    # SWEEP_ERS="R,num_warps[,programs[,item_rows]];...": the shrink kernel's knob (PMKVQ_SHRINK_CFG), timed
    # beside the default
    for cfg in [c for c in os.environ.get("SWEEP_ERS", "").split(";") if c]:
        os.environ["PMKVQ_SHRINK_CFG"] = cfg
        print(f"sweep full-body ERS cfg {cfg}: {ers_time():.0f} us")
    os.environ["PMKVQ_SHRINK_CFG"] = ""
    ers_us = ers_time()
    # the shared shrink against one program per row (the waves run in order there): bit for bit
    got = [t.clone() for t in (arena0, state0, table0)]
    ops.requantize_body(*got, 2, 2, L)
    os.environ["PMKVQ_SHRINK_CFG"] = "32,4,1"
    want = [t.clone() for t in (arena0, state0, table0)]
    ops.requantize_body(*want, 2, 2, L)
    os.environ["PMKVQ_SHRINK_CFG"] = ""
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), (
        "shared ERS differs from one program"
    )
    del got, want
    body_bytes = batch * nc * lay.chunk_bytes(4, 4)
    lay16, a16, s16, t16 = make_cache(batch, length, [(4, 4)] * nc, scale_bytes=2)
    ers16_us = ers_time((a16, s16, t16, lay16.to_list()))
    del a16
    print(f"append 1 token, B{batch} (amortized over {steps} steps incl. flushes): {app_us:.1f} us eager, "
          f"{graph_us:.1f} us as CUDA graph replay")  # fmt: skip
    print(f"full-body ERS 4->2 bits, B{batch} x {length}: {ers_us:.0f} us ({body_bytes / 1e6:.0f} MB body, "
          f"{body_bytes / (ers_us * 1e-6) / 1e9:.0f} GB/s read)")  # fmt: skip
    print(f"full-body ERS 4->2 bits, f16 scales: {ers16_us:.0f} us")
    results.update(append_us=app_us, append_graph_us=graph_us, ers_us=ers_us, ers_f16s_us=ers16_us)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
