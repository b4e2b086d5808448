"""@triton.jit helpers shared by the kernels (no launchers here).

Every kernel works on codes in a canonical *4-part* form: for a row of ``D`` codes, part ``j`` (j = 0..3) is
the ``[.., D/4]`` tensor of elements ``4i + j``. Four consecutive codes always fill ``bits / 2`` whole bytes
of the quant.pack layout (one u8 at 2 bits, one u16 at 4, one u32 at 8, two u32 at 16), so loads and stores
are word-wide at every bit-width, with the bit-width a run-time value (body chunks differ).

Pointers into one arena come as four views of the same storage: ``a8`` (uint8), ``a16`` (int16),
``a32`` (int32) and ``af`` (float32); row byte offsets are multiples of 4 wherever 32-bit words are used.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_codes4(a8, a16, a32, base, i, mask, bits):
    """Codes of rows starting at byte ``base`` ``[R]`` (int64), columns ``i`` ``[D/4]``: 4 x int32 ``[R, D/4]``."""
    m = mask[:, None]
    if bits == 2:
        w = tl.load(a8 + base[:, None] + i[None, :], mask=m, other=0).to(tl.int32)
        c0 = w & 3
        c1 = (w >> 2) & 3
        c2 = (w >> 4) & 3
        c3 = (w >> 6) & 3
    elif bits == 4:
        w = tl.load(a16 + base[:, None] // 2 + i[None, :], mask=m, other=0).to(tl.int32)
        c0 = w & 15
        c1 = (w >> 4) & 15
        c2 = (w >> 8) & 15
        c3 = (w >> 12) & 15
    elif bits == 8:
        w = tl.load(a32 + base[:, None] // 4 + i[None, :], mask=m, other=0)
        c0 = w & 255
        c1 = (w >> 8) & 255
        c2 = (w >> 16) & 255
        c3 = (w >> 24) & 255
    else:
        w0 = tl.load(a32 + base[:, None] // 4 + 2 * i[None, :], mask=m, other=0)
        w1 = tl.load(a32 + base[:, None] // 4 + 2 * i[None, :] + 1, mask=m, other=0)
        c0 = w0 & 65535
        c1 = (w0 >> 16) & 65535
        c2 = w1 & 65535
        c3 = (w1 >> 16) & 65535
    return c0, c1, c2, c3


@triton.jit
def store_codes4(a8, a16, a32, base, i, mask, bits, c0, c1, c2, c3):
    """Pack 4-part codes (int32 ``[R, D/4]``) at ``bits`` into rows starting at byte ``base`` ``[R]``."""
    m = mask[:, None]
    if bits == 2:
        w = c0 | (c1 << 2) | (c2 << 4) | (c3 << 6)
        tl.store(a8 + base[:, None] + i[None, :], w.to(tl.uint8), mask=m)
    elif bits == 4:
        w = c0 | (c1 << 4) | (c2 << 8) | (c3 << 12)
        tl.store(a16 + base[:, None] // 2 + i[None, :], w.to(tl.int16), mask=m)
    elif bits == 8:
        w = c0 | (c1 << 8) | (c2 << 16) | (c3 << 24)
        tl.store(a32 + base[:, None] // 4 + i[None, :], w, mask=m)
    else:
        tl.store(a32 + base[:, None] // 4 + 2 * i[None, :], c0 | (c1 << 16), mask=m)
        tl.store(a32 + base[:, None] // 4 + 2 * i[None, :] + 1, c2 | (c3 << 16), mask=m)


@triton.jit
def group_bcast(x, R: tl.constexpr, G: tl.constexpr, W: tl.constexpr):
    """``[R, G]`` -> ``[R, G * W]``: each group's value repeated over its ``W`` columns of a part."""
    return tl.reshape(tl.broadcast_to(x[:, :, None], [R, G, W]), [R, G * W])


@triton.jit
def quantize4(x0, x1, x2, x3, bits, R: tl.constexpr, G: tl.constexpr, W: tl.constexpr):
    """Quantize float32 4-part rows ``[R, D/4]`` (``W = group_size / 4`` columns per group and part).

    Bit-exact with quant.quantize: ``scale = clamp((max - min) / qmax, 1e-5, 1e5)``, ``zero = -min``,
    ``q = clamp(floor((x + zero) / scale + 0.5), 0, qmax)`` with IEEE divisions. Returns 4 x int32 codes and
    float32 ``scale``, ``zero`` ``[R, G]``.
    """
    mx = tl.maximum(
        tl.maximum(tl.reshape(x0, [R, G, W]), tl.reshape(x1, [R, G, W])),
        tl.maximum(tl.reshape(x2, [R, G, W]), tl.reshape(x3, [R, G, W])),
    )
    mn = tl.minimum(
        tl.minimum(tl.reshape(x0, [R, G, W]), tl.reshape(x1, [R, G, W])),
        tl.minimum(tl.reshape(x2, [R, G, W]), tl.reshape(x3, [R, G, W])),
    )
    mx = tl.max(mx, axis=2)
    mn = tl.min(mn, axis=2)
    qmax = tl.zeros_like(mx) + ((1 << bits) - 1)
    scale = tl.math.div_rn(mx - mn, qmax)
    qmax = group_bcast(qmax, R, G, W)
    scale = tl.minimum(tl.maximum(scale, 1e-5), 1e5)
    zero = -mn
    sb = group_bcast(scale, R, G, W)
    zb = group_bcast(zero, R, G, W)
    c0 = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(x0 + zb, sb) + 0.5), 0.0), qmax).to(tl.int32)
    c1 = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(x1 + zb, sb) + 0.5), 0.0), qmax).to(tl.int32)
    c2 = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(x2 + zb, sb) + 0.5), 0.0), qmax).to(tl.int32)
    c3 = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(x3 + zb, sb) + 0.5), 0.0), qmax).to(tl.int32)
    return c0, c1, c2, c3, scale, zero


@triton.jit
def _ers_once(q, c):
    """One ERS level to ``c`` bits of codes ``q`` < ``2^(2c)`` (quant.requantize). Unsigned 32-bit math is
    exact here: the largest case, ``c = 8``, reaches ``65535 * 65281 + 8355968 < 2^32``."""
    mul = (1 << (2 * c)) - (1 << c) + 1
    add = (1 << (3 * c - 1)) - (1 << (2 * c - 1)) + (1 << (c - 1))
    return (
        ((q.to(tl.uint32) * mul.to(tl.uint32) + add.to(tl.uint32)) >> (3 * c).to(tl.uint32)) & ((1 << c) - 1)
    ).to(tl.int32)


@triton.jit
def ers_codes4(c0, c1, c2, c3, bits, target):
    """ERS 4-part codes from ``bits`` down to ``target`` level by level (quant.requantize, repeated): a loop
    of as many levels as the run-time bits need (none when ``bits <= target``)."""
    bits = bits + tl.zeros([], dtype=tl.int32)
    while bits > target:
        c = bits // 2
        c0 = _ers_once(c0, c)
        c1 = _ers_once(c1, c)
        c2 = _ers_once(c2, c)
        c3 = _ers_once(c3, c)
        bits = c
    return c0, c1, c2, c3


@triton.jit
def ers4(c0, c1, c2, c3, scale, bits, target):
    """:func:`ers_codes4` plus the scale: multiplied by ``2^c + 1`` at each level (float32, any shape)."""
    c0, c1, c2, c3 = ers_codes4(c0, c1, c2, c3, bits, target)
    return c0, c1, c2, c3, ers_scale(scale, bits, target)


@triton.jit
def region_meta_byte(off, cap, kb, vb, HKV: tl.constexpr, D: tl.constexpr):
    """Byte offset of a region's meta; part ``p`` (k_scale, k_zero, v_scale, v_zero) of row ``h * cap + n`` is
    element ``p * HKV * cap * G + (h * cap + n) * G`` from there (float32, or float16: :func:`meta_half`)."""
    return off + HKV * cap * (D * (kb + vb) // 8)


@triton.jit
def meta_half(kb, vb, HM: tl.constexpr):
    """Whether a region at ``(kb, vb)`` bits stores float16 meta (a scalar int1 tensor): ``HM`` (the layout's
    ``scale_bytes == 2``) and both widths at most 8 (layout.ArenaLayout.meta_bytes)."""
    z = tl.zeros([], dtype=tl.int32)
    half = ((kb + z) <= 8) & ((vb + z) <= 8)
    if not HM:
        half = z != 0
    return half


@triton.jit
def token_meta_bytes(kb, vb, HM: tl.constexpr, G: tl.constexpr):
    """Meta bytes of one token of one head at run-time bits ``(kb, vb)``: 4 values per group, 4 bytes each or 2
    (:func:`meta_half`)."""
    return tl.where(meta_half(kb, vb, HM), 8 * G, 16 * G)


@triton.jit
def _half_mask(idx, half):
    """The scalar ``half`` broadcast to ``idx``'s shape (the interpreter cannot and a 0-d mask into a load's)."""
    return (tl.zeros_like(idx) + half.to(tl.int32)) != 0


@triton.jit
def load_meta(af, ah, mbyte, idx, mask, half, HM: tl.constexpr):
    """Meta elements ``idx`` (any shape) of a region whose meta starts at arena byte ``mbyte``, as float32:
    read as float16 where ``half`` (only with ``HM``), else as float32. ``af``/``ah``: the arena as float32 /
    float16."""
    if HM:
        hb = _half_mask(idx, half)
        x = tl.load(af + mbyte // 4 + idx, mask=mask & (hb == 0), other=0.0)
        xh = tl.load(ah + mbyte // 2 + idx, mask=mask & hb, other=0.0)
        x = tl.where(hb, xh.to(tl.float32), x)
    else:
        x = tl.load(af + mbyte // 4 + idx, mask=mask, other=0.0)
    return x


@triton.jit
def store_meta(af, ah, mbyte, idx, val, mask, half, HM: tl.constexpr):
    """Store float32 ``val`` as meta elements ``idx`` (see :func:`load_meta`): float16 where ``half``,
    clamped to +-65504 and rounded to nearest even (layout.meta_cast)."""
    if HM:
        hb = _half_mask(idx, half)
        tl.store(af + mbyte // 4 + idx, val, mask=mask & (hb == 0))
        hv = tl.minimum(tl.maximum(val, -65504.0), 65504.0).to(tl.float16)
        tl.store(ah + mbyte // 2 + idx, hv, mask=mask & hb)
    else:
        tl.store(af + mbyte // 4 + idx, val, mask=mask)


@triton.jit
def next_bits(kb, vb, fk, fv):
    """The cache's ERS schedule on the device (see layout.next_body_bits); returns (kb', vb', ok)."""
    ek = kb > 2
    ev = vb > 2
    # ratio kb/fk vs vb/fv compared by cross-multiplication
    k_top = ek & ((ev == 0) | (kb * fv >= vb * fk))
    v_top = ev & ((ek == 0) | (vb * fk >= kb * fv))
    nkb = tl.where(k_top, kb // 2, kb)
    nvb = tl.where(v_top, vb // 2, vb)
    return nkb, nvb, ek | ev


@triton.jit
def ers_scale(scale, bits, target):
    """The scale half of :func:`ers4`: ``scale * (2^c + 1)`` per level from ``bits`` down to ``target``."""
    bits = bits + tl.zeros([], dtype=tl.int32)
    while bits > target:
        c = bits // 2
        scale = scale * ((1 << c) + 1).to(tl.float32)
        bits = c
    return scale


@triton.jit
def _deq_part(c, sc, zr, DT: tl.constexpr):
    return (c.to(tl.float32) * sc - zr).to(DT)


@triton.jit
def load_tile(
    a8r,
    a16r,
    a32r,
    afr,
    ahr,
    off,
    cap,
    kb,
    vb,
    n0,
    n_end,
    h,
    HKV: tl.constexpr,
    D: tl.constexpr,
    GS: tl.constexpr,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HM: tl.constexpr,
):
    """Tokens ``n0 .. n0 + BLOCK_N - 1`` (those below ``n_end`` <= ``cap``) of KV head ``h`` in one region: key
    and value codes as 4 x int32 ``[BLOCK_N, D/4]`` each, then the key scale, key zero, value scale and value
    zero as float32 (``[BLOCK_N, 1]``, or ``[BLOCK_N, D/4]`` per column with several groups). Tokens from
    ``n_end`` on read 0; the caller masks the tokens it does not want in :func:`attend_tile`."""
    i = tl.arange(0, D // 4)
    PART = HKV * cap * G
    mb = region_meta_byte(off, cap, kb, vb, HKV, D)
    half = meta_half(kb, vb, HM)
    n = n0 + tl.arange(0, BLOCK_N)
    nm = n < n_end
    r = h * cap + n
    k0, k1, k2, k3 = load_codes4(a8r, a16r, a32r, off + r * (D * kb // 8), i, nm, kb)
    vstart = off + HKV * cap * (D * kb // 8)
    v0, v1, v2, v3 = load_codes4(a8r, a16r, a32r, vstart + r * (D * vb // 8), i, nm, vb)
    if G == 1:
        ks = load_meta(afr, ahr, mb, r, nm, half, HM)[:, None]
        kz = load_meta(afr, ahr, mb, PART + r, nm, half, HM)[:, None]
        vs = load_meta(afr, ahr, mb, 2 * PART + r, nm, half, HM)[:, None]
        vz = load_meta(afr, ahr, mb, 3 * PART + r, nm, half, HM)[:, None]
    else:
        gidx = r[:, None] * G + ((4 * i) // GS)[None, :]
        ks = load_meta(afr, ahr, mb, gidx, nm[:, None], half, HM)
        kz = load_meta(afr, ahr, mb, PART + gidx, nm[:, None], half, HM)
        vs = load_meta(afr, ahr, mb, 2 * PART + gidx, nm[:, None], half, HM)
        vz = load_meta(afr, ahr, mb, 3 * PART + gidx, nm[:, None], half, HM)
    return k0, k1, k2, k3, v0, v1, v2, v3, ks, kz, vs, vz


@triton.jit
def attend_tile(
    q0,
    q1,
    q2,
    q3,
    m_i,
    l_i,
    acc0,
    acc1,
    acc2,
    acc3,
    tile,
    nm,
    DT: tl.constexpr,
    PREC: tl.constexpr,
):
    """One online-softmax step of 4-part queries ``[M, D/4]`` (scaled by sm_scale * log2 e) over a tile from
    :func:`load_tile`, its tokens masked by ``nm`` ``[BLOCK_N]``; returns the updated ``m, l, acc0..3``."""
    k0, k1, k2, k3, v0, v1, v2, v3, ks, kz, vs, vz = tile
    # a masked token's bytes are whatever the region holds (its scales may be NaN bits): its value row
    # dequantizes to 0, so that p = 0 there leaves the sums alone (0 * NaN would not)
    vs = tl.where(nm[:, None], vs, 0.0)
    vz = tl.where(nm[:, None], vz, 0.0)
    s = tl.dot(q0, tl.trans(_deq_part(k0, ks, kz, DT)), input_precision=PREC)
    s += tl.dot(q1, tl.trans(_deq_part(k1, ks, kz, DT)), input_precision=PREC)
    s += tl.dot(q2, tl.trans(_deq_part(k2, ks, kz, DT)), input_precision=PREC)
    s += tl.dot(q3, tl.trans(_deq_part(k3, ks, kz, DT)), input_precision=PREC)
    s = tl.where(nm[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    pd = p.to(DT)
    acc0 = acc0 * alpha[:, None] + tl.dot(pd, _deq_part(v0, vs, vz, DT), input_precision=PREC)
    acc1 = acc1 * alpha[:, None] + tl.dot(pd, _deq_part(v1, vs, vz, DT), input_precision=PREC)
    acc2 = acc2 * alpha[:, None] + tl.dot(pd, _deq_part(v2, vs, vz, DT), input_precision=PREC)
    acc3 = acc3 * alpha[:, None] + tl.dot(pd, _deq_part(v3, vs, vz, DT), input_precision=PREC)
    return m_new, l_i, acc0, acc1, acc2, acc3


@triton.jit
def attend_segment(
    q0,
    q1,
    q2,
    q3,
    m_i,
    l_i,
    acc0,
    acc1,
    acc2,
    acc3,
    a8r,
    a16r,
    a32r,
    afr,
    ahr,
    off,
    cap,
    kb,
    vb,
    n_begin,
    n_valid,
    h,
    HKV: tl.constexpr,
    D: tl.constexpr,
    GS: tl.constexpr,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
    HM: tl.constexpr,
):
    """Online-softmax attention of 4-part queries ``[M, D/4]`` (already scaled by sm_scale * log2 e) over the
    tokens ``n_begin..n_valid`` of one region of KV head ``h``, tile by tile (:func:`load_tile`,
    :func:`attend_tile`). ``a8r``.. ``afr`` point at the batch row's arena (int32 offsets inside a row keep
    registers low; ``ahr`` is it as float16, for float16 meta: ``HM``). Returns the updated ``m, l, acc0..3``."""
    for n0 in range(n_begin, n_valid, BLOCK_N):
        tile = load_tile(
            a8r, a16r, a32r, afr, ahr, off, cap, kb, vb, n0, n_valid, h, HKV, D, GS, G, BLOCK_N, HM
        )
        nm = n0 + tl.arange(0, BLOCK_N) < n_valid
        m_i, l_i, acc0, acc1, acc2, acc3 = attend_tile(
            q0, q1, q2, q3, m_i, l_i, acc0, acc1, acc2, acc3, tile, nm, DT, PREC
        )
    return m_i, l_i, acc0, acc1, acc2, acc3


@triton.jit
def segment_of(
    s,
    n_chunks,
    length,
    table,
    N_SINK: tl.constexpr,
    NW: tl.constexpr,
    SB: tl.constexpr,
    WB: tl.constexpr,
    WIN_OFF: tl.constexpr,
):
    """Segment ``s`` of the past, oldest first (0 = sink, 1..n_chunks = body chunks, n_chunks + 1 = window):
    ``(offset, capacity, key_bits, value_bits, tokens to read)`` for a row of ``length`` past tokens."""
    is_sink = s == 0
    is_win = s == n_chunks + 1
    ci = tl.minimum(tl.maximum(s - 1, 0), tl.maximum(n_chunks - 1, 0))
    is_chunk = (is_sink == 0) & (is_win == 0)
    t_off = tl.load(table + ci * 3 + 0, mask=is_chunk, other=0)
    t_kb = tl.load(table + ci * 3 + 1, mask=is_chunk, other=2)
    t_vb = tl.load(table + ci * 3 + 2, mask=is_chunk, other=2)
    off = tl.where(is_sink, 0, tl.where(is_win, WIN_OFF, t_off))
    cap = tl.where(is_sink, N_SINK, NW)
    kb = tl.where(is_sink, SB, tl.where(is_win, WB, t_kb))
    vb = tl.where(is_sink, SB, tl.where(is_win, WB, t_vb))
    tok0 = tl.where(is_sink, 0, N_SINK + (s - 1) * NW)
    n_valid = tl.minimum(cap, tl.maximum(length - tok0, 0))
    return off, cap, kb, vb, n_valid
