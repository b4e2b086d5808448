"""Flavor ``"standard"``: the cache step and the window flush / body shrink as standard ONNX ops only (opset 21).

Layout and semantics are those of :mod:`pmkvq_compile.export.standard_ref` (the tests compare both). What the
ops do:

* packed codes are unpacked through 2-bit digits (``BitShift``/``BitwiseAnd`` on uint8, then a weighted
  ``ReduceSum``): every packing of :func:`pmkvq_compile.quant.pack` is a little-endian bit stream, so one
  digit path reads and writes 16, 8, 4 and 2-bit codes, with the bit-width a tensor read from the state.
  This is what lets the body change bits (a data-dependent value) inside one static graph, with no ``If``;
* dequantization is a block-wise ``DequantizeLinear`` (``block_size`` = group size, opset 21) of the codes
  widened to uint16, minus the float zero (PM-KVQ's zero is not an integer, so it cannot be a zero point);
* quantization is ``ReduceMax``/``ReduceMin`` per group, ``Floor(x / scale + 0.5)``, as in the reference;
* ERS is integer ``Mul``/``Add``/``Div``/``Mod`` on int64 codes, selected by the target bits with ``Where``;
* writes at data-dependent offsets are ``Slice`` + ``Concat`` (shape-preserving).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnxscript import opset21 as op

from ..kernels.layout import ArenaLayout
from ..plan import Plan
from . import standard_ref

__all__ = ["build_prepare", "translations"]

_I32, _I64, _U8, _U16, _U32, _F32, _BOOL = (
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.UINT32,
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.BOOL,
)
_BIG = 2**62


def _c(*v: int):
    return op.Constant(value_ints=list(v))  # int64 [n]


def _cf(v: float):
    return op.Constant(value_float=float(v))


def _carr(a: np.ndarray):
    return op.Constant(value=onnx.numpy_helper.from_array(a))


def _get(state, j: int):
    """``state[j]`` as int64 [1]."""
    return op.Cast(op.Gather(state, _c(j), axis=0), to=_I64)


def _slice(x, start, end, axis: int):
    return op.Slice(x, start, end, _c(axis))


def _write(buf, start, upd, axis: int):
    """``buf`` with ``upd`` stored from index ``start`` (int64 [1]) along ``axis``; shape unchanged."""
    n = op.Shape(upd, start=axis, end=axis + 1)
    head = _slice(buf, _c(0), start, axis)
    tail = _slice(buf, op.Add(start, n), _c(_BIG), axis)
    return op.Concat(head, upd, tail, axis=axis)


def _decode(codes, bits, n, d: int):
    """Packed uint8 ``[B, H, bytes]`` -> int32 codes ``[B, H, n, D]``; ``bits`` and ``n`` int64 [1]."""
    half = op.Div(bits, _c(2))
    nbytes = op.Div(op.Mul(op.Mul(n, _c(d)), bits), _c(8))
    x = op.Unsqueeze(_slice(codes, _c(0), nbytes, 2), _c(3))  # [B, H, nbytes, 1]
    shifts = _carr(np.array([0, 2, 4, 6], dtype=np.uint8))
    dig = op.BitwiseAnd(op.BitShift(x, shifts, direction="RIGHT"), _carr(np.array([3], dtype=np.uint8)))
    shape = op.Concat(op.Shape(codes, start=0, end=2), n, _c(d), half, axis=0)
    dig = op.Reshape(op.Cast(dig, to=_I32), shape, allowzero=1)  # [B, H, n, D, half]
    j = op.Cast(op.Range(op.Squeeze(_c(0)), op.Squeeze(half), op.Squeeze(_c(1))), to=_F32)
    w = op.Cast(op.Pow(_cf(4.0), j), to=_I32)  # 4^j, exact
    return op.ReduceSum(op.Mul(dig, w), _c(-1), keepdims=0)


def _encode(q, bits, d: int):
    """int32 codes ``[B, H, n, D]`` -> packed uint8 ``[B, H, n * D * bits / 8]``; ``bits`` int64 [1]."""
    half = op.Div(bits, _c(2))
    sh = op.Cast(op.Mul(op.Range(op.Squeeze(_c(0)), op.Squeeze(half), op.Squeeze(_c(1))), _c(2)), to=_U32)
    x = op.Cast(op.Unsqueeze(q, _c(4)), to=_U32)
    dig = op.BitwiseAnd(op.BitShift(x, sh, direction="RIGHT"), _carr(np.array([3], dtype=np.uint32)))
    n = op.Shape(q, start=2, end=3)
    nbytes = op.Div(op.Mul(op.Mul(n, _c(d)), half), _c(4))
    dig = op.Reshape(
        op.Cast(dig, to=_I32), op.Concat(op.Shape(q, start=0, end=2), nbytes, _c(4), axis=0), allowzero=1
    )
    byte = op.ReduceSum(op.Mul(dig, _carr(np.array([1, 4, 16, 64], dtype=np.int32))), _c(-1), keepdims=0)
    return op.Cast(byte, to=_U8)


def _dequantize(q, scale, zero, gs: int, groups: int):
    """``q * scale - zero`` per group: block-wise DequantizeLinear, then the float zero. float32 [B, H, n, D]."""
    x = op.DequantizeLinear(op.Cast(q, to=_U16), scale, axis=3, block_size=gs)
    xg = op.Reshape(x, _c(0, 0, 0, groups, gs))
    return op.Reshape(op.Sub(xg, op.Unsqueeze(zero, _c(-1))), op.Shape(x))


def _quantize(x, bits: int, gs: int, groups: int):
    """float32 ``[B, H, n, D]`` -> (int32 codes, scale, zero ``[B, H, n, G]``), as :func:`quant.quantize`."""
    qmax = float(2**bits - 1)
    xg = op.Reshape(x, _c(0, 0, 0, groups, gs))
    mx = op.ReduceMax(xg, _c(-1), keepdims=0)
    mn = op.ReduceMin(xg, _c(-1), keepdims=0)
    scale = op.Clip(op.Div(op.Sub(mx, mn), _cf(qmax)), _cf(1e-5), _cf(1e5))
    zero = op.Neg(mn)
    v = op.Div(op.Add(xg, op.Unsqueeze(zero, _c(-1))), op.Unsqueeze(scale, _c(-1)))
    q = op.Clip(op.Floor(op.Add(v, _cf(0.5))), _cf(0.0), _cf(qmax))
    return op.Cast(op.Reshape(q, op.Shape(x)), to=_I32), scale, zero


def _ers_level(q, scale, bits: int):
    """One ERS level from static ``bits``: int32 codes, float scale."""
    c = bits // 2
    mul = (1 << (2 * c)) - (1 << c) + 1
    add = (1 << (3 * c - 1)) - (1 << (2 * c - 1)) + (1 << (c - 1))
    x = op.Add(op.Mul(op.Cast(q, to=_I64), _c(mul)), _c(add))
    x = op.Mod(op.Div(x, _c(1 << (3 * c))), _c(1 << c))
    return op.Cast(x, to=_I32), op.Mul(scale, _cf(float((1 << c) + 1)))


def _ers_from_static(q, scale, bits: int, target):
    """ERS from static ``bits`` down to ``target`` (int64 [1]) by selecting along the static chain."""
    chain = [(bits, q, scale)]
    while chain[-1][0] > 2:
        b, cq, cs = chain[-1]
        nq, ns = _ers_level(cq, cs, b)
        chain.append((b // 2, nq, ns))
    _, rq, rs = chain[-1]
    for b, cq, cs in reversed(chain[:-1]):
        hit = op.Equal(target, _c(b))
        rq = op.Where(op.Unsqueeze(hit, _c(1, 2, 3)), cq, rq)
        rs = op.Where(op.Unsqueeze(hit, _c(1, 2, 3)), cs, rs)
    return rq, rs


def _ers_dynamic(q, scale, bits, target):
    """ERS from ``bits`` down to ``target`` (both int64 [1], data-dependent): guarded static levels."""
    cur = bits
    for b in (16, 8, 4):
        nq, ns = _ers_level(q, scale, b)
        go = op.And(op.Equal(cur, _c(b)), op.Less(target, cur))
        g = op.Unsqueeze(go, _c(1, 2, 3))
        q, scale = op.Where(g, nq, q), op.Where(g, ns, scale)
        cur = op.Where(go, _c(b // 2), cur)
    return q, scale


def _meta(ks, kz, vs, vz):
    return op.Concat(*(op.Unsqueeze(m, _c(1)) for m in (ks, kz, vs, vz)), axis=1)  # [B, 4, H, n, G]


def _meta_part(meta, j: int, n):
    return op.Squeeze(_slice(_slice(meta, _c(j), _c(j + 1), 1), _c(0), n, 3), _c(1))  # [B, H, n, G]


def _region(codes_k, codes_v, meta, kb, vb, n, lay: ArenaLayout):
    d, gs, g = lay.head_dim, lay.group_size, lay.groups
    k = _dequantize(_decode(codes_k, kb, n, d), _meta_part(meta, 0, n), _meta_part(meta, 1, n), gs, g)
    v = _dequantize(_decode(codes_v, vb, n, d), _meta_part(meta, 2, n), _meta_part(meta, 3, n), gs, g)
    return k, v


def _repeat_heads(x, rep: int):
    """``[B, H, L, D]`` -> ``[B, H * rep, L, D]`` (repeat_interleave over heads)."""
    if rep == 1:
        return x
    e = op.Unsqueeze(x, _c(2))
    s = op.Shape(x)
    b_h = op.Slice(s, _c(0), _c(2), _c(0))
    big = op.Concat(b_h, _c(rep), op.Slice(s, _c(2), _c(4), _c(0)), axis=0)
    out_shape = op.Concat(
        op.Slice(s, _c(0), _c(1), _c(0)),
        op.Mul(op.Slice(s, _c(1), _c(2), _c(0)), _c(rep)),
        op.Slice(s, _c(2), _c(4), _c(0)),
        axis=0,
    )
    return op.Reshape(op.Expand(e, big), out_shape)


def _store(buf_k, buf_v, meta, k, v, bits_k, bits_v, start, lay: ArenaLayout, static_bits: int, body: bool):
    """Quantize ``k/v [B, H, n, D]`` at ``static_bits`` (ERS-shrunk to ``bits_k/bits_v`` for the body) and
    store them from token ``start``; returns new (codes_k, codes_v, meta)."""
    d, gs, g = lay.head_dim, lay.group_size, lay.groups
    kq, ks, kz = _quantize(k, static_bits, gs, g)
    vq, vs, vz = _quantize(v, static_bits, gs, g)
    if body:
        kq, ks = _ers_from_static(kq, ks, static_bits, bits_k)
        vq, vs = _ers_from_static(vq, vs, static_bits, bits_v)
    kbytes = op.Div(op.Mul(op.Mul(start, _c(d)), bits_k), _c(8))
    vbytes = op.Div(op.Mul(op.Mul(start, _c(d)), bits_v), _c(8))
    buf_k = _write(buf_k, kbytes, _encode(kq, bits_k, d), 2)
    buf_v = _write(buf_v, vbytes, _encode(vq, bits_v, d), 2)
    meta = _write(meta, start, _meta(ks, kz, vs, vz), 3)
    return buf_k, buf_v, meta


def _standard_layer(q, k, v, state_tensors, key_scale, attention_mask, layout, sm_scale):
    """Translation of ``pmkvq_onnx::standard_layer``: :func:`standard_ref.step` in standard ops."""
    lay = ArenaLayout.from_list(list(layout))
    sk, sv, smeta, wk, wv, wmeta, bk, bv, bmeta, st = state_tensors
    nt, wl, nb, kb, vb = (_get(st, j) for j in range(5))
    sbits, wbits = _c(lay.sink_bits), _c(lay.window_bits)
    n_sink = op.Min(nt, _c(lay.n_sink))
    # ---- attention over the past (sink, body, window) and the new tokens --------------------------------
    parts = [
        _region(sk, sv, smeta, sbits, sbits, n_sink, lay),
        _region(bk, bv, bmeta, kb, vb, nb, lay),
        _region(wk, wv, wmeta, wbits, wbits, wl, lay),
    ]
    s_full = op.Concat(key_scale, key_scale, axis=-1)  # [H, D]
    ks_new = op.Div(k, op.Unsqueeze(s_full, _c(0, 2)))  # [B, H, T, D]
    kall = op.Concat(*(p[0] for p in parts), ks_new, axis=2)
    vall = op.Concat(*(p[1] for p in parts), v, axis=2)
    rep = int(q.shape[1]) // lay.num_kv_heads  # query heads are a static dimension
    kall, vall = _repeat_heads(kall, rep), _repeat_heads(vall, rep)
    s_q = op.Squeeze(_repeat_heads(op.Unsqueeze(s_full, _c(0, 2)), rep), _c(0))  # [Hq, 1, D]
    qs = op.Mul(q, s_q)
    scores = op.Mul(op.MatMul(qs, op.Transpose(kall, perm=[0, 1, 3, 2])), _cf(sm_scale))  # [B, Hq, T, L]
    t = op.Shape(q, start=2, end=3)
    total = op.Shape(attention_mask, start=1, end=2)
    past = op.Sub(total, t)
    i = op.Range(op.Squeeze(_c(0)), op.Squeeze(t), op.Squeeze(_c(1)))
    j = op.Range(op.Squeeze(_c(0)), op.Squeeze(total), op.Squeeze(_c(1)))
    causal = op.LessOrEqual(op.Unsqueeze(j, _c(0)), op.Add(op.Unsqueeze(i, _c(1)), past))  # [T, L]
    pad = op.Unsqueeze(op.Cast(attention_mask, to=_BOOL), _c(1, 2))  # [B, 1, 1, L]
    allowed = op.And(causal, pad)
    scores = op.Where(allowed, scores, _cf(float(np.finfo(np.float32).min)))
    out = op.MatMul(op.Softmax(scores, axis=-1), vall)  # [B, Hq, T, D]
    # ---- store the new tokens -----------------------------------------------------------------------------
    tt = op.Shape(k, start=2, end=3)
    to_sink = op.Min(op.Max(op.Sub(_c(lay.n_sink), nt), _c(0)), tt)
    rest = op.Sub(tt, to_sink)
    w = _c(lay.n_window)
    partial = op.Mod(nb, w)
    to_body = op.Sub(op.Mul(op.Div(op.Add(partial, rest), w), w), partial)
    to_win = op.Sub(rest, to_body)
    b0, b1 = to_sink, op.Add(to_sink, to_body)
    sk, sv, smeta = _store(
        sk,
        sv,
        smeta,
        _slice(ks_new, _c(0), b0, 2),
        _slice(v, _c(0), b0, 2),
        sbits,
        sbits,
        nt,
        lay,
        lay.sink_bits,
        False,
    )
    bk, bv, bmeta = _store(
        bk, bv, bmeta, _slice(ks_new, b0, b1, 2), _slice(v, b0, b1, 2), kb, vb, nb, lay, lay.window_bits, True
    )
    wk, wv, wmeta = _store(
        wk,
        wv,
        wmeta,
        _slice(ks_new, b1, tt, 2),
        _slice(v, b1, tt, 2),
        wbits,
        wbits,
        wl,
        lay,
        lay.window_bits,
        False,
    )
    head = op.Concat(op.Add(nt, tt), op.Add(wl, to_win), op.Add(nb, to_body), kb, vb, _c(0, 0, 0), axis=0)
    st = op.Cast(head, to=_I32)
    return [out, sk, sv, smeta, wk, wv, wmeta, bk, bv, bmeta, st]


def _prepare(wk, wv, wmeta, bk, bv, bmeta, state, target_bits, layout):
    """Translation of ``pmkvq_onnx::prepare``: :func:`standard_ref.prepare` (flush) in standard ops."""
    lay = ArenaLayout.from_list(list(layout))
    d = lay.head_dim
    nt, wl, nb, kb, vb = (_get(state, j) for j in range(5))
    tgt = op.Cast(target_bits, to=_I64)
    tkb = op.Min(kb, _slice(tgt, _c(0), _c(1), 0))
    tvb = op.Min(vb, _slice(tgt, _c(1), _c(2), 0))
    kq, ks = _ers_dynamic(_decode(bk, kb, nb, d), _meta_part(bmeta, 0, nb), kb, tkb)
    vq, vs = _ers_dynamic(_decode(bv, vb, nb, d), _meta_part(bmeta, 2, nb), vb, tvb)
    bk2 = _write(op.Mul(bk, _carr(np.array([0], dtype=np.uint8))), _c(0), _encode(kq, tkb, d), 2)
    bv2 = _write(op.Mul(bv, _carr(np.array([0], dtype=np.uint8))), _c(0), _encode(vq, tvb, d), 2)
    meta = _write(bmeta, _c(0), _meta(ks, _meta_part(bmeta, 1, nb), vs, _meta_part(bmeta, 3, nb)), 3)
    # flush: the window's tokens, ERS-shrunk from window bits to the body bits, appended to the body
    wbits = lay.window_bits
    kw, ksw = _ers_from_static(_decode(wk, _c(wbits), wl, d), _meta_part(wmeta, 0, wl), wbits, tkb)
    vw, vsw = _ers_from_static(_decode(wv, _c(wbits), wl, d), _meta_part(wmeta, 2, wl), wbits, tvb)
    kbytes = op.Div(op.Mul(op.Mul(nb, _c(d)), tkb), _c(8))
    vbytes = op.Div(op.Mul(op.Mul(nb, _c(d)), tvb), _c(8))
    bk2 = _write(bk2, kbytes, _encode(kw, tkb, d), 2)
    bv2 = _write(bv2, vbytes, _encode(vw, tvb, d), 2)
    meta = _write(meta, nb, _meta(ksw, _meta_part(wmeta, 1, wl), vsw, _meta_part(wmeta, 3, wl)), 3)
    st = op.Cast(op.Concat(nt, _c(0), op.Add(nb, wl), tkb, tvb, _c(0, 0, 0), axis=0), to=_I32)
    return bk2, bv2, meta, st


@torch.library.custom_op("pmkvq_onnx::prepare", mutates_args=())
def prepare_op(
    window_key: torch.Tensor,
    window_value: torch.Tensor,
    window_meta: torch.Tensor,
    body_key: torch.Tensor,
    body_value: torch.Tensor,
    body_meta: torch.Tensor,
    state: torch.Tensor,
    target_bits: torch.Tensor,
    layout: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`standard_ref.prepare` with ``flush=True`` (what ``prepare.onnx`` computes)."""
    lay = ArenaLayout.from_list(layout)
    dummy = [torch.zeros(0)] * 3
    tensors = [*dummy, window_key, window_value, window_meta, body_key, body_value, body_meta, state]
    kb, vb = (int(x) for x in target_bits.tolist())
    return tuple(standard_ref.prepare(lay, tensors, kb, vb, True))  # type: ignore[return-value]


@prepare_op.register_fake
def _(window_key, window_value, window_meta, body_key, body_value, body_meta, state, target_bits, layout):
    return (
        torch.empty_like(body_key),
        torch.empty_like(body_value),
        torch.empty_like(body_meta),
        torch.empty_like(state),
    )


class _Prepare(torch.nn.Module):
    def __init__(self, layout: list[int]) -> None:
        super().__init__()
        self.layout = layout

    def forward(self, wk, wv, wm, bk, bv, bm, state, target_bits):
        return torch.ops.pmkvq_onnx.prepare(wk, wv, wm, bk, bv, bm, state, target_bits, self.layout)


def translations() -> dict[Any, Any]:
    """The dynamo exporter's ``custom_translation_table`` for this flavor (decoder step and prepare)."""
    return {
        torch.ops.pmkvq_onnx.standard_layer.default: _standard_layer,
        torch.ops.pmkvq_onnx.prepare.default: _prepare,
    }


def build_prepare(plan: Plan) -> onnx.ModelProto:
    """``prepare.onnx`` for every layer of ``plan`` (capacities are dynamic; geometry from layer 0).

    Inputs ``window.key``, ``window.value``, ``window.meta``, ``body.key``, ``body.value``, ``body.meta``,
    ``state`` (one layer's tensors, :mod:`standard_ref` layout) and ``target_bits`` int32 [2]; outputs
    ``body.key.out``, ``body.value.out``, ``body.meta.out``, ``state.out``.
    """
    lay = ArenaLayout.from_plan(plan, 0)
    specs = {s.name: s for s in standard_ref.specs(lay)}
    names = ["window.key", "window.value", "window.meta", "body.key", "body.value", "body.meta", "state"]
    args = [torch.zeros(specs[n].concrete(2), dtype=specs[n].dtype) for n in names]
    args.append(torch.tensor([lay.init_bits, lay.init_bits], dtype=torch.int32))
    dyn = [dict(specs[n].dynamic) for n in names] + [{}]
    prog = torch.onnx.export(
        _Prepare(lay.to_list()).eval(),
        tuple(args),
        dynamo=True,
        opset_version=21,
        custom_translation_table=translations(),
        input_names=[*names, "target_bits"],
        output_names=["body.key.out", "body.value.out", "body.meta.out", "state.out"],
        dynamic_shapes=tuple(dyn),
        optimize=True,
        verbose=False,
    )
    return prog.model_proto
