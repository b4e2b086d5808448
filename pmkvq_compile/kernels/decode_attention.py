"""Decode attention over the packed arena: one query per row, GQA, split-K with a log-sum-exp merge.

Two launches, each over a grid fixed by static shapes (B, Hkv, ``num_splits``) and the layout, never by the
state, so a step can be captured in a CUDA graph:

* :func:`_attn_kernel`: ``num_splits`` programs per (row, KV head) share the body chunks evenly and take
  each bit pair of the layout's ERS schedule with both bits <= 8 in turn (:func:`_body_part`), all pairs
  into one partial slot per program (the row's table is read once; a pair absent from it is skipped). The
  codes are the A operand of both dot products (``S^T = K codes @ q^T`` and ``acc^T = V codes^T @ P``),
  unpacked in registers from packed words that the pipeliner streams into shared memory: each code is
  masked where it lies in its byte, two per ``lop3``, with one shift per word for the upper bytes, and the
  place factors ride on the queries and the accumulator rows; the GQA group's query heads (padded to 8) are
  the columns, so K/V codes are read once per group. The affine form keeps the codes exact in float16. The
  softmax runs against each span's first-tile max (no cross-warp max on later tiles); a span whose later
  scores overflow it is read again with the exact running max.
  Programs beside them run :func:`_edge_part`: the sink, the window (sliced over the programs) and any
  chunk the pairs do not take (16-bit chunks, pairs outside the schedule, several groups per head),
  dequantized per element.
* :func:`_merge_kernel` (one program per row, query head and 32 output dims; ``PMKVQ_MERGE_CFG`` sweeps the
  cut): the step's own new tokens in full precision, and the log-sum-exp merge of every partial.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._common import attend_segment, attend_tile, load_tile, segment_of
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


# ---- tokens as the mma's M dimension: packed words streamed to shared memory, unpacked in registers ----


@triton.jit
def _perm_dims(BITS: tl.constexpr, D: tl.constexpr):
    """The head dim held by each column ``[D]`` of :func:`_codes`: column ``a * 2W + 2 i + e`` (``W = D *
    BITS / 32`` words per token, ``a < 16 / BITS``, ``e < 2``) is code ``a + e * 16 / BITS`` of word ``i``."""
    col = tl.arange(0, D)
    W: tl.constexpr = D * BITS // 32
    a = col // (2 * W)
    i = (col // 2) % W
    e = col % 2
    return i * (32 // BITS) + e * (16 // BITS) + a


@triton.jit
def _pairs(w, a: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """Codes ``a`` and ``a + 16/BITS`` of int32 words ``w`` ``[R, W]`` (bits 0-15 and 16-31 hold codes
    ``0..16/BITS-1`` and ``16/BITS..``) as ``[R, W, 2]`` int32 float16 pairs ``1024 + c * 2^(BITS * j)``,
    ``j`` the code's place in its byte (:func:`_code_scale`): a code is masked where it lies in its byte,
    with ``0x6400`` or'ed in, so only a code in the upper byte of a half needs a shift (one per word, shared
    by that byte's codes), and one three-input logic op gives both halves of a float16 pair (``(x & mask) |
    0x64006400``; with ASM an explicit ``lop3``, which ptxas does not form from the and/or pair itself)."""
    CPB: tl.constexpr = 8 // BITS
    M2: tl.constexpr = (((1 << BITS) - 1) << (BITS * (a % CPB))) * 0x10001
    x = w >> (8 * (a // CPB)) if a >= CPB else w
    if ASM:
        x = tl.inline_asm_elementwise(
            f"lop3.b32 $0, $1, {M2}, 1677747200, 234;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        x = (x & M2) | 0x64006400
    return tl.join(x & 0xFFFF, x >> 16)


@triton.jit
def _as_ct(x, CT: tl.constexpr):
    """int32 halves from :func:`_pairs` (``0x6400 | x``, ``x`` a code times its place factor) as codes in CT:
    in float16 the bits themselves (the half ``1024 + x``, exact, no int-to-float conversion), in float32
    the plain ``x``."""
    if CT == tl.float16:  # noqa: SIM300
        return x.to(tl.int16).to(tl.float16, bitcast=True)
    return (x & 0xFF).to(CT)


@triton.jit
def _code_scale(a, BITS: tl.constexpr):
    """``2^-(BITS * j)`` for code index ``a`` (within a 16-bit half) whose place in its byte is ``j``: the
    factor that undoes :func:`_pairs`'s in-place masking."""
    CPB: tl.constexpr = 8 // BITS
    return 1.0 / (1 << (BITS * (a % CPB))).to(tl.float32)


@triton.jit
def _codes(w, BITS: tl.constexpr, CT: tl.constexpr, ASM: tl.constexpr):
    """Int32 words ``w`` ``[R, W]`` (``W = D * BITS / 32``) as ``[R, D]`` codes in CT, columns in
    :func:`_perm_dims` order, each times its place factor (:func:`_pairs`; :func:`_code_scale` undoes it) and
    plus 1024 in float16. Each code is exact: in float16 ``0x6400 | x`` is the half ``1024 + x`` for ``x <
    1024``, so no int-to-float conversion is needed."""
    R: tl.constexpr = w.shape[0]
    W: tl.constexpr = w.shape[1]
    if BITS == 8:
        x = tl.join(_pairs(w, 0, BITS, ASM), _pairs(w, 1, BITS, ASM))
        x = tl.permute(x, (0, 3, 1, 2))
    elif BITS == 4:
        x = tl.join(
            tl.join(_pairs(w, 0, BITS, ASM), _pairs(w, 1, BITS, ASM)),
            tl.join(_pairs(w, 2, BITS, ASM), _pairs(w, 3, BITS, ASM)),
        )
        x = tl.permute(x, (0, 4, 3, 1, 2))
    else:
        x = tl.join(
            tl.join(
                tl.join(_pairs(w, 0, BITS, ASM), _pairs(w, 1, BITS, ASM)),
                tl.join(_pairs(w, 2, BITS, ASM), _pairs(w, 3, BITS, ASM)),
            ),
            tl.join(
                tl.join(_pairs(w, 4, BITS, ASM), _pairs(w, 5, BITS, ASM)),
                tl.join(_pairs(w, 6, BITS, ASM), _pairs(w, 7, BITS, ASM)),
            ),
        )
        x = tl.permute(x, (0, 5, 4, 3, 1, 2))
    x = tl.reshape(x, [R, 32 * W // BITS])
    return _as_ct(x, CT)


@triton.jit
def _vperm_dims(BITS: tl.constexpr, D: tl.constexpr):
    """The head dim held by each row ``[D]`` of :func:`_vcodes`. A unit is an int16 of ``A = 16 / BITS``
    codes of one token (dims ``A u .. A u + A - 1``). Row ``r`` holds code ``a`` of unit ``u``: the low
    three bits of ``u`` are the low bits of ``r``, the next bit of ``r`` is bit 0 of ``a``, then the rest of
    ``u``; at 4 bits the top bit of ``r`` is bit 1 of ``a``; at 2 bits the top bit is bit 1 of ``a`` and
    the one below it bit 2. The mma A fragment keeps row bits 3 and 6 (of 128 rows) in one thread's
    registers, so a thread unpacks two or all codes of each unit it loads from shared memory."""
    r = tl.arange(0, D)
    if BITS == 8:
        u = (r // 16) * 8 + r % 8
        return 2 * u + (r // 8) % 2
    rr = r % (D // 2)
    if BITS == 4:
        u = (rr // 16) * 8 + rr % 8
        return 4 * u + 2 * (r // (D // 2)) + (rr // 8) % 2
    q = rr % (D // 4)
    u = (q // 16) * 8 + q % 8
    return 8 * u + 4 * (rr // (D // 4)) + 2 * (r // (D // 2)) + (q // 8) % 2


@triton.jit
def _vcodes(u, BITS: tl.constexpr, CT: tl.constexpr, ASM: tl.constexpr):
    """Value units ``u`` ``[R, U]`` (int16 of ``16 / BITS`` codes) as transposed codes plus 1024 in CT,
    ``[D, R]``, rows in :func:`_vperm_dims` order. They are the A operand of ``acc^T = V^T @ P``, whose
    register pairs run along the tokens: two tokens' units are combined into one int32 first (even token in
    bits 0-15; from shared memory one transposing ``ldmatrix`` does it), so one shift and one logic op give
    a float16 pair again. At 2 bits the upper four codes of a unit are taken by a shift along a broadcast
    axis that the layout may place on another warp (a fragment has room for two code bits per thread)."""
    R: tl.constexpr = u.shape[0]
    U: tl.constexpr = u.shape[1]
    u0, u1 = tl.split(tl.permute(tl.reshape(u.to(tl.int32) & 0xFFFF, [R // 2, 2, U]), (0, 2, 1)))
    t = tl.reshape(u0 | (u1 << 16), [R // 2, U // 8, 8])
    if BITS == 8:
        x = tl.join(_pairs(t, 0, BITS, ASM), _pairs(t, 1, BITS, ASM))
        x = tl.reshape(tl.permute(x, (1, 4, 2, 0, 3)), [2 * U, R])
    elif BITS == 4:
        x = tl.join(
            tl.join(_pairs(t, 0, BITS, ASM), _pairs(t, 1, BITS, ASM)),
            tl.join(_pairs(t, 2, BITS, ASM), _pairs(t, 3, BITS, ASM)),
        )
        x = tl.reshape(tl.permute(x, (5, 1, 4, 2, 0, 3)), [4 * U, R])
    else:
        t = t[:, :, :, None] >> (8 * tl.arange(0, 2))[None, None, None, :]
        x = tl.join(
            tl.join(_pairs(t, 0, BITS, ASM), _pairs(t, 1, BITS, ASM)),
            tl.join(_pairs(t, 2, BITS, ASM), _pairs(t, 3, BITS, ASM)),
        )
        x = tl.reshape(tl.permute(x, (6, 3, 1, 5, 2, 0, 4)), [8 * U, R])
    return _as_ct(x, CT)


@triton.jit
def _raise_max(m_old, m_blk):
    """Online softmax step: the new running max, the max to subtract (0 where still -inf, so no NaN), and the
    factor ``alpha`` that rescales sums taken against ``m_old``."""
    m_new = tl.maximum(m_old, m_blk)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, m_safe, tl.math.exp2(m_old - m_safe)


@triton.jit
def _down_to_2_14(x):
    """The power of two (>= 1) that brings ``x`` (absolute maxima, any shape) to at most 2^14: float16's range
    with room for a 128-term dot."""
    return tl.math.exp2(tl.maximum(tl.ceil(tl.math.log2(tl.maximum(x, 1e-30))) - 14.0, 0.0))


@triton.jit
def _tile_loop(
    q_ptr,
    qrows,
    rmask,
    ks_ptr,
    qk_scale,
    m_i,
    l_i,
    acc,
    a16r,
    a32r,
    afr,
    ahr,
    off0,
    c_begin,
    c_end,
    tok0,
    length,
    h,
    exact,
    KB: tl.constexpr,
    VB: tl.constexpr,
    CAP: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    HAS_KS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CT: tl.constexpr,
    PREC: tl.constexpr,
    ASM: tl.constexpr,
    STAGES: tl.constexpr,
    HM: tl.constexpr,
):
    """Regions ``c_begin..c_end`` of capacity ``CAP``, all at ``KB``/``VB`` <= 8 bits with one group per head,
    stored back to back from byte ``off0`` (region ``c`` holds tokens from ``tok0 + c * CAP``). Tile by
    tile with no branch and with addresses computed from the loop index alone (no table lookup), so Triton
    pipelines the loads (``num_stages``).

    Scores are computed transposed, ``S^T [BLOCK_N, M] = codes [BLOCK_N, D] @ q^T [D, M]``, so the codes are
    the mma's A operand: the packed words go to shared memory and are unpacked in the operand's registers,
    two codes per logic op, masked in place (:func:`_codes`; the head dims are permuted, the queries with them
    and scaled by the inverse place factors).
    Values likewise: ``acc^T [D, M] = V^T [D, BLOCK_N] @ P [BLOCK_N, M]`` with the value codes as the A
    operand, unpacked two tokens at a time (:func:`_vcodes`), so the accumulator ``acc`` ``[D, M]`` is
    transposed and its rows permuted (:func:`_vperm_dims`). The affine form keeps the codes exact:
    ``q . k_hat = s_k (q . c) - z_k sum(q)`` and ``sum_n p_n v_hat_n = (p s_v) @ c - sum_n p_n z_v``. The
    dots run in ``CT``: float16 on the GPU (and under the interpreter with ``PMKVQ_INTERPRET_NATIVE_DT``),
    bfloat16 queries scaled by a power of two into float16's range first; float32 under the interpreter
    otherwise. Float32 queries on float16 tiles (``QS``) take every product twice: the float16 high part of
    ``q`` (of ``p s_v``) and the rest, rounded to float16 after a power-of-two scaling, with the codes less
    their +1024 so that no large offset cancels in the float32 sums; about 22 bits of each operand, within
    2e-5 of the reference (H100, B8 x 32k, 4 bits: 87 us against 791 us for the float32 dots this replaced;
    offline SASS 845 instructions per tile against 577 for float16 queries). Row sums are kept per tile
    element and reduced once at the end.

    The softmax runs against a reference max taken on the span's first tile (folded with the incoming
    ``m_i``), not a running one: the other tiles need no cross-warp max and rescale nothing (offline SASS,
    triton 3.6: 462 instead of 556 instructions per 2-bit tile and warp on the path they take). A later
    score far above the reference overflows ``p``, the float16 ``p * s_v`` or (float32 tiles) the
    accumulator, which leaves a sum infinite or NaN; ``l`` past 2^64 counts as such too. The returned
    ``bad`` (int32 scalar, 0 or 1) then asks the caller for the span again with ``exact`` = 1, which raises
    the max on every tile (the classic online softmax). The four per-token scales come in one load (the
    pipeliner streams only loads
    that reach a dot); where tiles divide regions the loads are unmasked and only the math is."""
    TPC: tl.constexpr = (CAP + BLOCK_N - 1) // BLOCK_N
    KBY: tl.constexpr = D * KB // 8
    VBY: tl.constexpr = D * VB // 8
    PART: tl.constexpr = HKV * CAP
    VOFF: tl.constexpr = HKV * CAP * KBY
    MOFF: tl.constexpr = HKV * CAP * (KBY + VBY)
    MB: tl.constexpr = 16 - 8 * HM  # meta bytes per token and head: float32 or (HM) float16, one group
    RB: tl.constexpr = MOFF + MB * HKV * CAP  # bytes of one region
    # region offsets are multiples of 16 (token bytes are, for the head dims the kernels take); written as
    # a product so that the loads' alignment is known (16-byte vectors)
    off0 = (off0 >> 4) * 16
    # the queries (rows ``qrows`` [M]) with their dims permuted like the key codes', transposed: loaded here
    # rather than kept live across the caller's loop (they would pin registers)
    dk = _perm_dims(KB, D)
    qp = q_ptr + qrows.to(tl.int64)[:, None] * D + dk[None, :]
    q = tl.load(qp, mask=rmask[:, None], other=0.0).to(tl.float32) * qk_scale
    if HAS_KS:
        q = q * tl.load(ks_ptr + h * (D // 2) + dk % (D // 2))[None, :]
    # float32 queries with float16 tiles (the GPU): every product is taken twice, with a float16 high part
    # and the float16-rounded rest scaled by a power of two, so the operands keep about 22 bits; the codes
    # then lose their +1024 (below), so no large offset is cancelled in the float32 sums
    QS: tl.constexpr = (CT == tl.float16) and (q_ptr.dtype.element_ty == tl.float32)  # noqa: SIM300
    OFS: tl.constexpr = 1024.0 if (CT == tl.float16) and not QS else 0.0  # noqa: SIM300
    qscale = 1.0
    if CT == tl.float16 and not QS:  # noqa: SIM300
        qscale = _down_to_2_14(tl.max(tl.max(tl.abs(q), 1), 0))
    # the key codes come scaled by 2^(KB j) (_pairs); the queries take the inverse, a power of two (exact)
    pf = _code_scale((tl.arange(0, D) // (D * KB // 16)), KB)[None, :]
    if QS:
        # powers of two per query head (so one head's inf or huge values leave the others alone): qsc brings
        # the head's largest element to at most 2^14, lscale the rest's largest near 2^14 (floored at the
        # high part's 2^-24, so that a rest of 0 leaves the scaled high scores finite: about 2^53 at most);
        # the scores come back in true units through linv = qsc / lscale, so qscale below stays 1
        qcol = tl.max(tl.abs(q), 1)
        qsc = _down_to_2_14(qcol)
        qsum = tl.sum(q, axis=1)
        qn = q / qsc[:, None] * pf
        qh = qn.to(CT)
        ql = qn - qh.to(tl.float32)
        lmax = tl.maximum(tl.max(tl.abs(ql), 1), qcol / qsc * 5.960464477539063e-08)
        lexp = 14.0 - tl.ceil(tl.math.log2(tl.maximum(lmax, 1e-30)))
        lscale = tl.math.exp2(lexp)[None, :]
        linv = (tl.math.exp2(-lexp) * qsc)[None, :]
        qlt = tl.trans((ql * tl.math.exp2(lexp)[:, None]).to(CT))
        q = qh
    else:
        q = (q / qscale).to(CT).to(tl.float32)
        qsum = tl.sum(q, axis=1)
        q = (q * pf).to(CT)
    qt = tl.trans(q)
    # float16 codes carry +1024 (see _codes): q . (c + 1024) = q . c + 1024 sum(q), subtracted by starting
    # the scores' accumulator there; float32 ones (the interpreter) carry no offset
    s0 = tl.zeros([BLOCK_N, acc.shape[1]], tl.float32) - OFS * tl.sum(q.to(tl.float32), axis=1)[None, :]
    j = tl.arange(0, BLOCK_N)
    KW: tl.constexpr = D * KB // 32
    VU: tl.constexpr = D // (16 // VB)  # int16 units per token
    ik = tl.arange(0, KW)
    iv = tl.arange(0, VU)
    i4 = tl.arange(0, 4)
    # the accumulator comes in true (a span after another of a hand-made table runs into it); the loop keeps
    # it in code units (place factors on, the offset and the zero points off), undone below for all of it
    rs = _code_scale(_vperm_dims(VB, D) % (16 // VB), VB)[:, None]
    acc = acc / rs
    lt = tl.zeros([BLOCK_N, acc.shape[1]], tl.float32)
    zt = tl.zeros([BLOCK_N, acc.shape[1]], tl.float32)
    st = tl.zeros([BLOCK_N, acc.shape[1]], tl.float32)
    # float16 value scales (HM) stay float16 at 2-bit values, where they meet p in a packed half multiply (no
    # conversion: the loop is bound by issue there; at wider values the float32 product measured faster,
    # H100, B8 x 32k: 2 bits 47.7 -> 46.1 us, 4 bits 64.7 -> 65.0)
    HALF_PV: tl.constexpr = HM and VB == 2 and not QS
    m_ref = tl.zeros_like(m_i)  # the max p is taken against: m_i, or 0 while that is -inf
    for t in tl.range(c_begin * TPC, c_end * TPC, num_stages=STAGES):
        ci = t // TPC
        n = (t % TPC) * BLOCK_N + j
        nm = (n < CAP) & (tok0 + ci * CAP + n < length)
        off = off0 + (ci - c_begin) * RB
        r = h * CAP + n
        if HM:
            mb = tl.multiple_of((off + MOFF) // 2, 8) + r
        else:
            mb = tl.multiple_of((off + MOFF) // 4, 4) + r
        # the four per-token scales in one load: the pipeliner streams only loads that reach a dot, and the
        # value zero points alone do not (a load of their own was a plain global load waited on per tile).
        # With whole tiles per region every address is inside a written region (tokens past the row's
        # length included), so only the math is masked; the value scales of such tokens are zeroed (they may
        # be any bits, and 0 * NaN is NaN)
        lm = (n < CAP)[:, None] if CAP % BLOCK_N else None
        if HM:
            sc = tl.load(ahr + mb[:, None] + PART * i4[None, :], mask=lm)
        else:
            sc = tl.load(afr + mb[:, None] + PART * i4[None, :], mask=lm)
        kvs, kvz = tl.split(tl.reshape(sc, [BLOCK_N, 2, 2]))  # columns (ks, vs) and (kz, vz)
        ks, vs = tl.split(kvs)
        kz, vz = tl.split(kvz)
        ks = ks.to(tl.float32)[:, None]
        kz = kz.to(tl.float32)[:, None]
        vs = tl.where(nm, vs if HALF_PV else vs.to(tl.float32), 0.0)[:, None]
        vz = tl.where(nm, vz.to(tl.float32), 0.0)[:, None]
        kw = tl.load(a32r + off // 4 + (r * KW)[:, None] + ik[None, :], mask=lm)
        vu = tl.load(a16r + (off + VOFF) // 2 + (r * VU)[:, None] + iv[None, :], mask=lm)
        if QS:
            kc = _codes(kw, KB, CT, ASM) - 1024.0
            s = tl.dot(kc, qlt, acc=tl.dot(kc, qt, acc=s0) * lscale) * linv
        else:
            s = tl.dot(_codes(kw, KB, CT, ASM), qt, acc=s0, input_precision=PREC)
        s = tl.where(nm[:, None], s * (ks * qscale) - (kz * qscale) * qsum[None, :], float("-inf"))
        # the reference max: raised on the span's first tile only (every tile when ``exact``), so the other
        # tiles need no cross-warp max and no rescaling; a later score far above it overflows p or p * s_v,
        # which the caller sees (not finite sums) and answers with an exact pass
        if (t == c_begin * TPC) | exact:
            m_new, m_ref, alpha = _raise_max(m_i, tl.max(s, axis=0))
            l_i = l_i * alpha
            lt = lt * alpha[None, :]
            zt = zt * alpha[None, :]
            st = st * alpha[None, :]
            acc = acc * alpha[None, :]
            m_i = m_new
        p = tl.math.exp2(s - m_ref[None, :])
        lt = lt + p
        if QS:
            # p s_v as a float16 high part and the rest times 2^11 (exact scalings of the accumulator)
            pf32 = p * vs.to(tl.float32)
            pv = pf32.to(CT)
            pl = ((pf32 - pv.to(tl.float32)) * 2048.0).to(CT)
            vc = _vcodes(vu, VB, CT, ASM) - 1024.0
            acc = tl.dot(vc, pl, acc=tl.dot(vc, pv, acc=acc) * 2048.0) * (1.0 / 2048.0)
            zt = zt + p * vz
        else:
            if HALF_PV:
                pv = p.to(CT) * vs.to(CT)
            else:
                pv = (p * vs).to(CT)
            # acc rows d get sum_n pv_n (c_n 2^(VB j_d) + 1024): the zero points' sum_n p_n z_n and the
            # rounded pv's sum (for the offset) are kept apart, the place factor comes off at the end (the
            # zero-point sum stays in each branch, before the dot: after it the 2-bit tile is 20 instructions
            # longer, offline)
            zt = zt + p * vz
            st = st + pv.to(tl.float32)
            acc = tl.dot(_vcodes(vu, VB, CT, ASM), pv, acc=acc, input_precision=PREC)
    l_i += tl.sum(lt, axis=0)
    z = tl.sum(zt, axis=0)[None, :]
    sv = tl.sum(st, axis=0)[None, :]
    out = (acc - OFS * sv) * rs - z
    # an overflow (p or p * s_v past float16's range, or with float32 tiles the accumulator's code-unit
    # products or p * z_v) leaves an infinite or NaN sum; a score more than 64 above the reference (l > 2^64)
    # is taken again too, before it overflows a sum here or in the merge; scores after a first tile without
    # any (m_i still -inf: not for the spans the caller makes) were taken against 0. A 0/1 flag
    bad = tl.max(
        (
            ((l_i - l_i) != 0)
            | (l_i > 18446744073709551616.0)
            | (tl.sum(sv - sv, axis=0) != 0)
            | (tl.sum(out - out, axis=0) != 0)
            | ((m_i == float("-inf")) & (l_i != 0))
        ).to(tl.int32),
        axis=0,
    )
    return m_i, l_i, out, bad


@triton.jit
def _store_partial(part_acc, part_ml, prow, rmask, m_i, l_i, acc0, acc1, acc2, acc3, D: tl.constexpr):
    """One partial slot (rows ``prow`` [M]): the 4-part accumulator in natural column order, then (m, l)."""
    i = tl.arange(0, D // 4)
    pa = part_acc + prow[:, None] * D + 4 * i[None, :]
    m = rmask[:, None]
    tl.store(pa + 0, acc0, mask=m)
    tl.store(pa + 1, acc1, mask=m)
    tl.store(pa + 2, acc2, mask=m)
    tl.store(pa + 3, acc3, mask=m)
    _store_ml(part_ml, prow, rmask, m_i, l_i)


@triton.jit
def _store_ml(part_ml, prow, rmask, m_i, l_i):
    """The (m, l) pair of a partial slot (rows ``prow`` [M])."""
    tl.store(part_ml + prow * 2, m_i, mask=rmask)
    tl.store(part_ml + prow * 2 + 1, l_i, mask=rmask)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _pair_index(kb, vb):
    """``4 (log2 kb - 1) + log2 vb - 1`` of int32 bit widths in {2, 4, 8, 16}: the bit of the pair (kb, vb)
    in ``FAST_MASK`` and in the row's ``present`` set (the host's :func:`_pair_bit`)."""
    return 4 * ((kb > 2).to(tl.int32) + (kb > 4) + (kb > 8)) + (vb > 2).to(tl.int32) + (vb > 4) + (vb > 8)


@triton.jit
def _body_part(
    b,
    h,
    split,
    q_ptr,
    a16,
    a32,
    af,
    ah,
    table,
    ks_ptr,
    part_acc,
    part_ml,
    ROW_BYTES,
    qk_scale,
    length,
    last_chunk,
    present,
    written,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    N_SINK: tl.constexpr,
    NW: tl.constexpr,
    KB: tl.constexpr,
    VB: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SLOTS: tl.constexpr,
    TB: tl.constexpr,
    MAXC: tl.constexpr,
    HAS_KS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CT: tl.constexpr,
    PREC: tl.constexpr,
    ASM: tl.constexpr,
    STAGES: tl.constexpr,
    HM: tl.constexpr,
):
    """The body chunks at (KB, VB) bits of one (row, KV head), divided evenly over ``NUM_SPLITS`` programs.

    ``present`` holds the pair bits of the row's first ``last_chunk`` chunks (:func:`_attn_kernel` looks at
    the table once for every pair): a pair absent there costs no scan. Otherwise its chunks are found in the
    table (``TB`` >= its ``MAXC`` rows, one vector load): the program takes the part of their span ``[lo,
    hi)`` inside its share of the row's chunks, and chunks of other pairs inside it are masked. The program's
    partial slot (``split``) takes every pair: ``written`` says an earlier pair stored it (its (m, l, acc)
    are folded in); returns whether the slot is written now. A span whose scores overflow the tile loop's
    first-tile reference max is taken again, exactly (:func:`_tile_loop`)."""
    GQ: tl.constexpr = HQ // HKV
    mrow = tl.arange(0, BLOCK_M)
    rmask = mrow < GQ
    heads = h * GQ + mrow
    prow = ((b * HQ + heads) * SLOTS + split).to(tl.int64)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    # the cache writes chunks back to back, so a span of one pair is one region array: one pipelined loop
    # over all its tiles; otherwise (a hand-made table) chunk by chunk, skipping other pairs
    RB: tl.constexpr = NW * HKV * (D * (KB + VB) // 8 + 16 - 8 * HM)
    c0 = 0
    c1 = 0
    lo = 0
    off_lo = 0
    packed = 0
    # a pair absent from the row's chunks (``present``: their pair bits) costs no scan
    if (present >> _pair_index(tl.full([], KB, tl.int32), tl.full([], VB, tl.int32))) & 1:
        idx = tl.arange(0, TB)
        inr = idx < last_chunk
        intab = idx < MAXC
        tk = tl.load(table + idx * 3 + 1, mask=intab, other=0)
        tv = tl.load(table + idx * 3 + 2, mask=intab, other=0)
        to = tl.load(table + idx * 3, mask=intab, other=0)
        match = inr & (tk == KB) & (tv == VB)
        lo = tl.min(tl.where(match, idx, TB), axis=0)
        hi = tl.max(tl.where(match, idx + 1, 0), axis=0)
        # the row's chunks are split evenly over the programs whatever their pairs (a mixed body costs what a
        # uniform one does); this pair takes its span's part of the program's share
        per = (last_chunk + NUM_SPLITS - 1) // NUM_SPLITS
        c0 = tl.maximum(lo, split * per)
        c1 = tl.minimum(hi, (split + 1) * per)
        off_lo = tl.sum(tl.where(idx == lo, to, 0), axis=0)
        span = (idx >= lo) & (idx < hi)
        bad = span & ((match == 0) | (to != off_lo + (idx - lo) * RB))
        packed = (tl.max(bad.to(tl.int32), axis=0) == 0).to(tl.int32)
    if c0 < c1:
        acc = tl.zeros([D, BLOCK_M], tl.float32)
        row0 = b.to(tl.int64) * ROW_BYTES
        c = c0
        exact = 0
        while c < c1:
            if packed:
                c_next = c1
                off = off_lo + (c - lo) * RB
                mine = True
            else:
                c_next = c + 1
                off = tl.load(table + c * 3)
                mine = (tl.load(table + c * 3 + 1) == KB) & (tl.load(table + c * 3 + 2) == VB)
            if mine:
                m_n, l_n, acc_n, bad = _tile_loop(
                    q_ptr, b * HQ + heads, rmask, ks_ptr, qk_scale, m_i, l_i, acc,
                    a16 + row0 // 2, a32 + row0 // 4, af + row0 // 4, ah + row0 // 2, off, c, c_next, N_SINK,
                    length, h, exact, KB, VB, NW, HKV, D, HAS_KS, BLOCK_N, CT, PREC, ASM,
                    STAGES if STAGES > 0 else (3 if KB + VB <= 4 else 2), HM,
                )  # fmt: skip
                if (bad != 0) & (exact == 0):
                    # a score far above the span's first tile: the span again, with the exact running max
                    c_next = c
                    exact = 1
                else:
                    m_i = m_n
                    l_i = l_n
                    acc = acc_n
                    exact = 0
            c = c_next
        # the (transposed) accumulator's rows are in _vperm_dims order of the value bits
        dv = _vperm_dims(VB, D)
        pa = part_acc + prow[None, :] * D + dv[:, None]
        if written:
            # an earlier pair of this program wrote the slot (the barrier between pairs made it visible to
            # every thread of the program): fold it in, so a program has one slot whatever its pairs
            m_o = tl.load(part_ml + prow * 2, mask=rmask, other=float("-inf"))
            l_o = tl.load(part_ml + prow * 2 + 1, mask=rmask, other=0.0)
            acc_o = tl.load(pa, mask=rmask[None, :], other=0.0)
            m_new, m_safe, a_o = _raise_max(m_o, m_i)
            a_i = tl.math.exp2(m_i - m_safe)
            acc = acc_o * a_o[None, :] + acc * a_i[None, :]
            l_i = l_o * a_o + l_i * a_i
            m_i = m_new
        tl.store(pa, acc, mask=rmask[None, :])
        _store_ml(part_ml, prow, rmask, m_i, l_i)
        written = 1
    return written


@triton.jit
def _edge_part(
    b,
    h,
    split,
    q_ptr,
    a8,
    a16,
    a32,
    af,
    ah,
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
    SLOT0: tl.constexpr,
    SLOTS: tl.constexpr,
    RUNB: tl.constexpr,
    WPER: tl.constexpr,
    FAST_MASK: tl.constexpr,
    HAS_KS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
    HM: tl.constexpr,
):
    """Everything :func:`_body_part` leaves: the sink, the window and body chunks whose bit pair is
    not in ``FAST_MASK`` (16-bit chunks, pairs outside the layout's schedule, several groups per head), with
    per-element dequantization at run-time bits. The segments (0 = sink, 1..n_chunks) are split evenly; a
    program picks its own from one vector load of the table. The window is cut into slices of ``WPER``
    tokens, one per program."""
    GQ: tl.constexpr = HQ // HKV
    mrow = tl.arange(0, BLOCK_M)
    rmask = mrow < GQ
    heads = h * GQ + mrow
    row0 = b.to(tl.int64) * ROW_BYTES
    a8r = a8 + row0
    a16r = a16 + row0 // 2
    a32r = a32 + row0 // 4
    afr = af + row0 // 4
    ahr = ah + row0 // 2
    w_begin = split * WPER
    # a window slice of one tile (the common launch) is loaded first, with the queries: neither address waits
    # on a load, so the program's loads make one round trip instead of a chain (state and length, the
    # table, the queries, the window); the row's length masks the tile's tokens afterwards
    ONE_TILE: tl.constexpr = WPER == BLOCK_N
    if ONE_TILE:
        # (the whole slice: the row's length is not known yet)
        wtile = load_tile(
            a8r, a16r, a32r, afr, ahr, WIN_OFF, NW, WB, WB, w_begin, NW, h, HKV, D, GS, G, BLOCK_N, HM
        )
        q0, q1, q2, q3 = _load_q4(q_ptr, b * HQ + heads, rmask, ks_ptr, h, qk_scale, D, HAS_KS)
    n_chunks = tl.load(state + 2)
    length = tl.load(lengths + b)
    n_seg = n_chunks + 2
    per = (n_seg + NUM_SPLITS - 1) // NUM_SPLITS
    s_begin = split * per
    s_end = tl.minimum(s_begin + per, n_seg)
    last_chunk = tl.minimum((tl.maximum(length - N_SINK, 0) + NW - 1) // NW, n_chunks)
    seg = s_begin + tl.arange(0, RUNB)
    chunk = (seg >= 1) & (seg <= last_chunk) & (seg < s_end)
    kb = tl.load(table + (seg - 1) * 3 + 1, mask=chunk, other=2)
    vb = tl.load(table + (seg - 1) * 3 + 2, mask=chunk, other=2)
    fast = ((tl.full([RUNB], FAST_MASK, tl.int32) >> _pair_index(kb, vb)) & 1) == 1
    todo = (seg < s_end) & ((seg == 0) | (chunk & (fast == 0)))
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, D // 4], tl.float32)
    acc1 = tl.zeros([BLOCK_M, D // 4], tl.float32)
    acc2 = tl.zeros([BLOCK_M, D // 4], tl.float32)
    acc3 = tl.zeros([BLOCK_M, D // 4], tl.float32)
    BIG: tl.constexpr = 1 << 30
    s = tl.min(tl.where(todo, seg, BIG), axis=0)
    # the window, in slices of WPER tokens over the programs (one program would take its tiles in turn)
    w_end = tl.minimum(w_begin + WPER, tl.minimum(tl.maximum(length - N_SINK - n_chunks * NW, 0), NW))
    if not ONE_TILE:
        # the queries, read once for both (not at all by a program with nothing to do)
        busy = (s < BIG) | (w_begin < w_end)
        qmask = rmask & (busy.to(tl.int32) + 0 * mrow == 1)  # broadcast first (the interpreter needs it)
        q0, q1, q2, q3 = _load_q4(q_ptr, b * HQ + heads, qmask, ks_ptr, h, qk_scale, D, HAS_KS)
    q0 = q0.to(DT)
    q1 = q1.to(DT)
    q2 = q2.to(DT)
    q3 = q3.to(DT)
    while s < BIG:
        off, cap, skb, svb, n_valid = segment_of(s, n_chunks, length, table, N_SINK, NW, SB, WB, WIN_OFF)
        m_i, l_i, acc0, acc1, acc2, acc3 = attend_segment(
            q0, q1, q2, q3, m_i, l_i, acc0, acc1, acc2, acc3,
            a8r, a16r, a32r, afr, ahr, off, cap, skb, svb, 0, n_valid, h,
            HKV, D, GS, G, BLOCK_N, DT, PREC, HM,
        )  # fmt: skip
        s = tl.min(tl.where(todo & (seg > s), seg, BIG), axis=0)
    if w_begin < w_end:
        if ONE_TILE:
            m_i, l_i, acc0, acc1, acc2, acc3 = attend_tile(
                q0, q1, q2, q3, m_i, l_i, acc0, acc1, acc2, acc3, wtile,
                w_begin + tl.arange(0, BLOCK_N) < w_end, DT, PREC,
            )  # fmt: skip
        else:
            m_i, l_i, acc0, acc1, acc2, acc3 = attend_segment(
                q0, q1, q2, q3, m_i, l_i, acc0, acc1, acc2, acc3,
                a8r, a16r, a32r, afr, ahr, WIN_OFF, NW, WB, WB, w_begin, w_end, h,
                HKV, D, GS, G, BLOCK_N, DT, PREC, HM,
            )  # fmt: skip
    prow = ((b * HQ + heads) * SLOTS + SLOT0 + split).to(tl.int64)
    _store_partial(part_acc, part_ml, prow, rmask, m_i, l_i, acc0, acc1, acc2, acc3, D)


@triton.jit
def _attn_kernel(
    q_ptr,
    a8,
    a16,
    a32,
    af,
    ah,
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
    EDGE_SPLITS: tl.constexpr,
    SLOTS: tl.constexpr,
    TB: tl.constexpr,
    MAXC: tl.constexpr,
    RUNB: tl.constexpr,
    WPER: tl.constexpr,
    PAIRS: tl.constexpr,
    NP: tl.constexpr,
    FAST_MASK: tl.constexpr,
    HAS_KS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EBLOCK_N: tl.constexpr,
    CT: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
    ASM: tl.constexpr,
    EDGE_FIRST: tl.constexpr,
    BODY_STAGES: tl.constexpr,
    HM: tl.constexpr,
):
    """Every partial of a step in one launch (grid ``(B, Hkv, NUM_SPLITS + EDGE_SPLITS)``): ``NUM_SPLITS``
    programs of a (row, KV head) share the body chunks evenly and take each pair of ``PAIRS`` (4 bits per
    pair, ``log2(bits) - 1`` of the keys then of the values) in turn with :func:`_body_part`, so a pair with
    no chunks costs a table scan, not programs or a launch; the other ``EDGE_SPLITS`` take the sink, the
    window and every chunk the pairs leave with :func:`_edge_part`. With EDGE_FIRST the edge programs come
    first in launch order (they are short: run beside the body's first wave, not after its last).
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    z = tl.program_id(2)
    if EDGE_FIRST:
        is_edge = z < EDGE_SPLITS
        ez = z
        z = z - EDGE_SPLITS
    else:
        is_edge = z >= NUM_SPLITS
        ez = z - NUM_SPLITS
    if is_edge:
        _edge_part(
            b, h, ez, q_ptr, a8, a16, a32, af, ah, table, state, lengths, ks_ptr, part_acc, part_ml,
            ROW_BYTES, qk_scale, HQ, HKV, D, GS, G, N_SINK, NW, SB, WB, WIN_OFF, EDGE_SPLITS,
            NUM_SPLITS if NP > 0 else 0,
            SLOTS, RUNB, WPER, FAST_MASK, HAS_KS, BLOCK_M, EBLOCK_N, DT, PREC, HM,
        )  # fmt: skip
    else:
        # one look at the row before any pair: its length, its chunks and the set of their bit pairs, all
        # loaded at once (the whole table, not just the row's chunks, so no load waits for another)
        length = tl.load(lengths + b)
        last_chunk = tl.minimum((tl.maximum(length - N_SINK, 0) + NW - 1) // NW, tl.load(state + 2))
        idx = tl.arange(0, TB)
        tk = tl.load(table + idx * 3 + 1, mask=idx < MAXC, other=0)
        tv = tl.load(table + idx * 3 + 2, mask=idx < MAXC, other=0)
        present = tl.reduce(tl.where(idx < last_chunk, 1 << _pair_index(tk, tv), 0), 0, _bit_or)
        written = 0
        for k in tl.static_range(NP):
            written = _body_part(
                b, h, z, q_ptr, a16, a32, af, ah, table, ks_ptr, part_acc, part_ml, ROW_BYTES, qk_scale,
                length, last_chunk, present, written, HQ, HKV, D, N_SINK, NW,
                2 << ((PAIRS >> (4 * k + 2)) & 3), 2 << ((PAIRS >> (4 * k)) & 3), NUM_SPLITS, SLOTS, TB, MAXC,
                HAS_KS, BLOCK_M, BLOCK_N, CT, PREC, ASM, BODY_STAGES, HM,
            )  # fmt: skip
            # the next pair's pipeline reuses this one's shared memory (and reads the slot this one wrote)
            tl.debug_barrier()
        if written == 0:
            # nothing here: the merge skips slots with l == 0 without reading their accumulators
            GQ: tl.constexpr = HQ // HKV
            mrow = tl.arange(0, BLOCK_M)
            prow = ((b * HQ + h * GQ + mrow) * SLOTS + z).to(tl.int64)
            _store_ml(part_ml, prow, mrow < GQ, tl.full([BLOCK_M], float("-inf"), tl.float32),
                      tl.zeros([BLOCK_M], tl.float32))  # fmt: skip


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
    BLOCK_D: tl.constexpr,
):
    """One (row, query head, ``BLOCK_D`` output dims) per program: the partials' log-sum-exp merge with the
    step's own new tokens (their scores need every dim; only ``BLOCK_D`` of their values are read)."""
    b = tl.program_id(0)
    hq = tl.program_id(1)
    od = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    h = hq // (HQ // HKV)
    d = tl.arange(0, D)
    base = (b * HQ + hq) * NUM_SPLITS
    q = tl.load(q_ptr + (b * HQ + hq) * D + d).to(tl.float32) * qk_scale
    kv_row = (b * HKV + h).to(tl.int64) * T
    # one pass over the partials in blocks of SPLIT_P2 slots (many slots at batch 1 would not fit registers),
    # then over the new tokens in blocks of BLOCK_T, rescaling the running sums when the max grows. The
    # first block of each is loaded before either is used (one memory round trip, not one per loop); a
    # slot with nothing in it stored only (m, l) = (-inf, 0), and its accumulator is not read
    ls, ms, acc = _merge_block_loads(part_ml, part_acc, base, 0, od, NUM_SPLITS, SPLIT_P2, D)
    kn, vn, tm = _new_token_loads(k_new, v_new, kv_row, 0, T, d, od, BLOCK_T)
    mx, num, den = _merge_block(
        tl.full([], float("-inf"), tl.float32), tl.zeros([BLOCK_D], tl.float32), tl.zeros([], tl.float32),
        ls, ms, acc, 0, NUM_SPLITS, SPLIT_P2,
    )  # fmt: skip
    for s0 in range(SPLIT_P2, NUM_SPLITS, SPLIT_P2):
        ls, ms, acc = _merge_block_loads(part_ml, part_acc, base, s0, od, NUM_SPLITS, SPLIT_P2, D)
        mx, num, den = _merge_block(mx, num, den, ls, ms, acc, s0, NUM_SPLITS, SPLIT_P2)
    mx, num, den = _new_token_block(mx, num, den, kn, vn, tm, q)
    for t0 in range(BLOCK_T, T, BLOCK_T):
        kn, vn, tm = _new_token_loads(k_new, v_new, kv_row, t0, T, d, od, BLOCK_T)
        mx, num, den = _new_token_block(mx, num, den, kn, vn, tm, q)
    res = num / tl.where(den == 0.0, 1.0, den)
    tl.store(out + (b * HQ + hq) * D + od, res.to(out.dtype.element_ty))


@triton.jit
def _merge_block_loads(part_ml, part_acc, base, s0, od, NUM_SPLITS: tl.constexpr, SPLIT_P2: tl.constexpr,
                       D: tl.constexpr):  # fmt: skip
    """(l, m) ``[SPLIT_P2]`` and accumulators ``[SPLIT_P2, BLOCK_D]`` (dims ``od``) of slots ``s0..``, every
    load issued at once (an accumulator load masked by its slot's l would wait for l)."""
    sp = s0 + tl.arange(0, SPLIT_P2)
    smask = sp < NUM_SPLITS
    ls = tl.load(part_ml + (base + sp) * 2 + 1, mask=smask, other=0.0)
    ms = tl.load(part_ml + (base + sp) * 2, mask=smask, other=float("-inf"))
    acc = tl.load(part_acc + (base + sp)[:, None] * D + od[None, :], mask=smask[:, None], other=0.0)
    return ls, ms, acc


@triton.jit
def _merge_block(mx, num, den, ls, ms, acc, s0, NUM_SPLITS: tl.constexpr, SPLIT_P2: tl.constexpr):
    """The running (max, weighted sum ``[BLOCK_D]``, denominator) with one block of slots folded in. An empty
    slot's accumulator may be any bits, so it is selected away, not multiplied by 0."""
    used = (s0 + tl.arange(0, SPLIT_P2) < NUM_SPLITS) & (ls > 0.0)
    ms = tl.where(used, ms, float("-inf"))
    acc = tl.where(used[:, None], acc, 0.0)
    m_new, m_safe, alpha = _raise_max(mx, tl.max(ms, axis=0))
    w = tl.where(used, tl.math.exp2(ms - m_safe), 0.0)
    return m_new, num * alpha + tl.sum(acc * w[:, None], axis=0), den * alpha + tl.sum(ls * w, axis=0)


@triton.jit
def _new_token_loads(k_new, v_new, kv_row, t0, T, d, od, BLOCK_T: tl.constexpr):
    """Keys ``[BLOCK_T, D]`` and values ``[BLOCK_T, BLOCK_D]`` (dims ``od``) of new tokens ``t0..``, float32,
    with their mask."""
    t = t0 + tl.arange(0, BLOCK_T)
    tm = t < T
    kn = tl.load(k_new + (kv_row + t)[:, None] * d.shape[0] + d[None, :], mask=tm[:, None], other=0.0)
    vn = tl.load(v_new + (kv_row + t)[:, None] * d.shape[0] + od[None, :], mask=tm[:, None], other=0.0)
    return kn.to(tl.float32), vn.to(tl.float32), tm


@triton.jit
def _new_token_block(mx, num, den, kn, vn, tm, q):
    """The running (max, weighted sum, denominator) with one block of new tokens folded in (their scores
    against the scaled query ``q`` ``[D]``)."""
    sc = tl.where(tm, tl.sum(kn * q[None, :], axis=1), float("-inf"))
    m_new, m_safe, alpha = _raise_max(mx, tl.max(sc, axis=0))
    p = tl.where(tm, tl.math.exp2(sc - m_safe), 0.0)
    return m_new, num * alpha + tl.sum(vn * p[:, None], axis=0), den * alpha + tl.sum(p, axis=0)


_DT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def default_num_splits(batch: int, num_kv_heads: int, max_segments: int, sm_count: int = 132) -> int:
    """Splits so that about three body programs run per multiprocessor (the launch caps registers at 168 per
    thread, so three fit), each taking at least four chunks, from static shapes only (measured on an H200
    at 32k tokens, 4 bits: B8 12 splits 68.5 us against 88.7 for 8; at B1 the four-chunk floor gives 64
    splits, 19.4 us, where 99 took 19.3 and 66 took 17.2-17.7)."""
    want = max(1, (3 * sm_count) // max(batch * num_kv_heads, 1))
    return int(max(1, min(want, max_segments // 4, 128)))


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


def _pair_bit(kb: int, vb: int) -> int:
    return 1 << (4 * (kb.bit_length() - 2) + vb.bit_length() - 2)


def fast_pairs(lay: ArenaLayout) -> list[tuple[int, int]]:
    """Bit pairs that :func:`_body_part` takes: every pair of the layout's ERS schedule (from
    ``init_bits`` down to the plan's bits, so static: one compiled set serves every step) with both bits
    <= 8 (the affine form). 16-bit chunks, other pairs, and layouts with several groups per head go through
    :func:`_edge_part`."""
    if lay.groups != 1:
        return []
    pairs, kv = [], (lay.init_bits, lay.init_bits)
    while kv is not None:
        if max(kv) <= 8:
            pairs.append(kv)
        kv = next_body_bits(*kv, (lay.key_bits, lay.value_bits))
    return pairs


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
    *,
    pairs: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Triton launcher with :func:`pmkvq_compile.kernels.reference.decode_attention`'s signature.

    Launches :func:`_attn_kernel` with the pairs of :func:`fast_pairs` (``pairs`` overrides them: tests cover
    pairs outside a layout's schedule, and ``[]`` sends everything through :func:`_edge_part`), then
    :func:`_merge_kernel`, each over a grid fixed by static shapes."""
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
    # tuning knobs (benchmarks sweep them): "BLOCK_N,num_warps,num_stages[,maxnreg[,edge_first]]" of the
    # attention launch (maxnreg 0: no cap; num_stages given here holds for the body loops too, 0 keeps
    # each loop's own); 128-token tiles by default (measured on an H200 at B8 x 32k, 4 bits; RESULTS.md
    # has the sweep). By default the body loops pipeline 3 tiles deep at 2-bit pairs and 2 deep at wider
    # ones (H100, B8 x 32k, kernel-wide 2 vs 3 stages in one run: 4 bits 69.4 vs 72.0 us, 2 bits 57.3 vs
    # 49.0 us; RESULTS.md)
    cfg = [int(x) for x in os.environ.get("PMKVQ_DECODE_CFG", "").split(",") if x]
    block_n, warps, stages = cfg[:3] if cfg else (128 if lay.n_window >= 128 else 64, 4, 3)
    body_stages = stages if cfg else 0  # 0: each body loop's own depth (3 at 2-bit pairs, else 2)
    stages = stages or 3
    if block_n < 64 or block_n & (block_n - 1):
        # 16-token tiles gave wrong results on the GPU (triton 3.6) where the interpreter agreed
        raise ValueError(f"PMKVQ_DECODE_CFG: BLOCK_N must be a power of two >= 64, got {block_n}")
    # registers per thread: capped at 168 on the GPU so that three programs share a multiprocessor
    nreg = cfg[3] if len(cfg) > 3 else (168 if q.is_cuda else 0)
    extra = {"maxnreg": nreg} if nreg > 0 else {}
    edge_first = len(cfg) > 4 and cfg[4] != 0  # measured: edge programs last is faster (69.8 vs 73.6 us)
    if pairs is None:
        pairs = fast_pairs(lay)
    # the edge work (sink, window slices, chunks no pair takes) gets one program per 16-token window slice
    # (at least 8, at most num_splits), or every split when no pair takes the body
    edge_splits = min(num_splits, max(8, -(-lay.n_window // 16))) if pairs else num_splits
    if pairs and os.environ.get("PMKVQ_DECODE_EDGE"):  # a sweep knob: edge programs per (row, KV head)
        edge_splits = int(os.environ["PMKVQ_DECODE_EDGE"])
        if not 1 <= edge_splits <= num_splits:
            raise ValueError(f"PMKVQ_DECODE_EDGE must be in 1..num_splits={num_splits}, got {edge_splits}")
    # one partial slot per program: body programs take every pair into theirs
    slots = (num_splits if pairs else 0) + edge_splits
    part_acc = torch.empty(b, hq, slots, d, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(b, hq, slots, 2, dtype=torch.float32, device=q.device)
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    views = (q, arena, arena.view(torch.int16), arena.view(torch.int32), arena.view(torch.float32),
             arena.view(torch.float16), table, state, lengths, ks, part_acc, part_ml,
             arena.shape[1], qk_scale)  # fmt: skip
    block_m = max(8, triton.next_power_of_2(gq))
    code = sum(
        ((kb.bit_length() - 2) * 4 + vb.bit_length() - 2) << (4 * k) for k, (kb, vb) in enumerate(pairs)
    )
    _attn_kernel[(b, hkv, num_splits + edge_splits)](
        *views, HQ=hq, HKV=hkv, D=d, GS=lay.group_size, G=lay.groups, N_SINK=lay.n_sink, NW=lay.n_window,
        SB=lay.sink_bits, WB=lay.window_bits, WIN_OFF=lay.window_offset, NUM_SPLITS=num_splits,
        EDGE_SPLITS=edge_splits, SLOTS=slots, TB=max(16, triton.next_power_of_2(lay.max_chunks)), MAXC=lay.max_chunks,
        RUNB=max(16, triton.next_power_of_2(-(-(lay.max_chunks + 2) // edge_splits))),
        WPER=16 * -(-lay.n_window // (16 * edge_splits)), PAIRS=code, NP=len(pairs),
        FAST_MASK=sum(_pair_bit(*p) for p in pairs), HAS_KS=has_ks, BLOCK_M=block_m, BLOCK_N=block_n,
        EBLOCK_N=16, CT=tl.float16 if native else tl.float32, DT=dt, PREC=prec, ASM=not interp, EDGE_FIRST=edge_first,
        BODY_STAGES=body_stages, HM=lay.scale_bytes == 2, num_warps=warps,
        num_stages=stages, **extra,
    )  # fmt: skip
    block_d, merge_warps = _merge_cfg(d)
    _merge_kernel[(b, hq, d // block_d)](
        q, k_new, v_new, part_acc, part_ml, out, t, qk_scale,
        HQ=hq, HKV=hkv, D=d, NUM_SPLITS=slots, SPLIT_P2=min(256, triton.next_power_of_2(slots)),
        BLOCK_T=min(16, triton.next_power_of_2(max(t, 1))), BLOCK_D=block_d, num_warps=merge_warps,
    )  # fmt: skip
    return out


def _merge_cfg(d: int) -> tuple[int, int]:
    """Output dims per merge program and its warps: ``PMKVQ_MERGE_CFG="block_d,num_warps"`` (a sweep knob;
    block_d a power of two in 16..head_dim, warps 1, 2, 4 or 8), else (32, 4)."""
    raw = os.environ.get("PMKVQ_MERGE_CFG", "")
    if not raw:
        return min(32, d), 4
    parts = raw.split(",")
    ok = len(parts) == 2 and all(x.strip().isdigit() for x in parts)
    block_d, warps = (int(x) for x in parts) if ok else (0, 0)
    if not (16 <= block_d <= d and block_d & (block_d - 1) == 0 and warps in (1, 2, 4, 8)):
        raise ValueError(
            f"PMKVQ_MERGE_CFG must be 'block_d,num_warps' with block_d a power of two in 16..{d} and "
            f"num_warps 1, 2, 4 or 8, got {raw!r}"
        )
    return block_d, warps


def sm_scale_default(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
