"""Decode attention over the packed arena: one query per row, GQA, split-K with a log-sum-exp merge.

A split kernel runs one program per (batch row, KV head, split). The query heads of the KV head's group
are the rows of the dot products (padded to 16), so K/V codes are loaded once per group. The past's
segments (sink, body chunks, window; each with its own bit-widths, read from ``table``) are divided evenly
over the splits; a split writes its partial output, max and sum. ``_merge_kernel`` (one program per row
and query head) attends the step's own new tokens in full precision and merges every partial.

Launch modes (``PMKVQ_DECODE_MODE``; all exact against the reference, all graph-capturable):

* ``legacy`` (default, the fastest measured on an H200, see benchmarks/RESULTS.md): ``_split_kernel_4part``,
  codes in 4 parts, four K=D/4 dots, run-time bit-width per tile, per-element dequantization.
* ``fused``: ``_split_kernel`` with ``ONLY=0``: runs of equal-bit chunks found at run time, each processed
  by a branch-free loop compiled for its bit pair (affine form on the codes, one K=D dot, fp16 codes built
  without int-to-float conversions); sink, window and other pairs by a generic loop.
* ``split``: one ``_split_kernel`` launch per bit pair of the layout's ERS schedule plus one generic launch,
  each writing its own partial slots.

The grids depend only on static shapes (B, Hkv, ``num_splits``) and the layout, never on the state, so a
step can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._common import attend_segment, segment_of
from .layout import ArenaLayout, check_layout_tensors, next_body_bits

__all__ = ["decode_attention", "default_num_splits"]

LOG2E = 1.4426950408889634


@triton.jit
def _load_q4(q_ptr, rows, rmask, ks_ptr, kv_head, scale, D: tl.constexpr, HAS_KS: tl.constexpr):
    """Queries ``rows`` ``[M]`` (row index into a [*, D] matrix) as 4 float32 parts ``[M, D/4]`` times
    ``scale`` and, with HAS_KS, the key scale of ``kv_head``; also the unscaled-by-key-scale version."""
    i = tl.arange(0, D // 4)
    p = q_ptr + rows.to(tl.int64)[:, None] * D + 4 * i[None, :]
    m = rmask[:, None]
    q0 = tl.load(p + 0, mask=m, other=0.0).to(tl.float32) * scale
    q1 = tl.load(p + 1, mask=m, other=0.0).to(tl.float32) * scale
    q2 = tl.load(p + 2, mask=m, other=0.0).to(tl.float32) * scale
    q3 = tl.load(p + 3, mask=m, other=0.0).to(tl.float32) * scale
    if HAS_KS:
        sp = ks_ptr + kv_head * (D // 2) + (4 * i) % (D // 2)
        q0 = q0 * tl.load(sp + 0)[None, :]
        q1 = q1 * tl.load(sp + 1)[None, :]
        q2 = q2 * tl.load(sp + 2)[None, :]
        q3 = q3 * tl.load(sp + 3)[None, :]
    return q0, q1, q2, q3


@triton.jit
def _unpack(w, BITS: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DT: tl.constexpr):
    """int32 words ``[R, D * BITS / 32]`` (quant.pack order: code ``d`` in bits ``BITS * (d % PER)`` of word
    ``d // PER``) -> codes ``[R, D]`` in natural order as DT (exact: codes are <= 8 bits). For float16 no
    int-to-float conversion (a quarter-rate instruction) is used: ``c | 0x6400`` is the half 1024 + c."""
    PER: tl.constexpr = 32 // BITS
    sh = tl.arange(0, PER) * BITS
    c = (w[:, :, None] >> sh[None, None, :]) & ((1 << BITS) - 1)
    if DT == tl.float16:  # noqa: SIM300
        h = (c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    else:
        h = c.to(DT)
    return tl.reshape(h, [R, D])


@triton.jit
def _online(s, m_i, l_i):
    """Online-softmax step on scores ``s [M, N]`` (log2 units, -inf where masked): ``(p, alpha, m, l)``.
    A row whose scores are all -inf so far keeps m = -inf without producing NaNs."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@triton.jit
def _attend_run(
    qd,
    qsum,
    m_i,
    l_i,
    acc,
    a32r,
    afr,
    table,
    c_begin,
    c_end,
    length,
    h,
    HKV: tl.constexpr,
    D: tl.constexpr,
    N_SINK: tl.constexpr,
    NW: tl.constexpr,
    KB: tl.constexpr,
    VB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
):
    """Body chunks ``c_begin..c_end`` (all at ``KB``/``VB`` <= 8 bits, one quantization group per head), tile
    by tile without any branch. Affine form: with k_hat = s_k * c - z_k, ``q . k_hat = s_k * (q . c) -
    z_k * sum(q)``; with v_hat = s_v * c - z_v, ``sum_n p_n v_hat_n = (p * s_v) @ c - sum_n p_n z_v``. The
    codes are only converted to DT (exact for <= 8 bits) and fed to one K=D dot each."""
    TPC: tl.constexpr = (NW + BLOCK_N - 1) // BLOCK_N
    KW: tl.constexpr = D * KB // 32
    VW: tl.constexpr = D * VB // 32
    PART: tl.constexpr = HKV * NW
    META: tl.constexpr = HKV * NW * (D * (KB + VB) // 8) // 4
    VOFF: tl.constexpr = HKV * NW * KW
    j = tl.arange(0, BLOCK_N)
    wk = tl.arange(0, KW)
    wv = tl.arange(0, VW)
    # tokens of this row that lie in the body, as a bound on the chunk-local index of the last chunk
    for t in range(c_begin * TPC, c_end * TPC):
        ci = t // TPC
        n = (t % TPC) * BLOCK_N + j
        nm = (n < NW) & (N_SINK + ci * NW + n < length)
        w0 = tl.load(table + ci * 3) // 4
        r = h * NW + n
        kw = tl.load(a32r + (w0 + r * KW)[:, None] + wk[None, :], mask=nm[:, None], other=0)
        ks = tl.load(afr + w0 + META + r, mask=nm, other=0.0)
        kz = tl.load(afr + w0 + META + PART + r, mask=nm, other=0.0)
        vw = tl.load(a32r + (w0 + VOFF + r * VW)[:, None] + wv[None, :], mask=nm[:, None], other=0)
        vs = tl.load(afr + w0 + META + 2 * PART + r, mask=nm, other=0.0)
        vz = tl.load(afr + w0 + META + 3 * PART + r, mask=nm, other=0.0)
        kc = _unpack(kw, KB, BLOCK_N, D, DT)
        qc = tl.dot(qd, tl.trans(kc), input_precision=PREC)
        s = qc * ks[None, :] - qsum[:, None] * kz[None, :]
        s = tl.where(nm[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = _online(s, m_i, l_i)
        vc = _unpack(vw, VB, BLOCK_N, D, DT)
        pv = (p * vs[None, :]).to(DT)
        acc = acc * alpha[:, None] + tl.dot(pv, vc, input_precision=PREC)
        acc -= tl.sum(p * vz[None, :], axis=1)[:, None]
    return m_i, l_i, acc


@triton.jit
def _attend_generic(
    qd,
    m_i,
    l_i,
    acc,
    a32r,
    afr,
    off,
    cap,
    kb,
    vb,
    n_valid,
    h,
    HKV: tl.constexpr,
    D: tl.constexpr,
    GS: tl.constexpr,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
):
    """Any region (run-time bits 2..16, any group count): per-element dequantization in float32. Used for
    the sink, the window, 16-bit chunks, chunks with key bits != value bits, and several groups per head."""
    d = tl.arange(0, D)
    PART = HKV * cap * G
    mb = (off + HKV * cap * (D * (kb + vb) // 8)) // 4
    kwd = (d * kb) >> 5
    ksh = (d * kb) & 31
    kmask = (1 << kb) - 1
    vwd = (d * vb) >> 5
    vsh = (d * vb) & 31
    vmask = (1 << vb) - 1
    k0 = off // 4
    v0 = (off + HKV * cap * (D * kb // 8)) // 4
    for n0 in range(0, n_valid, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nm = n < n_valid
        r = h * cap + n
        kw = tl.load(a32r + (k0 + r * (D * kb // 32))[:, None] + kwd[None, :], mask=nm[:, None], other=0)
        kc = ((kw >> ksh[None, :]) & kmask).to(tl.float32)
        if G == 1:
            ks = tl.load(afr + mb + r, mask=nm, other=0.0)[:, None]
            kz = tl.load(afr + mb + PART + r, mask=nm, other=0.0)[:, None]
        else:
            gidx = r[:, None] * G + (d // GS)[None, :]
            ks = tl.load(afr + mb + gidx, mask=nm[:, None], other=0.0)
            kz = tl.load(afr + mb + PART + gidx, mask=nm[:, None], other=0.0)
        s = tl.dot(qd, tl.trans((kc * ks - kz).to(DT)), input_precision=PREC)
        s = tl.where(nm[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = _online(s, m_i, l_i)
        vw = tl.load(a32r + (v0 + r * (D * vb // 32))[:, None] + vwd[None, :], mask=nm[:, None], other=0)
        vc = ((vw >> vsh[None, :]) & vmask).to(tl.float32)
        if G == 1:
            vs = tl.load(afr + mb + 2 * PART + r, mask=nm, other=0.0)[:, None]
            vz = tl.load(afr + mb + 3 * PART + r, mask=nm, other=0.0)[:, None]
        else:
            gidx = r[:, None] * G + (d // GS)[None, :]
            vs = tl.load(afr + mb + 2 * PART + gidx, mask=nm[:, None], other=0.0)
            vz = tl.load(afr + mb + 3 * PART + gidx, mask=nm[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), (vc * vs - vz).to(DT), input_precision=PREC)
    return m_i, l_i, acc


@triton.jit
def _split_kernel(
    q_ptr,
    a32,
    af,
    table,
    state,
    lengths,
    ks_ptr,
    part_acc,
    part_ml,
    ROW_BYTES,
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
    NUM_SPLITS: tl.constexpr,
    HAS_KS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_NG: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
    ONLY: tl.constexpr,
    FAST_MASK: tl.constexpr,
    SLOT0: tl.constexpr,
    SLOTS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    GQ: tl.constexpr = HQ // HKV
    mrow = tl.arange(0, BLOCK_M)
    rmask = mrow < GQ
    heads = h * GQ + mrow
    d = tl.arange(0, D)
    qp = q_ptr + (b * HQ + heads).to(tl.int64)[:, None] * D + d[None, :]
    q = tl.load(qp, mask=rmask[:, None], other=0.0).to(tl.float32) * qk_scale
    if HAS_KS:
        q = q * tl.load(ks_ptr + h * (D // 2) + d % (D // 2))[None, :]
    qd = q.to(DT)
    qsum = tl.sum(qd.to(tl.float32), axis=1)
    n_chunks = tl.load(state + 2)
    length = tl.load(lengths + b)
    # segments: 0 = sink, 1..n_chunks = body chunks, n_chunks + 1 = window; split evenly over the splits
    n_seg = n_chunks + 2
    per = (n_seg + NUM_SPLITS - 1) // NUM_SPLITS
    s_begin = split * per
    s_end = tl.minimum(s_begin + per, n_seg)
    # body chunks holding no token of this row are skipped
    last_chunk = tl.minimum((tl.maximum(length - N_SINK, 0) + NW - 1) // NW, n_chunks)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    row0 = b.to(tl.int64) * ROW_BYTES
    a32r = a32 + row0 // 4
    afr = af + row0 // 4
    s = s_begin
    while s < s_end:
        off, cap, kb, vb, n_valid = segment_of(s, n_chunks, length, table, N_SINK, NW, SB, WB, WIN_OFF)
        is_chunk = (s >= 1) & (s <= n_chunks)
        # specialised (branch-free, affine) loops exist for the bit pairs (2,2), (4,4), (8,8), (8,4), (4,2)
        # of one-group-per-head chunks; FAST_MASK (bit 4 * log2(kb / 2) + log2(vb / 2)) says which of them
        # this launch treats as fast, the rest (sink, window, 16 bits, ...) runs generically
        pair = kb * 16 + vb
        ki = (kb == 4).to(tl.int32) + 2 * (kb == 8).to(tl.int32) + 3 * (kb == 16).to(tl.int32)
        vi = (vb == 4).to(tl.int32) + 2 * (vb == 8).to(tl.int32) + 3 * (vb == 16).to(tl.int32)
        fast = is_chunk & (((tl.full([], FAST_MASK, tl.int32) >> (ki * 4 + vi)) & 1) == 1)
        if ONLY == 0:
            mine = fast
        elif ONLY == 1:
            mine = fast == 0
        else:
            mine = fast & (pair == ONLY)
        # a run of chunks of one bit pair, clipped to the split and to the row's length
        e = s + 1
        if ONLY != 1:  # noqa: SIM102 (a static if around a run-time one)
            if mine:
                run_end = tl.minimum(s_end, last_chunk + 1)
                go = e < run_end
                while go:
                    nkb = tl.load(table + (e - 1) * 3 + 1)
                    nvb = tl.load(table + (e - 1) * 3 + 2)
                    same = (nkb == kb) & (nvb == vb)
                    e = tl.where(same, e + 1, e)
                    go = same & (e < run_end)
                e = tl.maximum(e, s + 1)
        if ONLY == 0:
            if fast & (pair == 68):
                m_i, l_i, acc = _attend_run(
                    qd, qsum, m_i, l_i, acc, a32r, afr, table, s - 1, e - 1, length, h,
                    HKV, D, N_SINK, NW, 4, 4, BLOCK_N, DT, PREC,
                )  # fmt: skip
            elif fast & (pair == 34):
                m_i, l_i, acc = _attend_run(
                    qd, qsum, m_i, l_i, acc, a32r, afr, table, s - 1, e - 1, length, h,
                    HKV, D, N_SINK, NW, 2, 2, BLOCK_N, DT, PREC,
                )  # fmt: skip
            elif fast & (pair == 136):
                m_i, l_i, acc = _attend_run(
                    qd, qsum, m_i, l_i, acc, a32r, afr, table, s - 1, e - 1, length, h,
                    HKV, D, N_SINK, NW, 8, 8, BLOCK_N, DT, PREC,
                )  # fmt: skip
            elif fast & (pair == 132):
                m_i, l_i, acc = _attend_run(
                    qd, qsum, m_i, l_i, acc, a32r, afr, table, s - 1, e - 1, length, h,
                    HKV, D, N_SINK, NW, 8, 4, BLOCK_N, DT, PREC,
                )  # fmt: skip
            elif fast & (pair == 66):
                m_i, l_i, acc = _attend_run(
                    qd, qsum, m_i, l_i, acc, a32r, afr, table, s - 1, e - 1, length, h,
                    HKV, D, N_SINK, NW, 4, 2, BLOCK_N, DT, PREC,
                )  # fmt: skip
            else:
                m_i, l_i, acc = _attend_generic(
                    qd, m_i, l_i, acc, a32r, afr, off, cap, kb, vb, n_valid, h,
                    HKV, D, GS, G, BLOCK_NG, DT, PREC,
                )  # fmt: skip
        elif ONLY == 1:
            if mine:
                m_i, l_i, acc = _attend_generic(
                    qd, m_i, l_i, acc, a32r, afr, off, cap, kb, vb, n_valid, h,
                    HKV, D, GS, G, BLOCK_NG, DT, PREC,
                )  # fmt: skip
        else:
            if mine:
                m_i, l_i, acc = _attend_run(
                    qd, qsum, m_i, l_i, acc, a32r, afr, table, s - 1, e - 1, length, h,
                    HKV, D, N_SINK, NW, ONLY // 16, ONLY % 16, BLOCK_N, DT, PREC,
                )  # fmt: skip
        s = e
    prow = ((b * HQ + heads) * SLOTS + SLOT0 + split).to(tl.int64)
    tl.store(part_acc + prow[:, None] * D + d[None, :], acc, mask=rmask[:, None])
    tl.store(part_ml + prow * 2, m_i, mask=rmask)
    tl.store(part_ml + prow * 2 + 1, l_i, mask=rmask)


# the previous kernel (4-part codes, run-time bits per tile), kept as mode "legacy" for comparison
@triton.jit
def _split_kernel_4part(
    q_ptr,
    a8,
    a16,
    a32,
    af,
    table,
    state,
    lengths,
    ks_ptr,
    part_acc,
    part_ml,
    ROW_BYTES,
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
    NUM_SPLITS: tl.constexpr,
    HAS_KS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    GQ: tl.constexpr = HQ // HKV
    mrow = tl.arange(0, BLOCK_M)
    rmask = mrow < GQ
    heads = h * GQ + mrow
    q0, q1, q2, q3 = _load_q4(q_ptr, b * HQ + heads, rmask, ks_ptr, h, qk_scale, D, HAS_KS)
    q0 = q0.to(DT)
    q1 = q1.to(DT)
    q2 = q2.to(DT)
    q3 = q3.to(DT)
    n_chunks = tl.load(state + 2)
    length = tl.load(lengths + b)
    n_seg = n_chunks + 2
    per = (n_seg + NUM_SPLITS - 1) // NUM_SPLITS
    s_begin = split * per
    s_end = tl.minimum(s_begin + per, n_seg)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, D // 4], tl.float32)
    acc1 = tl.zeros([BLOCK_M, D // 4], tl.float32)
    acc2 = tl.zeros([BLOCK_M, D // 4], tl.float32)
    acc3 = tl.zeros([BLOCK_M, D // 4], tl.float32)
    row0 = b.to(tl.int64) * ROW_BYTES
    for s in range(s_begin, s_end):
        off, cap, kb, vb, n_valid = segment_of(s, n_chunks, length, table, N_SINK, NW, SB, WB, WIN_OFF)
        m_i, l_i, acc0, acc1, acc2, acc3 = attend_segment(
            q0, q1, q2, q3, m_i, l_i, acc0, acc1, acc2, acc3,
            a8 + row0, a16 + row0 // 2, a32 + row0 // 4, af + row0 // 4, off, cap, kb, vb, n_valid, h,
            HKV, D, GS, G, BLOCK_N, DT, PREC,
        )  # fmt: skip
    i = tl.arange(0, D // 4)
    prow = ((b * HQ + heads) * NUM_SPLITS + split).to(tl.int64)
    pa = part_acc + prow[:, None] * D + 4 * i[None, :]
    m = rmask[:, None]
    tl.store(pa + 0, acc0, mask=m)
    tl.store(pa + 1, acc1, mask=m)
    tl.store(pa + 2, acc2, mask=m)
    tl.store(pa + 3, acc3, mask=m)
    tl.store(part_ml + prow * 2, m_i, mask=rmask)
    tl.store(part_ml + prow * 2 + 1, l_i, mask=rmask)


@triton.jit
def _merge_kernel(
    q_ptr,
    k_new,
    v_new,
    part_acc,
    part_ml,
    out,
    T,
    qk_scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    h = hq // (HQ // HKV)
    d = tl.arange(0, D)
    base = (b * HQ + hq) * NUM_SPLITS
    q = tl.load(q_ptr + (b * HQ + hq) * D + d).to(tl.float32) * qk_scale
    kv_row = (b * HKV + h).to(tl.int64) * T
    # the partials' max, in blocks of SPLIT_P2 slots (many slots at batch 1 would not fit registers)
    mx = tl.full([], float("-inf"), tl.float32)
    for s0 in range(0, NUM_SPLITS, SPLIT_P2):
        sp = s0 + tl.arange(0, SPLIT_P2)
        ms = tl.load(part_ml + (base + sp) * 2, mask=sp < NUM_SPLITS, other=float("-inf"))
        mx = tl.maximum(mx, tl.max(ms, axis=0))
    # the new tokens' scores (T is small; a first pass finds their max)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < T
        kn = tl.load(k_new + (kv_row + t)[:, None] * D + d[None, :], mask=tm[:, None], other=0.0).to(
            tl.float32
        )
        sc = tl.where(tm, tl.sum(kn * q[None, :], axis=1), float("-inf"))
        mx = tl.maximum(mx, tl.max(sc, axis=0))
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    num = tl.zeros([D], tl.float32)
    den = tl.zeros([], tl.float32)
    for s0 in range(0, NUM_SPLITS, SPLIT_P2):
        sp = s0 + tl.arange(0, SPLIT_P2)
        smask = sp < NUM_SPLITS
        ms = tl.load(part_ml + (base + sp) * 2, mask=smask, other=float("-inf"))
        ls = tl.load(part_ml + (base + sp) * 2 + 1, mask=smask, other=0.0)
        w = tl.where(smask, tl.math.exp2(ms - mx), 0.0)
        acc = tl.load(part_acc + (base + sp)[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        num += tl.sum(acc * w[:, None], axis=0)
        den += tl.sum(ls * w, axis=0)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < T
        kn = tl.load(k_new + (kv_row + t)[:, None] * D + d[None, :], mask=tm[:, None], other=0.0).to(
            tl.float32
        )
        vn = tl.load(v_new + (kv_row + t)[:, None] * D + d[None, :], mask=tm[:, None], other=0.0).to(
            tl.float32
        )
        sc = tl.where(tm, tl.sum(kn * q[None, :], axis=1), float("-inf"))
        p = tl.where(tm, tl.math.exp2(sc - mx), 0.0)
        num += tl.sum(vn * p[:, None], axis=0)
        den += tl.sum(p, axis=0)
    res = num / tl.where(den == 0.0, 1.0, den)
    tl.store(out + (b * HQ + hq) * D + d, res.to(out.dtype.element_ty))


_DT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def default_num_splits(batch: int, num_kv_heads: int, max_segments: int, sm_count: int = 132) -> int:
    """Splits so that about four programs run per multiprocessor, from static shapes only."""
    want = max(1, (4 * sm_count) // max(batch * num_kv_heads, 1))
    return int(max(1, min(want, max_segments, 128)))


def check_attention_args(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    lengths: torch.Tensor,
    key_scale: torch.Tensor | None,
    lay: ArenaLayout,
    arena: torch.Tensor,
    q_dims: int,
) -> None:
    """Shared validation of the attention ops' arguments (ValueError naming the bad value)."""
    if q.dim() != q_dims or q.dtype not in _DT:
        raise ValueError(
            f"q must be a {q_dims}-d float16/bfloat16/float32 tensor, got {q.dtype} {tuple(q.shape)}"
        )
    b, hq, d = q.shape[0], q.shape[1], q.shape[-1]
    if d != lay.head_dim or hq % lay.num_kv_heads or b != arena.shape[0]:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit the layout (B={arena.shape[0]}, Hq a multiple of "
            f"Hkv={lay.num_kv_heads}, D={lay.head_dim})"
        )
    if k_new.dim() != 4 or k_new.shape != v_new.shape or tuple(k_new.shape[:2]) != (b, lay.num_kv_heads):
        raise ValueError(
            f"k_new/v_new must be [B={b}, Hkv={lay.num_kv_heads}, T, D={d}], got {tuple(k_new.shape)} / "
            f"{tuple(v_new.shape)}"
        )
    if k_new.shape[3] != d:
        raise ValueError(f"k_new head_dim {k_new.shape[3]} != {d}")
    if lengths.dtype != torch.int32 or tuple(lengths.shape) != (b,):
        raise ValueError(f"lengths must be int32 [B={b}], got {lengths.dtype} {tuple(lengths.shape)}")
    if key_scale is not None and tuple(key_scale.shape) != (lay.num_kv_heads, d // 2):
        raise ValueError(
            f"key_scale must be [Hkv, D/2] = {(lay.num_kv_heads, d // 2)}, got {tuple(key_scale.shape)}"
        )
    for name, t in (("k_new", k_new), ("v_new", v_new), ("lengths", lengths), ("arena", arena)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


_FAST_PAIRS = ((4, 4), (2, 2), (8, 8), (8, 4), (4, 2))
DEFAULT_MODE = "legacy"


def _pair_bit(kb: int, vb: int) -> int:
    return 1 << (4 * (kb.bit_length() - 2) + vb.bit_length() - 2)


def _launches(lay: ArenaLayout, mode: str) -> list[tuple[int, int]]:
    """``(ONLY, FAST_MASK)`` of each ``_split_kernel`` launch. ``fused``: one launch that branches per run of
    chunks at run time. ``split``: one launch per fast bit pair the layout's ERS schedule can produce (static:
    from ``init_bits`` down to the plan's bits), each compiled for its pair alone (fewer registers), plus one
    for everything else (sink, window, other pairs); all grids are fixed and their partials are merged."""
    if lay.groups != 1:
        return [(1, 0)]
    if mode == "fused":
        return [(0, sum(_pair_bit(*p) for p in _FAST_PAIRS))]
    chain, kv = [], (lay.init_bits, lay.init_bits)
    while kv is not None:
        chain.append(kv)
        kv = next_body_bits(*kv, (lay.key_bits, lay.value_bits))
    pairs = [p for p in _FAST_PAIRS if p in chain]
    mask = sum(_pair_bit(*p) for p in pairs)
    return [(kb * 16 + vb, mask) for kb, vb in pairs] + [(1, mask)]


def decode_attention(
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
    num_splits: int,
) -> torch.Tensor:
    """Triton launcher with :func:`pmkvq_compile.kernels.reference.decode_attention`'s signature."""
    lay = ArenaLayout.from_list(layout)
    check_layout_tensors(lay, arena, state, table)
    check_attention_args(q, k_new, v_new, lengths, key_scale, lay, arena, 3)
    if not lay.triton_supported():
        raise ValueError(f"the Triton kernels need a power-of-two head_dim >= 64, got {lay}")
    b, hq, d = q.shape
    hkv, t = lay.num_kv_heads, k_new.shape[2]
    if num_splits <= 0:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        num_splits = default_num_splits(b, hkv, lay.max_chunks + 2, sms)
    q, k_new, v_new = q.contiguous(), k_new.contiguous(), v_new.contiguous()
    has_ks = key_scale is not None
    ks = key_scale.to(device=q.device, dtype=torch.float32).contiguous() if has_ks else q
    qk_scale = float(sm_scale) * LOG2E
    gq = hq // hkv
    interp = not q.is_cuda
    native = not interp or os.environ.get("PMKVQ_INTERPRET_NATIVE_DT") == "1"  # tests: fp16 tiles on the CPU
    dt = tl.float32 if (not native or q.dtype == torch.float32) else _DT[q.dtype]
    prec = "ieee" if dt == tl.float32 else "tf32"
    a32 = arena.view(torch.int32)
    # tuning knobs (benchmarks sweep them): "BLOCK_N,num_warps,num_stages", and the launch mode
    cfg = os.environ.get("PMKVQ_DECODE_CFG", "")
    block_n, warps, stages = (int(x) for x in cfg.split(",")) if cfg else (64 if d <= 128 else 32, 4, 2)
    mode = os.environ.get("PMKVQ_DECODE_MODE", DEFAULT_MODE)
    launches = [] if mode == "legacy" else _launches(lay, mode)
    slots = max(len(launches), 1) * num_splits
    part_acc = torch.empty(b, hq, slots, d, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(b, hq, slots, 2, dtype=torch.float32, device=q.device)
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    for i, (only, fast_mask) in enumerate(launches):
        _split_kernel[(b, hkv, num_splits)](
            q, a32, arena.view(torch.float32), table, state, lengths, ks,
            part_acc, part_ml, arena.shape[1], qk_scale,
            HQ=hq, HKV=hkv, D=d, GS=lay.group_size, G=lay.groups, N_SINK=lay.n_sink, NW=lay.n_window,
            SB=lay.sink_bits, WB=lay.window_bits, WIN_OFF=lay.window_offset, NUM_SPLITS=num_splits,
            HAS_KS=has_ks, BLOCK_M=max(16, triton.next_power_of_2(gq)), BLOCK_N=block_n, BLOCK_NG=16,
            DT=dt, PREC=prec, ONLY=only, FAST_MASK=fast_mask, SLOT0=i * num_splits, SLOTS=slots,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
    if mode == "legacy":
        _split_kernel_4part[(b, hkv, num_splits)](
            q, arena, arena.view(torch.int16), a32, arena.view(torch.float32), table, state, lengths, ks,
            part_acc, part_ml, arena.shape[1], qk_scale,
            HQ=hq, HKV=hkv, D=d, GS=lay.group_size, G=lay.groups, N_SINK=lay.n_sink, NW=lay.n_window,
            SB=lay.sink_bits, WB=lay.window_bits, WIN_OFF=lay.window_offset, NUM_SPLITS=num_splits,
            HAS_KS=has_ks, BLOCK_M=max(16, triton.next_power_of_2(gq)), BLOCK_N=block_n,
            DT=dt, PREC=prec, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    _merge_kernel[(b, hq)](
        q, k_new, v_new, part_acc, part_ml, out, t, qk_scale,
        HQ=hq, HKV=hkv, D=d, NUM_SPLITS=slots, SPLIT_P2=min(128, triton.next_power_of_2(slots)),
        BLOCK_T=min(16, triton.next_power_of_2(max(t, 1))), num_warps=4,
    )  # fmt: skip
    return out


def sm_scale_default(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
