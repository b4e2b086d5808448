"""Prefill / chunked-prefill attention: many new queries over the packed past plus themselves (causal).

One program per (batch row, query head, block of ``BLOCK_M`` queries). It walks every segment of the past
(sink, body chunks with their own bit-widths, window; keys already divided by the key scale, so queries are
multiplied by it) and then the step's own new K/V in full precision, causally: query ``i`` sees new tokens
``0..i``. K/V of the past are read once per query head (not shared across a GQA group): prefill is bound by
arithmetic, not by the cache's bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import attend_segment, segment_of
from .decode_attention import _DT, LOG2E, _load_q4, check_attention_args
from .layout import ArenaLayout, check_layout_tensors

__all__ = ["prefill_attention"]


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_new,
    v_new,
    a8,
    a16,
    a32,
    af,
    ah,
    table,
    state,
    lengths,
    ks_ptr,
    out,
    ROW_BYTES,
    T,
    qk_scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    GS: tl.constexpr,
    G: tl.constexpr,
    N_SINK: tl.constexpr,
    NW: tl.constexpr,
    SB: tl.constexpr,
    WB: tl.constexpr,
    WIN_OFF: tl.constexpr,
    HAS_KS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
    HM: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HQ
    hq = bh % HQ
    h = hq // (HQ // HKV)
    qi = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    qm = qi < T
    rows = bh * T + qi
    q0, q1, q2, q3 = _load_q4(q_ptr, rows, qm, ks_ptr, h, qk_scale, D, HAS_KS)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, D // 4], tl.float32)
    acc1 = tl.zeros([BLOCK_M, D // 4], tl.float32)
    acc2 = tl.zeros([BLOCK_M, D // 4], tl.float32)
    acc3 = tl.zeros([BLOCK_M, D // 4], tl.float32)
    n_chunks = tl.load(state + 2)
    length = tl.load(lengths + b)
    row0 = b.to(tl.int64) * ROW_BYTES
    for s in range(0, n_chunks + 2):
        off, cap, kb, vb, n_valid = segment_of(s, n_chunks, length, table, N_SINK, NW, SB, WB, WIN_OFF)
        m_i, l_i, acc0, acc1, acc2, acc3 = attend_segment(
            q0.to(DT), q1.to(DT), q2.to(DT), q3.to(DT), m_i, l_i, acc0, acc1, acc2, acc3,
            a8 + row0, a16 + row0 // 2, a32 + row0 // 4, af + row0 // 4, ah + row0 // 2, off, cap, kb, vb, 0,
            n_valid, h, HKV, D, GS, G, BLOCK_N, DT, PREC, HM,
        )  # fmt: skip
    # the new tokens, causal, full precision (no key scale on either side)
    p0, p1, p2, p3 = _load_q4(q_ptr, rows, qm, ks_ptr, h, qk_scale, D, False)
    p0 = p0.to(DT)
    p1 = p1.to(DT)
    p2 = p2.to(DT)
    p3 = p3.to(DT)
    i = tl.arange(0, D // 4)
    kv_row = (b * HKV + h).to(tl.int64) * T
    hi = tl.minimum((tl.program_id(1) + 1) * BLOCK_M, T)
    for n0 in range(0, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nm = n < T
        kp = k_new + (kv_row + n)[:, None] * D + 4 * i[None, :]
        vp = v_new + (kv_row + n)[:, None] * D + 4 * i[None, :]
        mm = nm[:, None]
        sc = tl.dot(p0, tl.trans(tl.load(kp + 0, mask=mm, other=0.0).to(DT)), input_precision=PREC)
        sc += tl.dot(p1, tl.trans(tl.load(kp + 1, mask=mm, other=0.0).to(DT)), input_precision=PREC)
        sc += tl.dot(p2, tl.trans(tl.load(kp + 2, mask=mm, other=0.0).to(DT)), input_precision=PREC)
        sc += tl.dot(p3, tl.trans(tl.load(kp + 3, mask=mm, other=0.0).to(DT)), input_precision=PREC)
        ok = (n[None, :] <= qi[:, None]) & nm[None, :]
        sc = tl.where(ok, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        pd = p.to(DT)
        acc0 = acc0 * alpha[:, None] + tl.dot(
            pd, tl.load(vp + 0, mask=mm, other=0.0).to(DT), input_precision=PREC
        )
        acc1 = acc1 * alpha[:, None] + tl.dot(
            pd, tl.load(vp + 1, mask=mm, other=0.0).to(DT), input_precision=PREC
        )
        acc2 = acc2 * alpha[:, None] + tl.dot(
            pd, tl.load(vp + 2, mask=mm, other=0.0).to(DT), input_precision=PREC
        )
        acc3 = acc3 * alpha[:, None] + tl.dot(
            pd, tl.load(vp + 3, mask=mm, other=0.0).to(DT), input_precision=PREC
        )
    inv = 1.0 / l_i
    o = out + rows.to(tl.int64)[:, None] * D + 4 * i[None, :]
    m = qm[:, None]
    ty = out.dtype.element_ty
    tl.store(o + 0, (acc0 * inv[:, None]).to(ty), mask=m)
    tl.store(o + 1, (acc1 * inv[:, None]).to(ty), mask=m)
    tl.store(o + 2, (acc2 * inv[:, None]).to(ty), mask=m)
    tl.store(o + 3, (acc3 * inv[:, None]).to(ty), mask=m)


def prefill_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    arena: torch.Tensor,
    state: torch.Tensor,
    table: torch.Tensor,
    lengths: torch.Tensor,
    key_scale: torch.Tensor | None,
    layout: list[int],
    sm_scale: float,
) -> torch.Tensor:
    """Triton launcher with :func:`pmkvq_compile.kernels.reference.prefill_attention`'s signature."""
    lay = ArenaLayout.from_list(layout)
    check_layout_tensors(lay, arena, state, table)
    check_attention_args(q, k_new, v_new, lengths, key_scale, lay, arena, 4)
    if not lay.triton_supported():
        raise ValueError(f"the Triton kernels need a power-of-two head_dim >= 64, got {lay}")
    b, hq, t, d = q.shape
    if k_new.shape[2] != t:
        raise ValueError(
            f"prefill needs as many new keys as queries, got {k_new.shape[2]} keys for {t} queries"
        )
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if t == 0:
        return out
    q, k_new, v_new = q.contiguous(), k_new.contiguous(), v_new.contiguous()
    has_ks = key_scale is not None
    ks = key_scale.to(device=q.device, dtype=torch.float32).contiguous() if has_ks else q
    interp = not q.is_cuda
    dt = tl.float32 if (interp or q.dtype == torch.float32) else _DT[q.dtype]
    prec = "ieee" if dt == tl.float32 else "tf32"
    block_m = 16 if interp else 64
    _prefill_kernel[(b * hq, triton.cdiv(t, block_m))](
        q, k_new, v_new, arena, arena.view(torch.int16), arena.view(torch.int32), arena.view(torch.float32),
        arena.view(torch.float16), table, state, lengths, ks, out, arena.shape[1], t, float(sm_scale) * LOG2E,
        HQ=hq, HKV=lay.num_kv_heads, D=d, GS=lay.group_size, G=lay.groups, N_SINK=lay.n_sink, NW=lay.n_window,
        SB=lay.sink_bits, WB=lay.window_bits, WIN_OFF=lay.window_offset, HAS_KS=has_ks, BLOCK_M=block_m,
        BLOCK_N=32 if interp else 64, DT=dt, PREC=prec, HM=lay.scale_bytes == 2, num_warps=4,
    )  # fmt: skip
    return out
