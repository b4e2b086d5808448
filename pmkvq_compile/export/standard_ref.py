"""The "standard" flavor's cache layout and its pure-PyTorch reference (the ONNX graphs of
:mod:`pmkvq_compile.export.standard` are tested against these functions).

Stock ONNX Runtime has no bitcast, so the standard flavor cannot keep float32 scales inside a uint8 arena.
It keeps the same codes, scales and zeros as the arena (:mod:`pmkvq_compile.kernels.layout`) in separate
tensors per layer and region (``B`` = batch, ``H`` = KV heads, ``G`` = D / group_size)::

    sink.key / sink.value      uint8   [B, H, n_sink * D * sink_bits / 8]       packed codes (quant.pack)
    sink.meta                  float32 [B, 4, H, n_sink, G]                      (k_scale, k_zero, v_scale, v_zero)
    window.key / window.value  uint8   [B, H, n_window * D * window_bits / 8]
    window.meta                float32 [B, 4, H, n_window, G]
    body.key                   uint8   [B, H, key_capacity]                      codes at the body's key bits
    body.value                 uint8   [B, H, value_capacity]
    body.meta                  float32 [B, 4, H, body_tokens, G]
    state                      int32   [8] = (n_tokens, window_len, body_len, body_key_bits, body_value_bits, 0, 0, 0)

Every body chunk always has the body's current bits (a chunk is written at the current bits and every shrink
moves all chunks to the new bits), so the body is one token array of ``body_len`` tokens at
``(body_key_bits, body_value_bits)``, packed token after token: a data-dependent bit-width only changes how many
bytes a token takes. Capacities are the largest the layer's budget allows at any level of its ERS schedule.

One step (:func:`step`) reads the past (sink, body, window, oldest first) and appends the new tokens: sink first,
then, when :func:`prepare` has moved the window into the body (a window flush), the tokens that complete
body chunks go to the body (quantized at window bits, ERS-shrunk to the body bits), the rest to the window.
:func:`prepare` runs before a step that flushes: it ERS-shrinks the body to the bits the eager cache has after
that step and moves the window's tokens into the body, so the step's attention sees exactly the eager past.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import quant
from ..kernels.layout import ArenaLayout, next_body_bits

if TYPE_CHECKING:
    from .step import StateSpec

__all__ = ["STATE_NAMES", "capacities", "prepare", "specs", "step"]

STATE_NAMES = (
    "sink.key",
    "sink.value",
    "sink.meta",
    "window.key",
    "window.value",
    "window.meta",
    "body.key",
    "body.value",
    "body.meta",
    "state",
)


def levels(lay: ArenaLayout) -> list[tuple[int, int]]:
    """The body's (key_bits, value_bits) from ``init_bits`` down its ERS schedule to (2, 2)."""
    out = [(lay.init_bits, lay.init_bits)]
    while (nxt := next_body_bits(*out[-1], (lay.key_bits, lay.value_bits))) is not None:
        out.append(nxt)
    return out


def capacities(lay: ArenaLayout) -> tuple[int, int, int]:
    """``(key_bytes, value_bytes, tokens)`` per head of the body tensors (at least one chunk)."""
    kcap = vcap = tcap = 0
    d, w = lay.head_dim, lay.n_window
    for kb, vb in levels(lay):
        chunks = max(lay.body_capacity // lay.chunk_bytes(kb, vb), 1)
        kcap = max(kcap, chunks * w * d * kb // 8)
        vcap = max(vcap, chunks * w * d * vb // 8)
        tcap = max(tcap, chunks * w)
    return kcap, vcap, tcap


def specs(lay: ArenaLayout) -> list[StateSpec]:
    """The state tensors of one layer, in graph order (see the module docstring)."""
    from .step import StateSpec

    h, d, g = lay.num_kv_heads, lay.head_dim, lay.groups
    s_bytes = lay.n_sink * d * lay.sink_bits // 8
    w_bytes = lay.n_window * d * lay.window_bits // 8
    kcap, vcap, tcap = capacities(lay)
    b = {0: "batch"}
    return [
        StateSpec("sink.key", torch.uint8, ("batch", h, s_bytes), b),
        StateSpec("sink.value", torch.uint8, ("batch", h, s_bytes), b),
        StateSpec("sink.meta", torch.float32, ("batch", 4, h, lay.n_sink, g), b),
        StateSpec("window.key", torch.uint8, ("batch", h, w_bytes), b),
        StateSpec("window.value", torch.uint8, ("batch", h, w_bytes), b),
        StateSpec("window.meta", torch.float32, ("batch", 4, h, lay.n_window, g), b),
        StateSpec("body.key", torch.uint8, ("batch", h, kcap), {0: "batch", 2: "body_key_bytes"}),
        StateSpec("body.value", torch.uint8, ("batch", h, vcap), {0: "batch", 2: "body_value_bytes"}),
        StateSpec("body.meta", torch.float32, ("batch", 4, h, tcap, g), {0: "batch", 3: "body_tokens"}),
        StateSpec("state", torch.int32, (8,), {}),
    ]


def initial_state(lay: ArenaLayout, batch: int) -> list[torch.Tensor]:
    """Empty state tensors (state = (0, 0, 0, init_bits, init_bits, 0, 0, 0))."""
    out = [torch.zeros(s.concrete(batch), dtype=s.dtype) for s in specs(lay)]
    out[-1][3:5] = lay.init_bits
    return out


# ---- codes <-> bytes ------------------------------------------------------------------------------------
def _read(codes: torch.Tensor, bits: int, n: int, d: int) -> torch.Tensor:
    """Packed ``[B, H, bytes]`` -> int32 codes ``[B, H, n, D]`` of the first ``n`` tokens."""
    b, h = codes.shape[:2]
    return quant.unpack(codes[:, :, : n * d * bits // 8].reshape(b, h, n, d * bits // 8), bits)


def _write(codes: torch.Tensor, bits: int, start: int, q: torch.Tensor) -> torch.Tensor:
    """Store int32 codes ``q [B, H, n, D]`` at token ``start`` of packed ``[B, H, bytes]``; returns a copy."""
    b, h, n, d = q.shape
    out = codes.clone()
    o = start * d * bits // 8
    out[:, :, o : o + n * d * bits // 8] = quant.pack(q, bits).reshape(b, h, -1)
    return out


def _ers(q: torch.Tensor, scale: torch.Tensor, bits: int, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    while bits > target:
        q, scale = quant.requantize(q, scale, bits)
        bits //= 2
    return q, scale


def _dq(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, gs: int) -> torch.Tensor:
    return quant.dequantize(q, scale, zero, gs)


def step(
    lay: ArenaLayout,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: list[torch.Tensor],
    key_scale: torch.Tensor,
    attention_mask: torch.Tensor,
    sm_scale: float,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Attention of ``q [B, Hq, T, D]`` over the past + new ``k/v [B, Hkv, T, D]``, and the new tokens stored.

    Returns ``(out float32 [B, Hq, T, D], new state tensors)``. The caller (OrtGenerator) has run
    :func:`prepare` when this step flushes the window.
    """
    from .step import attend

    sk, sv, smeta, wk, wv, wmeta, bk, bv, bmeta, st = state
    nt, wl, nb, kb, vb = (int(x) for x in st[:5].tolist())
    d, gs, sb, wb, w = lay.head_dim, lay.group_size, lay.sink_bits, lay.window_bits, lay.n_window
    t = k.shape[2]
    ns = min(nt, lay.n_sink)
    regions = [(sk, sv, smeta, sb, sb, ns), (bk, bv, bmeta, kb, vb, nb), (wk, wv, wmeta, wb, wb, wl)]
    kp, vp = [], []
    for ck, cv, meta, rkb, rvb, n in regions:
        m = meta[:, :, :, :n]
        kp.append(_dq(_read(ck, rkb, n, d), m[:, 0], m[:, 1], gs))
        vp.append(_dq(_read(cv, rvb, n, d), m[:, 2], m[:, 3], gs))
    out = attend(q, k, v, torch.cat(kp, 2), torch.cat(vp, 2), key_scale, attention_mask, sm_scale)

    s = torch.cat([key_scale, key_scale], dim=-1).float()
    ks = (k.float() / s[None, :, None, :]).to(k.dtype)
    to_sink = min(max(lay.n_sink - nt, 0), t)
    rest = t - to_sink
    partial = nb % w
    to_body = (partial + rest) // w * w - partial
    smeta, wmeta, bmeta = smeta.clone(), wmeta.clone(), bmeta.clone()
    if to_sink:
        kq, kss, kz = quant.quantize(ks[:, :, :to_sink], sb, gs)
        vq, vss, vz = quant.quantize(v[:, :, :to_sink], sb, gs)
        sk, sv = _write(sk, sb, nt, kq), _write(sv, sb, nt, vq)
        smeta[:, :, :, nt : nt + to_sink] = torch.stack([kss, kz, vss, vz], 1)
    if to_body:
        sl = slice(to_sink, to_sink + to_body)
        kq, kss, kz = quant.quantize(ks[:, :, sl], wb, gs)
        vq, vss, vz = quant.quantize(v[:, :, sl], wb, gs)
        kq, kss = _ers(kq, kss, wb, kb)
        vq, vss = _ers(vq, vss, wb, vb)
        bk, bv = _write(bk, kb, nb, kq), _write(bv, vb, nb, vq)
        bmeta[:, :, :, nb : nb + to_body] = torch.stack([kss, kz, vss, vz], 1)
    to_win = rest - to_body
    if to_win:
        sl = slice(to_sink + to_body, t)
        kq, kss, kz = quant.quantize(ks[:, :, sl], wb, gs)
        vq, vss, vz = quant.quantize(v[:, :, sl], wb, gs)
        wk, wv = _write(wk, wb, wl, kq), _write(wv, wb, wl, vq)
        wmeta[:, :, :, wl : wl + to_win] = torch.stack([kss, kz, vss, vz], 1)
    st = st.clone()
    st[0], st[1], st[2] = nt + t, wl + to_win, nb + to_body
    return out, [sk, sv, smeta, wk, wv, wmeta, bk, bv, bmeta, st]


def prepare(
    lay: ArenaLayout, state: list[torch.Tensor], key_bits: int, value_bits: int, flush: bool
) -> list[torch.Tensor]:
    """ERS-shrink the body to ``(key_bits, value_bits)`` (never up) and, with ``flush``, move the window's
    tokens into the body at those bits. Returns new ``(body.key, body.value, body.meta, state)``."""
    _, _, _, wk, wv, wmeta, bk, bv, bmeta, st = state
    _, wl, nb, kb, vb = (int(x) for x in st[:5].tolist())
    d, wb = lay.head_dim, lay.window_bits
    tkb, tvb = min(kb, key_bits), min(vb, value_bits)
    kq, vq = _read(bk, kb, nb, d), _read(bv, vb, nb, d)
    m = bmeta[:, :, :, :nb]
    kq, kss = _ers(kq, m[:, 0], kb, tkb)
    vq, vss = _ers(vq, m[:, 2], vb, tvb)
    bk = _write(torch.zeros_like(bk), tkb, 0, kq)
    bv = _write(torch.zeros_like(bv), tvb, 0, vq)
    bmeta = bmeta.clone()
    bmeta[:, 0, :, :nb], bmeta[:, 2, :, :nb] = kss, vss
    n = wl if flush else 0
    if n:
        wm = wmeta[:, :, :, :n]
        kq, kss = _ers(_read(wk, wb, n, d), wm[:, 0], wb, tkb)
        vq, vss = _ers(_read(wv, wb, n, d), wm[:, 2], wb, tvb)
        bk, bv = _write(bk, tkb, nb, kq), _write(bv, tvb, nb, vq)
        bmeta[:, :, :, nb : nb + n] = torch.stack([kss, wm[:, 1], vss, wm[:, 3]], 1)
    st = st.clone()
    st[1], st[2], st[3], st[4] = wl - n, nb + n, tkb, tvb
    return [bk, bv, bmeta, st]
