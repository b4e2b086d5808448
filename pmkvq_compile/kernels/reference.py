"""Pure-PyTorch references of every kernel, with the launchers' signatures (the non-CUDA dispatch of the ops).

They read the device state with ``.tolist()`` (a host sync): fine on the CPU, and the reason the Triton
kernels exist on CUDA. Codes are produced with :mod:`pmkvq_compile.quant`, so the stored bytes are the
numerical reference the kernels are compared with bit for bit.
"""

from __future__ import annotations

import math

import torch

from .. import quant
from .layout import (
    BODY_KB,
    BODY_VB,
    N_CHUNKS,
    N_TOKENS,
    OVERFLOW,
    WINDOW_LEN,
    ArenaLayout,
    meta_cast,
    next_body_bits,
)

__all__ = [
    "append",
    "decode_attention",
    "dequantize_past",
    "prefill_attention",
    "read_region",
    "requantize_body",
    "write_region",
]

Codes = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def region_views(arena: torch.Tensor, lay: ArenaLayout, offset: int, cap: int, kb: int, vb: int):
    """``k_codes u8 [B,Hkv,cap,D*kb/8]``, ``v_codes u8 [B,Hkv,cap,D*vb/8]``, ``meta [B,4,Hkv,cap,G]`` (float32,
    or float16 where the layout stores it so: :meth:`ArenaLayout.meta_dtype`)."""
    b, h, d = arena.shape[0], lay.num_kv_heads, lay.head_dim
    k0, v0, m0, end = lay.region_parts(offset, cap, kb, vb)
    kc = arena[:, k0:v0].view(b, h, cap, d * kb // 8)
    vc = arena[:, v0:m0].view(b, h, cap, d * vb // 8)
    meta = arena[:, m0:end].view(lay.meta_dtype(kb, vb)).view(b, 4, h, cap, lay.groups)
    return kc, vc, meta


def read_region(
    arena: torch.Tensor, lay: ArenaLayout, offset: int, cap: int, kb: int, vb: int, n: int
) -> Codes:
    """Codes (int32 ``[B,Hkv,n,D]``) and meta (float32 ``[B,Hkv,n,G]``) of a region's first ``n`` tokens:
    ``(kq, k_scale, k_zero, vq, v_scale, v_zero)``."""
    kc, vc, meta = region_views(arena, lay, offset, cap, kb, vb)
    m = meta[:, :, :, :n]
    return (
        quant.unpack(kc[:, :, :n], kb),
        m[:, 0].to(torch.float32, copy=True),
        m[:, 1].to(torch.float32, copy=True),
        quant.unpack(vc[:, :, :n], vb),
        m[:, 2].to(torch.float32, copy=True),
        m[:, 3].to(torch.float32, copy=True),
    )


def write_region(
    arena: torch.Tensor, lay: ArenaLayout, offset: int, cap: int, kb: int, vb: int, start: int, codes: Codes
) -> None:
    """Store tokens ``[start, start + T)`` of a region from ``(kq, ks, kz, vq, vs, vz)`` as in :func:`read_region`."""
    kq, ks, kz, vq, vs, vz = codes
    kc, vc, meta = region_views(arena, lay, offset, cap, kb, vb)
    t = kq.shape[2]
    kc[:, :, start : start + t] = quant.pack(kq, kb)
    vc[:, :, start : start + t] = quant.pack(vq, vb)
    meta[:, :, :, start : start + t] = meta_cast(torch.stack([ks, kz, vs, vz], dim=1), meta.dtype)


def ers_to(q: torch.Tensor, scale: torch.Tensor, bits: int, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    while bits > target:
        q, scale = quant.requantize(q, scale, bits)
        bits //= 2
    return q, scale


def quantize_kv(k: torch.Tensor, v: torch.Tensor, kb: int, vb: int, gs: int) -> Codes:
    kq, ks, kz = quant.quantize(k, kb, gs)
    vq, vs, vz = quant.quantize(v, vb, gs)
    return kq, ks, kz, vq, vs, vz


def _scale_keys(k: torch.Tensor, key_scale: torch.Tensor | None) -> torch.Tensor:
    if key_scale is None:
        return k
    s = torch.cat([key_scale, key_scale], dim=-1).to(device=k.device, dtype=torch.float32)
    return (k.float() / s[None, :, None, :]).to(k.dtype)


def _shrink(
    arena: torch.Tensor, table: torch.Tensor, lay: ArenaLayout, n_chunks: int, kb: int, vb: int
) -> None:
    """Move every body chunk to ``(min(kb_i, kb), min(vb_i, vb))``, compactly from the body offset, in order."""
    rows = table[:n_chunks].tolist()
    off = lay.body_offset
    for i, (o, okb, ovb) in enumerate(rows):
        nkb, nvb = min(okb, kb), min(ovb, vb)
        kq, ks, kz, vq, vs, vz = read_region(arena, lay, o, lay.n_window, okb, ovb, lay.n_window)
        kq, ks = ers_to(kq, ks, okb, nkb)
        vq, vs = ers_to(vq, vs, ovb, nvb)
        write_region(arena, lay, off, lay.n_window, nkb, nvb, 0, (kq, ks, kz, vq, vs, vz))
        table[i, 0], table[i, 1], table[i, 2] = off, nkb, nvb
        off += lay.chunk_bytes(nkb, nvb)


def append(
    arena: torch.Tensor,
    state: torch.Tensor,
    table: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_scale: torch.Tensor | None,
    layout: list[int],
) -> None:
    """Quantize-and-append ``key``/``value`` ``[B, Hkv, T, D]`` into the arena; updates ``state``/``table``.

    Semantics of :class:`pmkvq_compile.cache.ProgressiveLayer`: sink first, then the window; each full
    window chunk moves into the body (window codes ERS-shrunk to the body's bits); while the body exceeds
    the budget it is shrunk one ERS level. If even 2 bits cannot hold it, ``state[OVERFLOW] = 1`` and
    nothing else changes. Keys are divided by ``key_scale`` (float32 ``[Hkv, D/2]``, or None) first.
    """
    lay = ArenaLayout.from_list(layout)
    n_tokens, wl, nc, bkb, bvb = (int(x) for x in state[:5].tolist())
    t = key.shape[2]
    final = (lay.key_bits, lay.value_bits)
    to_sink = min(max(lay.n_sink - n_tokens, 0), t)
    n_flush = (wl + t - to_sink) // lay.n_window
    nc_new = nc + n_flush
    kb, vb = bkb, bvb
    while nc_new * lay.chunk_bytes(kb, vb) > lay.body_capacity:
        nxt = next_body_bits(kb, vb, final)
        if nxt is None:
            state[OVERFLOW] = 1
            return
        kb, vb = nxt
    k = _scale_keys(key, key_scale)
    v = value
    if (kb, vb) != (bkb, bvb) and nc:
        _shrink(arena, table, lay, nc, kb, vb)
    wb = lay.window_bits
    new = quantize_kv(k[:, :, to_sink:], v[:, :, to_sink:], wb, wb, lay.group_size)
    if n_flush:
        old = read_region(arena, lay, lay.window_offset, lay.n_window, wb, wb, wl)
        stream = [torch.cat([a, b], dim=2) for a, b in zip(old, new)]
        cb = lay.chunk_bytes(kb, vb)
        for j in range(n_flush):
            sl = slice(j * lay.n_window, (j + 1) * lay.n_window)
            kq, ks, kz, vq, vs, vz = (x[:, :, sl] for x in stream)
            kq, ks = ers_to(kq, ks, wb, kb)
            vq, vs = ers_to(vq, vs, wb, vb)
            off = lay.body_offset + (nc + j) * cb
            write_region(arena, lay, off, lay.n_window, kb, vb, 0, (kq, ks, kz, vq, vs, vz))
            table[nc + j, 0], table[nc + j, 1], table[nc + j, 2] = off, kb, vb
        used = n_flush * lay.n_window - wl
        tail = [x[:, :, used:] for x in new]
        wl_new = 0
    else:
        tail = list(new)
        wl_new = wl
    if to_sink:
        sb = lay.sink_bits
        sink = quantize_kv(k[:, :, :to_sink], v[:, :, :to_sink], sb, sb, lay.group_size)
        write_region(arena, lay, 0, lay.n_sink, sb, sb, n_tokens, sink)
    nt = tail[0].shape[2]
    if nt:
        write_region(arena, lay, lay.window_offset, lay.n_window, wb, wb, wl_new, tuple(tail))
    state[N_TOKENS] = n_tokens + t
    state[WINDOW_LEN] = wl_new + nt
    state[N_CHUNKS] = nc_new
    state[BODY_KB] = kb
    state[BODY_VB] = vb


def requantize_body(
    arena: torch.Tensor,
    state: torch.Tensor,
    table: torch.Tensor,
    key_bits: int,
    value_bits: int,
    layout: list[int],
) -> None:
    """ERS the whole body in place to ``(min(kb_i, key_bits), min(vb_i, value_bits))`` per chunk, compacting
    the chunks from the body offset in order; the state's body bits become ``min(body, target)``."""
    lay = ArenaLayout.from_list(layout)
    nc, bkb, bvb = (int(x) for x in state[N_CHUNKS : BODY_VB + 1].tolist())
    kb, vb = min(bkb, key_bits), min(bvb, value_bits)
    if nc:
        _shrink(arena, table, lay, nc, kb, vb)
    state[BODY_KB] = kb
    state[BODY_VB] = vb


def _segments(lay: ArenaLayout, state: torch.Tensor, table: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """``(offset, capacity, key_bits, value_bits)`` of sink, body chunks, window, oldest first."""
    nc = int(state[N_CHUNKS])
    segs = [(0, lay.n_sink, lay.sink_bits, lay.sink_bits)] if lay.n_sink else []
    segs += [(o, lay.n_window, kb, vb) for o, kb, vb in table[:nc].tolist()]
    segs.append((lay.window_offset, lay.n_window, lay.window_bits, lay.window_bits))
    return segs


def dequantize_past(
    arena: torch.Tensor, state: torch.Tensor, table: torch.Tensor, layout: list[int], length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``length`` stored tokens dequantized: float32 ``[B, Hkv, length, D]`` for K (as stored,
    i.e. divided by the key scale) and V."""
    lay = ArenaLayout.from_list(layout)
    ks, vs, got = [], [], 0
    for off, cap, kb, vb in _segments(lay, state, table):
        n = min(cap, length - got)
        if n <= 0:
            break
        kq, ksc, kz, vq, vsc, vz = read_region(arena, lay, off, cap, kb, vb, n)
        ks.append(quant.dequantize(kq, ksc, kz, lay.group_size))
        vs.append(quant.dequantize(vq, vsc, vz, lay.group_size))
        got += n
    if got < length:
        raise ValueError(f"length {length} exceeds the tokens the arena can address ({got})")
    if not ks:
        e = torch.zeros(arena.shape[0], lay.num_kv_heads, 0, lay.head_dim, device=arena.device)
        return e, e.clone()
    return torch.cat(ks, dim=2), torch.cat(vs, dim=2)


def _attend(
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
    """``q [B, Hq, T, D]`` over (past of ``lengths[b]`` tokens, new tokens causally); float32 result."""
    lay = ArenaLayout.from_list(layout)
    hq, t = q.shape[1], q.shape[2]
    rep = hq // lay.num_kv_heads
    lmax = int(lengths.max()) if lengths.numel() else 0
    kp, vp = dequantize_past(arena, state, table, layout, lmax)  # [B, Hkv, L, D]
    kp = kp.repeat_interleave(rep, dim=1)
    vp = vp.repeat_interleave(rep, dim=1)
    qf = q.float()
    qp = qf
    if key_scale is not None:
        s = torch.cat([key_scale, key_scale], dim=-1).float().repeat_interleave(rep, dim=0)
        qp = qf * s[None, :, None, :]
    sp = torch.einsum("bhtd,bhld->bhtl", qp, kp) * sm_scale
    valid = torch.arange(lmax, device=q.device)[None, :] < lengths.to(q.device).long()[:, None]  # [B, L]
    sp = sp.masked_fill(~valid[:, None, None, :], float("-inf"))
    kn = k_new.float().repeat_interleave(rep, dim=1)
    vn = v_new.float().repeat_interleave(rep, dim=1)
    sn = torch.einsum("bhtd,bhsd->bhts", qf, kn) * sm_scale
    causal = torch.ones(t, k_new.shape[2], dtype=torch.bool, device=q.device).tril(k_new.shape[2] - t)
    sn = sn.masked_fill(~causal, float("-inf"))
    p = torch.softmax(torch.cat([sp, sn], dim=-1), dim=-1)
    p = torch.nan_to_num(p, nan=0.0)
    return torch.einsum("bhtl,bhld->bhtd", p, torch.cat([vp, vn], dim=2))


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
    """One query per row: ``q [B, Hq, D]`` -> ``[B, Hq, D]`` in q's dtype (``num_splits`` is ignored)."""
    out = _attend(q[:, :, None], k_new, v_new, arena, state, table, lengths, key_scale, layout, sm_scale)
    return out[:, :, 0].to(q.dtype)


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
    """``q [B, Hq, T, D]`` -> ``[B, Hq, T, D]`` in q's dtype: past of ``lengths[b]`` tokens + causal new tokens."""
    return _attend(q, k_new, v_new, arena, state, table, lengths, key_scale, layout, sm_scale).to(q.dtype)


def default_sm_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
