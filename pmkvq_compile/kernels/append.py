"""Quantize-and-append of new K/V tokens into the packed arena, with the progressive ERS shrink, on device.

Four launches, in stream order, none of which needs the host to read the state:

1. ``_plan_kernel`` (one program): from ``state`` and ``T`` decide sink/window/flush counts and the body's
   new bits (the cache's ERS schedule), write them to a small int32 plan, update ``state`` and ``table``.
2. ``_shrink_kernel`` (a no-op unless the body's bits drop): ERS every body chunk in place and compact the
   chunks. New offsets never pass old ones; the chunks move in waves (the first one or two alone, in order,
   K codes then V codes then meta with a barrier between each block's loads and stores; later waves as
   many chunks at once as land in space already read), shared by several programs per batch row.
3. ``_flush_kernel``: full window chunks (old window tokens + new tokens) ERS'd from window bits to the
   body's bits into new body chunks.
4. ``_tail_kernel``: new tokens that land in the sink (sink bits) or in the window (window bits).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import (
    ers4,
    ers_codes4,
    ers_scale,
    load_codes4,
    load_meta,
    meta_half,
    next_bits,
    quantize4,
    region_meta_byte,
    store_codes4,
    store_meta,
    token_meta_bytes,
)
from .layout import ArenaLayout, check_layout_tensors

__all__ = ["append", "requantize_body_launch"]

PLAN_SIZE = 16
_PLAN_SIZE = tl.constexpr(PLAN_SIZE)  # the same, readable inside @triton.jit functions
# plan fields
_VALID, _TO_SINK, _N_FLUSH, _NT, _WL, _NC, _OKB, _OVB, _NKB, _NVB, _SHRINK = range(11)


@triton.jit
def _chunk_bytes(
    kb, vb, NW: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, G: tl.constexpr, HM: tl.constexpr
):
    """Bytes of a body chunk at run-time bits ``(kb, vb)`` (layout.ArenaLayout.chunk_bytes)."""
    return NW * HKV * (D * (kb + vb) // 8 + token_meta_bytes(kb, vb, HM, G))


@triton.jit
def _plan_kernel(
    state,
    table,
    plan,
    T,
    NB,
    TARGET_KB,
    TARGET_VB,
    FORCE: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    N_SINK: tl.constexpr,
    NW: tl.constexpr,
    FK: tl.constexpr,
    FV: tl.constexpr,
    BODY_OFF: tl.constexpr,
    BODY_CAP: tl.constexpr,
    C_CAP: tl.constexpr,
    HM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    nt = tl.load(state + 0)
    wl = tl.load(state + 1)
    nc = tl.load(state + 2)
    okb = tl.load(state + 3)
    ovb = tl.load(state + 4)
    to_sink = tl.minimum(tl.maximum(N_SINK - nt, 0), T)
    n_flush = (wl + T - to_sink) // NW
    nc_new = nc + n_flush
    kb = okb
    vb = ovb
    if FORCE:
        # requantize_body: an explicit target, no schedule
        kb = tl.minimum(okb, TARGET_KB)
        vb = tl.minimum(ovb, TARGET_VB)
        overflow = kb < 0
    else:
        for _ in tl.static_range(7):
            need = nc_new.to(tl.int64) * _chunk_bytes(kb, vb, NW, HKV, D, G, HM) > BODY_CAP
            nkb, nvb, can = next_bits(kb, vb, FK, FV)
            kb = tl.where(need & can, nkb, kb)
            vb = tl.where(need & can, nvb, vb)
        overflow = nc_new.to(tl.int64) * _chunk_bytes(kb, vb, NW, HKV, D, G, HM) > BODY_CAP
    vi = tl.where(overflow, 0, 1)
    valid = vi != 0
    shrink = tl.where(valid & ((kb != okb) | (vb != ovb)) & (nc > 0), 1, 0)
    tl.store(plan + 0, vi)
    tl.store(plan + 1, to_sink)
    tl.store(plan + 2, n_flush)
    tl.store(plan + 3, nt)
    tl.store(plan + 4, wl)
    tl.store(plan + 5, nc)
    tl.store(plan + 6, okb)
    tl.store(plan + 7, ovb)
    tl.store(plan + 8, kb)
    tl.store(plan + 9, vb)
    tl.store(plan + 10, shrink)
    tl.store(state + 0, nt + T, mask=valid)
    tl.store(state + 1, wl + T - to_sink - n_flush * NW, mask=valid)
    tl.store(state + 2, nc_new, mask=valid)
    tl.store(state + 3, kb, mask=valid)
    tl.store(state + 4, vb, mask=valid)
    tl.store(state + 5, 1, mask=vi == 0)
    cb = _chunk_bytes(kb, vb, NW, HKV, D, G, HM)
    for i0 in range(0, C_CAP, BLOCK):
        idx = i0 + tl.arange(0, BLOCK)
        m = (idx < nc_new) & (idx * 0 + vi != 0)
        tl.store(table + idx * 3, BODY_OFF + idx * cb, mask=m)
        tl.store(table + idx * 3 + 1, kb + idx * 0, mask=m)
        tl.store(table + idx * 3 + 2, vb + idx * 0, mask=m)
    # the shrink's ticket and done counters, two per batch row
    for i0 in range(0, 2 * NB, BLOCK):
        idx = i0 + tl.arange(0, BLOCK)
        tl.store(plan + _PLAN_SIZE + idx, idx * 0, mask=idx < 2 * NB)


@triton.jit
def _shrink_codes(
    a8,
    a16,
    a32,
    row0,
    old_start,
    new_start,
    obits,
    nbits,
    ROWS: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
):
    """Rows ``[0, ROWS)`` of codes at ``obits`` from ``old_start`` to ``nbits`` at ``new_start`` (in order,
    each block of ``R`` rows read whole before it is written)."""
    i = tl.arange(0, D // 4)
    for r0 in range(0, ROWS, R):
        r = r0 + tl.arange(0, R)
        m = r < ROWS
        c0, c1, c2, c3 = load_codes4(
            a8, a16, a32, row0 + old_start + r.to(tl.int64) * (D * obits // 8), i, m, obits
        )
        c0, c1, c2, c3 = ers_codes4(c0, c1, c2, c3, obits, nbits)
        tl.debug_barrier()
        store_codes4(
            a8, a16, a32, row0 + new_start + r.to(tl.int64) * (D * nbits // 8), i, m, nbits, c0, c1, c2, c3
        )
        tl.debug_barrier()


@triton.jit
def _ers_meta(x, part, okb, ovb, nkb, nvb):
    """Meta values ``x`` of parts ``part`` (0 k_scale, 1 k_zero, 2 v_scale, 3 v_zero) after ERS from
    ``(okb, ovb)`` to ``(nkb, nvb)``: the scales grow (:func:`ers_scale`), the zeros stay."""
    x = tl.where(part == 0, ers_scale(x, okb, nkb), x)
    return tl.where(part == 2, ers_scale(x, ovb, nvb), x)


@triton.jit
def _shrink_chunk(
    a8, a16, a32, af, ah, row0, c, okb, ovb, nkb, nvb, ocb, ncb, ohalf, nhalf,
    HKV: tl.constexpr, D: tl.constexpr, G: tl.constexpr, NW: tl.constexpr, BODY_OFF: tl.constexpr,
    HM: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Body chunk ``c`` ERS'd from ``(okb, ovb)`` to ``(nkb, nvb)`` and moved from its old place (chunks of
    ``ocb`` bytes) to its new one (``ncb``) where the two overlap: K codes, then V codes, then meta, in
    order, each block read whole before it is written, so no new byte passes an old one not yet read."""
    oo = BODY_OFF + c * ocb
    no = BODY_OFF + c * ncb
    ROWS: tl.constexpr = HKV * NW
    _shrink_codes(a8, a16, a32, row0, oo, no, okb, nkb, ROWS, D, R)
    vo = oo + ROWS * (D * okb // 8)
    _shrink_codes(a8, a16, a32, row0, vo, no + ROWS * (D * nkb // 8), ovb, nvb, ROWS, D, R)
    # element e moves from old byte om + e * (4 or 2) to new byte nm + e * (4 or 2) <= that: each block is
    # read whole before it is written, so the float32 -> float16 narrowing is in place too
    om = row0 + region_meta_byte(oo, NW, okb, ovb, HKV, D)
    nm = row0 + region_meta_byte(no, NW, nkb, nvb, HKV, D)
    PART: tl.constexpr = ROWS * G
    for e0 in range(0, 4 * PART, BLOCK):
        e = e0 + tl.arange(0, BLOCK)
        m = e < 4 * PART
        x = load_meta(af, ah, om, e, m, ohalf, HM)
        part = e // PART
        x = _ers_meta(x, part, okb, ovb, nkb, nvb)
        tl.debug_barrier()
        store_meta(af, ah, nm, e, x, m, nhalf, HM)
        tl.debug_barrier()


@triton.jit
def _shrink_item(
    a8, a16, a32, af, ah, row0, c, r_begin, okb, ovb, nkb, nvb, ocb, ncb, ohalf, nhalf,
    HKV: tl.constexpr, D: tl.constexpr, G: tl.constexpr, NW: tl.constexpr, BODY_OFF: tl.constexpr,
    HM: tl.constexpr, IR: tl.constexpr,
):  # fmt: skip
    """:func:`_shrink_chunk` for rows ``[r_begin, r_begin + IR)`` of a chunk whose old and new places are
    disjoint (a wave of several chunks): every load (K codes, V codes, the rows' meta) is issued before any
    store, with no barrier, so the item costs one round trip to memory."""
    oo = BODY_OFF + c * ocb
    no = BODY_OFF + c * ncb
    ROWS: tl.constexpr = HKV * NW
    i = tl.arange(0, D // 4)
    r = r_begin + tl.arange(0, IR)
    m = r < ROWS
    r = r.to(tl.int64)
    k0, k1, k2, k3 = load_codes4(a8, a16, a32, row0 + oo + r * (D * okb // 8), i, m, okb)
    vo = oo + ROWS * (D * okb // 8)
    v0, v1, v2, v3 = load_codes4(a8, a16, a32, row0 + vo + r * (D * ovb // 8), i, m, ovb)
    om = row0 + region_meta_byte(oo, NW, okb, ovb, HKV, D)
    nm = row0 + region_meta_byte(no, NW, nkb, nvb, HKV, D)
    SPAN: tl.constexpr = IR * G
    MB: tl.constexpr = triton.next_power_of_2(4 * SPAN)
    k = tl.arange(0, MB)
    part = k // SPAN
    e = part * (ROWS * G) + r_begin * G + k % SPAN
    mm = (k < 4 * SPAN) & (r_begin * G + k % SPAN < ROWS * G)
    x = load_meta(af, ah, om, e, mm, ohalf, HM)
    k0, k1, k2, k3 = ers_codes4(k0, k1, k2, k3, okb, nkb)
    store_codes4(a8, a16, a32, row0 + no + r * (D * nkb // 8), i, m, nkb, k0, k1, k2, k3)
    v0, v1, v2, v3 = ers_codes4(v0, v1, v2, v3, ovb, nvb)
    vn = no + ROWS * (D * nkb // 8)
    store_codes4(a8, a16, a32, row0 + vn + r * (D * nvb // 8), i, m, nvb, v0, v1, v2, v3)
    x = _ers_meta(x, part, okb, ovb, nkb, nvb)
    store_meta(af, ah, nm, e, x, mm, nhalf, HM)


@triton.jit
def _wave_end(lo, nc, ocb, ncb):
    """The end of the shrink wave that starts at chunk ``lo``, and whether that wave is one chunk moved in
    place (in order). Chunks ``[lo, hi)`` with ``hi * ncb <= lo * ocb`` all land below the old place of chunk
    ``lo``, i.e. in chunks that earlier waves have read, and none lands where another of them is read: they may
    move at once, in any order and split in parts. Where not even chunk ``lo`` fits (it overlaps its own old
    place: the first one or two chunks), the wave is that chunk alone, moved whole by one program in order."""
    hi = (lo * ocb) // ncb
    whole = hi <= lo
    hi = tl.minimum(tl.where(whole, lo + 1, hi), nc)
    return hi, whole


@triton.jit
def _shrink_kernel(
    a8,
    a16,
    a32,
    af,
    ah,
    plan,
    ROW_BYTES,
    HKV: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    NW: tl.constexpr,
    BODY_OFF: tl.constexpr,
    HM: tl.constexpr,
    R: tl.constexpr,
    ITEM_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """ERS of every body chunk of row ``program_id(0)`` in place, shared by the ``program_id(1)`` programs of
    the row in waves (:func:`_wave_end`). A program takes work items by ticket (an atomic counter of the row;
    items in wave order: a whole-chunk item, or ``ITEM_ROWS`` rows of a chunk), waits until every item of the
    earlier waves is done (a second counter), does it and counts it done. A waiting program only waits for
    items that running programs hold, so no launch order is assumed; the interpreter's first program of a row
    simply does them all. The plan kernel zeroes both counters. ``REVERSE`` (a test hook) takes each wave's
    items last first: run in order, as the interpreter does, that is the schedule in which a wave taken too
    wide would overwrite a chunk before it is read."""
    b = tl.program_id(0)
    row0 = b.to(tl.int64) * ROW_BYTES
    shrink = tl.load(plan + 10)
    nc = tl.load(plan + 5)
    okb = tl.load(plan + 6)
    ovb = tl.load(plan + 7)
    nkb = tl.load(plan + 8)
    nvb = tl.load(plan + 9)
    ticket = plan + _PLAN_SIZE + 2 * b
    done = ticket + 1
    if shrink != 0:
        ocb = _chunk_bytes(okb, ovb, NW, HKV, D, G, HM).to(tl.int64)
        ncb = _chunk_bytes(nkb, nvb, NW, HKV, D, G, HM).to(tl.int64)
        ohalf = meta_half(okb, ovb, HM)
        nhalf = meta_half(nkb, nvb, HM)
        ROWS: tl.constexpr = HKV * NW
        PARTS: tl.constexpr = (ROWS + ITEM_ROWS - 1) // ITEM_ROWS
        nch = nc.to(tl.int64)
        t = tl.atomic_add(ticket, 1).to(tl.int64)
        go = t >= 0
        # the wave that holds item t: ``base`` items before it, chunks [lo, hi); a program's tickets only
        # grow, so the search goes on from the previous item's wave
        lo = nch * 0
        base = t * 0
        hi, whole = _wave_end(lo, nch, ocb, ncb)
        n = tl.where(whole, 1, (hi - lo) * PARTS)
        while go:
            while (lo < nch) & (t >= base + n):
                base += n
                lo = hi
                hi, whole = _wave_end(lo, nch, ocb, ncb)
                n = tl.where(whole, 1, (hi - lo) * PARTS)
            go = lo < nch
            if go:
                # poll with plain (volatile) loads, then one acquiring read
                d = tl.load(done, volatile=True)
                while d.to(tl.int64) < base:
                    d = tl.load(done, volatile=True)
                tl.atomic_add(done, 0, sem="acquire")
                k = t - base
                if REVERSE:
                    k = n - 1 - k
                c = lo + k // PARTS
                if whole:
                    _shrink_chunk(
                        a8, a16, a32, af, ah, row0, c, okb, ovb, nkb, nvb, ocb, ncb, ohalf, nhalf,
                        HKV, D, G, NW, BODY_OFF, HM, R, BLOCK,
                    )  # fmt: skip
                else:
                    _shrink_item(
                        a8, a16, a32, af, ah, row0, c, (k % PARTS) * ITEM_ROWS, okb, ovb, nkb, nvb, ocb, ncb,
                        ohalf, nhalf, HKV, D, G, NW, BODY_OFF, HM, ITEM_ROWS,
                    )  # fmt: skip
                tl.debug_barrier()
                tl.atomic_add(done, 1, sem="release")
                t = tl.atomic_add(ticket, 1).to(tl.int64)


@triton.jit
def _load_new4(ptr, ks, b, h, t, mask, T, HKV: tl.constexpr, D: tl.constexpr, HAS_KS: tl.constexpr):
    """New tokens ``t`` [R] of head ``h`` from ``[B, Hkv, T, D]``, float32 4-part (keys divided by the
    key scale and rounded back to the input dtype first, as the cache does)."""
    i = tl.arange(0, D // 4)
    row = ((b * HKV + h) * T).to(tl.int64) + t
    p = ptr + row[:, None] * D + 4 * i[None, :]
    m = mask[:, None]
    x0 = tl.load(p + 0, mask=m, other=0.0)
    x1 = tl.load(p + 1, mask=m, other=0.0)
    x2 = tl.load(p + 2, mask=m, other=0.0)
    x3 = tl.load(p + 3, mask=m, other=0.0)
    if HAS_KS:
        sp = ks + h * (D // 2) + (4 * i) % (D // 2)
        x0 = tl.math.div_rn(x0.to(tl.float32), tl.load(sp + 0)[None, :]).to(x0.dtype)
        x1 = tl.math.div_rn(x1.to(tl.float32), tl.load(sp + 1)[None, :]).to(x1.dtype)
        x2 = tl.math.div_rn(x2.to(tl.float32), tl.load(sp + 2)[None, :]).to(x2.dtype)
        x3 = tl.math.div_rn(x3.to(tl.float32), tl.load(sp + 3)[None, :]).to(x3.dtype)
    return x0.to(tl.float32), x1.to(tl.float32), x2.to(tl.float32), x3.to(tl.float32)


@triton.jit
def _meta_idx(h, n, cap, part, HKV: tl.constexpr, G: tl.constexpr):
    """Elements ``[R, G]`` of meta part ``part`` for rows ``n`` [R] of head ``h`` in a region of ``cap``."""
    g = tl.arange(0, G)
    return part * HKV * cap * G + (h * cap + n).to(tl.int64)[:, None] * G + g[None, :]


@triton.jit
def _put_row_codes(
    a8,
    a16,
    a32,
    af,
    ah,
    row0,
    off,
    cap,
    n,
    h,
    mask,
    kb,
    vb,
    k0,
    k1,
    k2,
    k3,
    ks,
    kz,
    v0,
    v1,
    v2,
    v3,
    vs,
    vz,
    HKV: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    HM: tl.constexpr,
):
    """Store K/V codes and meta of rows ``n`` [R] of head ``h`` in a region (``off``, ``cap``, ``kb``, ``vb``)."""
    i = tl.arange(0, D // 4)
    r = (h * cap + n).to(tl.int64)
    kbase = row0 + off + r * (D * kb // 8)
    vbase = row0 + off + HKV * cap * (D * kb // 8) + r * (D * vb // 8)
    store_codes4(a8, a16, a32, kbase, i, mask, kb, k0, k1, k2, k3)
    store_codes4(a8, a16, a32, vbase, i, mask, vb, v0, v1, v2, v3)
    mb = row0 + region_meta_byte(off, cap, kb, vb, HKV, D)
    half = meta_half(kb, vb, HM)
    m = mask[:, None]
    store_meta(af, ah, mb, _meta_idx(h, n, cap, 0, HKV, G), ks, m, half, HM)
    store_meta(af, ah, mb, _meta_idx(h, n, cap, 1, HKV, G), kz, m, half, HM)
    store_meta(af, ah, mb, _meta_idx(h, n, cap, 2, HKV, G), vs, m, half, HM)
    store_meta(af, ah, mb, _meta_idx(h, n, cap, 3, HKV, G), vz, m, half, HM)


@triton.jit
def _flush_kernel(
    a8,
    a16,
    a32,
    af,
    ah,
    plan,
    key,
    value,
    ks_ptr,
    ROW_BYTES,
    T,
    HKV: tl.constexpr,
    D: tl.constexpr,
    GS: tl.constexpr,
    G: tl.constexpr,
    NW: tl.constexpr,
    WB: tl.constexpr,
    WIN_OFF: tl.constexpr,
    BODY_OFF: tl.constexpr,
    HAS_KS: tl.constexpr,
    HM: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = tl.load(plan + 0)
    to_sink = tl.load(plan + 1)
    n_flush = tl.load(plan + 2)
    wl = tl.load(plan + 4)
    nc = tl.load(plan + 5)
    nkb = tl.load(plan + 8)
    nvb = tl.load(plan + 9)
    row0 = b.to(tl.int64) * ROW_BYTES
    if (valid != 0) & (tl.program_id(2) * BLOCK_T < n_flush * NW):
        mask = p < n_flush * NW
        from_win = p < wl
        i = tl.arange(0, D // 4)
        W: tl.constexpr = GS // 4
        # old window tokens (window bits)
        wm = mask & from_win
        wr = (h * NW + p).to(tl.int64)
        wk0, wk1, wk2, wk3 = load_codes4(a8, a16, a32, row0 + WIN_OFF + wr * (D * WB // 8), i, wm, WB)
        wv0, wv1, wv2, wv3 = load_codes4(
            a8, a16, a32, row0 + WIN_OFF + HKV * NW * (D * WB // 8) + wr * (D * WB // 8), i, wm, WB
        )
        wmb = row0 + region_meta_byte(WIN_OFF, NW, WB, WB, HKV, D)
        whalf = meta_half(WB, WB, HM)
        wm2 = wm[:, None]
        wks = load_meta(af, ah, wmb, _meta_idx(h, p, NW, 0, HKV, G), wm2, whalf, HM)
        wkz = load_meta(af, ah, wmb, _meta_idx(h, p, NW, 1, HKV, G), wm2, whalf, HM)
        wvs = load_meta(af, ah, wmb, _meta_idx(h, p, NW, 2, HKV, G), wm2, whalf, HM)
        wvz = load_meta(af, ah, wmb, _meta_idx(h, p, NW, 3, HKV, G), wm2, whalf, HM)
        # new tokens, quantized at window bits
        nm = mask & (from_win == 0)
        t = to_sink + p - wl
        x0, x1, x2, x3 = _load_new4(key, ks_ptr, b, h, t, nm, T, HKV, D, HAS_KS)
        nk0, nk1, nk2, nk3, nks, nkz = quantize4(x0, x1, x2, x3, WB, BLOCK_T, G, W)
        x0, x1, x2, x3 = _load_new4(value, ks_ptr, b, h, t, nm, T, HKV, D, False)
        nv0, nv1, nv2, nv3, nvs, nvz = quantize4(x0, x1, x2, x3, WB, BLOCK_T, G, W)
        fw = from_win[:, None]
        k0, k1, k2, k3, ksc = ers4(
            tl.where(fw, wk0, nk0),
            tl.where(fw, wk1, nk1),
            tl.where(fw, wk2, nk2),
            tl.where(fw, wk3, nk3),
            tl.where(fw, wks, nks),
            WB,
            nkb,
        )
        v0, v1, v2, v3, vsc = ers4(
            tl.where(fw, wv0, nv0),
            tl.where(fw, wv1, nv1),
            tl.where(fw, wv2, nv2),
            tl.where(fw, wv3, nv3),
            tl.where(fw, wvs, nvs),
            WB,
            nvb,
        )
        kz = tl.where(fw, wkz, nkz)
        vz = tl.where(fw, wvz, nvz)
        cb = _chunk_bytes(nkb, nvb, NW, HKV, D, G, HM)
        chunk = nc + p // NW
        n = p % NW
        off = BODY_OFF + chunk.to(tl.int64) * cb
        # rows of different chunks in one block: store per row (off is a vector)
        r = (h * NW + n).to(tl.int64)
        kbase = row0 + off + r * (D * nkb // 8)
        vbase = row0 + off + HKV * NW * (D * nkb // 8) + r * (D * nvb // 8)
        store_codes4(a8, a16, a32, kbase, i, mask, nkb, k0, k1, k2, k3)
        store_codes4(a8, a16, a32, vbase, i, mask, nvb, v0, v1, v2, v3)
        g = tl.arange(0, G)
        mb = (row0 + region_meta_byte(off, NW, nkb, nvb, HKV, D))[:, None]
        nhalf = meta_half(nkb, nvb, HM)
        PART: tl.constexpr = HKV * NW * G
        idx = r[:, None] * G + g[None, :]
        mm = mask[:, None]
        store_meta(af, ah, mb, idx, ksc, mm, nhalf, HM)
        store_meta(af, ah, mb, idx + PART, kz, mm, nhalf, HM)
        store_meta(af, ah, mb, idx + 2 * PART, vsc, mm, nhalf, HM)
        store_meta(af, ah, mb, idx + 3 * PART, vz, mm, nhalf, HM)


@triton.jit
def _tail_kernel(
    a8,
    a16,
    a32,
    af,
    ah,
    plan,
    key,
    value,
    ks_ptr,
    ROW_BYTES,
    T,
    HKV: tl.constexpr,
    D: tl.constexpr,
    GS: tl.constexpr,
    G: tl.constexpr,
    NW: tl.constexpr,
    N_SINK: tl.constexpr,
    SB: tl.constexpr,
    WB: tl.constexpr,
    WIN_OFF: tl.constexpr,
    HAS_KS: tl.constexpr,
    HM: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = tl.load(plan + 0)
    to_sink = tl.load(plan + 1)
    n_flush = tl.load(plan + 2)
    nt = tl.load(plan + 3)
    wl = tl.load(plan + 4)
    row0 = b.to(tl.int64) * ROW_BYTES
    W: tl.constexpr = GS // 4
    mask = (t < T) & (t * 0 + valid != 0)
    k0, k1, k2, k3 = _load_new4(key, ks_ptr, b, h, t, mask, T, HKV, D, HAS_KS)
    v0, v1, v2, v3 = _load_new4(value, ks_ptr, b, h, t, mask, T, HKV, D, False)
    if N_SINK > 0:
        sm = mask & (t < to_sink)
        kc0, kc1, kc2, kc3, kss, kzz = quantize4(k0, k1, k2, k3, SB, BLOCK_T, G, W)
        vc0, vc1, vc2, vc3, vss, vzz = quantize4(v0, v1, v2, v3, SB, BLOCK_T, G, W)
        _put_row_codes(
            a8,
            a16,
            a32,
            af,
            ah,
            row0,
            0,
            N_SINK,
            nt + t,
            h,
            sm,
            SB,
            SB,
            kc0,
            kc1,
            kc2,
            kc3,
            kss,
            kzz,
            vc0,
            vc1,
            vc2,
            vc3,
            vss,
            vzz,
            HKV,
            D,
            G,
            HM,
        )
    p = wl + t - to_sink
    wm = mask & (t >= to_sink) & (p >= n_flush * NW)
    kc0, kc1, kc2, kc3, kss, kzz = quantize4(k0, k1, k2, k3, WB, BLOCK_T, G, W)
    vc0, vc1, vc2, vc3, vss, vzz = quantize4(v0, v1, v2, v3, WB, BLOCK_T, G, W)
    _put_row_codes(
        a8,
        a16,
        a32,
        af,
        ah,
        row0,
        WIN_OFF,
        NW,
        p - n_flush * NW,
        h,
        wm,
        WB,
        WB,
        kc0,
        kc1,
        kc2,
        kc3,
        kss,
        kzz,
        vc0,
        vc1,
        vc2,
        vc3,
        vss,
        vzz,
        HKV,
        D,
        G,
        HM,
    )


def _views(arena: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The arena as uint8, int16, int32, float32 and float16 (the kernels' pointers)."""
    return (
        arena,
        arena.view(torch.int16),
        arena.view(torch.int32),
        arena.view(torch.float32),
        arena.view(torch.float16),
    )


def _run_plan(state, table, lay: ArenaLayout, t: int, force: tuple[int, int] | None, nb: int) -> torch.Tensor:
    """The step's plan (``PLAN_SIZE`` fields, then the shrink's two counters per batch row, zeroed)."""
    plan = torch.empty(PLAN_SIZE + 2 * nb, dtype=torch.int32, device=state.device)
    _plan_kernel[(1,)](
        state, table, plan, t, nb,
        force[0] if force else 0, force[1] if force else 0, FORCE=force is not None,
        HKV=lay.num_kv_heads, D=lay.head_dim, G=lay.groups, N_SINK=lay.n_sink, NW=lay.n_window,
        FK=lay.key_bits, FV=lay.value_bits, BODY_OFF=lay.body_offset, BODY_CAP=lay.body_capacity,
        C_CAP=lay.max_chunks, HM=lay.scale_bytes == 2, BLOCK=min(triton.next_power_of_2(lay.max_chunks), 1024),
    )  # fmt: skip
    return plan


def _shrink_cfg(device: torch.device, batch: int) -> tuple[int, int, int, int]:
    """``PMKVQ_SHRINK_CFG="R,num_warps[,programs[,item_rows]]"``, a sweep knob: rows of codes per step (each
    step is read whole before it is written), warps per program, programs per batch row and rows per work
    item (:func:`_shrink_kernel`). Defaults: 128 rows, 4 warps, 64-row items and, on CUDA, programs for four
    per SM over the batch (at most 128 per row; 2 elsewhere). Checked before anything is launched."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        progs = max(1, min(128, -(-4 * sms // batch)))
    else:
        progs = 2
    raw = os.environ.get("PMKVQ_SHRINK_CFG", "")
    parts = [x.strip() for x in raw.split(",")] if raw else []
    vals = [int(x) for x in parts] if 2 <= len(parts) <= 4 and all(x.isdigit() for x in parts) else []
    r, warps, progs, item = vals + [128, 4, progs, 64][len(vals) :] if vals or not raw else (0, 0, 0, 0)
    pow2 = all(x >= 1 and x & (x - 1) == 0 for x in (r, item))
    if not pow2 or r < 16 or warps not in (1, 2, 4, 8, 16) or not 1 <= progs <= 1024:
        raise ValueError(
            "PMKVQ_SHRINK_CFG must be 'R,num_warps[,programs[,item_rows]]' with R a power of two >= 16, "
            f"num_warps in 1, 2, 4, 8, 16, programs in 1..1024 and item_rows a power of two, got {raw!r}"
        )
    return r, warps, progs, item


_SHRINK_REVERSE = False  # test hook: each shrink wave's items last first (_shrink_kernel)


def _run_shrink(arena, plan, lay: ArenaLayout, cfg: tuple[int, int, int, int]) -> None:
    a8, a16, a32, af, ah = _views(arena)
    r, warps, progs, item = cfg
    _shrink_kernel[(arena.shape[0], progs)](
        a8, a16, a32, af, ah, plan, arena.shape[1],
        HKV=lay.num_kv_heads, D=lay.head_dim, G=lay.groups, NW=lay.n_window, BODY_OFF=lay.body_offset,
        HM=lay.scale_bytes == 2, R=r, ITEM_ROWS=item, BLOCK=1024, REVERSE=_SHRINK_REVERSE, num_warps=warps,
    )  # fmt: skip


def append(
    arena: torch.Tensor,
    state: torch.Tensor,
    table: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_scale: torch.Tensor | None,
    layout: list[int],
) -> None:
    """Triton launcher with :func:`pmkvq_compile.kernels.reference.append`'s signature and semantics."""
    lay = ArenaLayout.from_list(layout)
    check_layout_tensors(lay, arena, state, table)
    if not lay.triton_supported():
        raise ValueError(f"the Triton kernels need a power-of-two head_dim >= 64, got {lay}")
    b, h, t, d = key.shape
    if value.shape != key.shape or (h, d) != (lay.num_kv_heads, lay.head_dim) or b != arena.shape[0]:
        raise ValueError(
            f"key/value must be [B={arena.shape[0]}, {lay.num_kv_heads}, T, {lay.head_dim}], got "
            f"{tuple(key.shape)} / {tuple(value.shape)}"
        )
    if t == 0:
        return
    key, value = key.contiguous(), value.contiguous()
    has_ks = key_scale is not None
    ks = key_scale.to(device=key.device, dtype=torch.float32).contiguous() if has_ks else key
    cfg = _shrink_cfg(arena.device, arena.shape[0])
    plan = _run_plan(state, table, lay, t, None, arena.shape[0])
    _run_shrink(arena, plan, lay, cfg)
    a8, a16, a32, af, ah = _views(arena)
    block_t = 16
    nblk = triton.cdiv(lay.n_window - 1 + t, block_t)
    common = dict(HKV=h, D=d, GS=lay.group_size, G=lay.groups, NW=lay.n_window, WB=lay.window_bits,
                  WIN_OFF=lay.window_offset, HAS_KS=has_ks, HM=lay.scale_bytes == 2, BLOCK_T=block_t)  # fmt: skip
    _flush_kernel[(b, h, nblk)](a8, a16, a32, af, ah, plan, key, value, ks, arena.shape[1], t,
                                BODY_OFF=lay.body_offset, **common)  # fmt: skip
    _tail_kernel[(b, h, triton.cdiv(t, block_t))](a8, a16, a32, af, ah, plan, key, value, ks, arena.shape[1], t,
                                                  N_SINK=lay.n_sink, SB=lay.sink_bits, **common)  # fmt: skip


def requantize_body_launch(
    arena: torch.Tensor,
    state: torch.Tensor,
    table: torch.Tensor,
    key_bits: int,
    value_bits: int,
    layout: list[int],
) -> None:
    """Triton launcher with :func:`pmkvq_compile.kernels.reference.requantize_body`'s signature."""
    lay = ArenaLayout.from_list(layout)
    check_layout_tensors(lay, arena, state, table)
    if not lay.triton_supported():
        raise ValueError(f"the Triton kernels need a power-of-two head_dim >= 64, got {lay}")
    cfg = _shrink_cfg(arena.device, arena.shape[0])
    plan = _run_plan(state, table, lay, 0, (key_bits, value_bits), arena.shape[0])
    _run_shrink(arena, plan, lay, cfg)
