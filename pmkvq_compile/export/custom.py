"""Flavor ``"custom"``: ``pmkvq`` domain nodes in the graph, and their ONNX Runtime implementation.

Export: :func:`translations` maps ``pmkvq_onnx::custom_layer`` to ``pmkvq.Append`` then ``pmkvq.Attention``
(schema in ``schema.json``), plus standard glue (``lengths = Expand(state[0], [B])``).

Runtime: :func:`session_bytes` registers the ops as onnxruntime-extensions Python ops (CPU) and returns the
model bytes rewritten for them. onnxruntime-extensions binds Python ops only in its own domain
``ai.onnx.contrib`` and only with scalar attributes, so the in-memory copy renames ``pmkvq.X`` to
``ai.onnx.contrib.PmkvqX`` and turns the ``layout`` ints into a comma-separated string; the file on disk keeps
the ``pmkvq`` domain. A native kernel library would instead register a custom-op domain ``pmkvq`` (version 1)
through ``OrtCustomOpDomain`` with kernels for these three ops (the Triton kernels' logic, on CPU or CUDA),
loaded with ``SessionOptions.register_custom_ops_library``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnxscript import opset21 as op
from onnxscript.values import Opset

from ..kernels import reference
from .schema import DOMAIN, DOMAIN_VERSION, register_schemas
from .step import attend

__all__ = ["register_ort_ops", "session_bytes", "translations"]

pmkvq = Opset(DOMAIN, DOMAIN_VERSION)


def _custom_layer(q, k, v, arena, state, table, key_scale, attention_mask, layout, sm_scale):
    """Translation of ``pmkvq_onnx::custom_layer`` (onnxscript values in, values out)."""
    arena2, state2, table2 = pmkvq.Append(
        arena, state, table, k, v, key_scale, layout=list(layout), _outputs=3
    )
    n = op.Gather(state, op.Constant(value_ints=[0]), axis=0)  # int32 [1]: past tokens
    lengths = op.Expand(n, op.Shape(q, start=0, end=1))  # int32 [B]
    out = pmkvq.Attention(
        q,
        k,
        v,
        arena2,
        state2,
        table2,
        lengths,
        key_scale,
        attention_mask,
        layout=list(layout),
        sm_scale=float(sm_scale),
    )
    return out, arena2, state2, table2


def translations() -> dict[Any, Any]:
    """The dynamo exporter's ``custom_translation_table`` for this flavor (registers the schemas first)."""
    register_schemas()
    return {torch.ops.pmkvq_onnx.custom_layer.default: _custom_layer}


# ---- ONNX Runtime: onnxruntime-extensions Python ops ----------------------------------------------------
_ORT_DOMAIN = "ai.onnx.contrib"


def _layout(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, copy=True))


def _append(arena, state, table, key, value, key_scale, layout: str):
    a, s, tb = _t(arena), _t(state), _t(table)
    reference.append(a, s, tb, _t(key), _t(value), _t(key_scale), _layout(layout))
    return a.numpy(), s.numpy(), tb.numpy()


def _attention(q, k, v, arena, state, table, lengths, key_scale, mask, layout: str, sm_scale: float):
    lay = _layout(layout)
    past = int(lengths.max()) if lengths.size else 0
    kp, vp = reference.dequantize_past(_t(arena), _t(state), _t(table), lay, past)
    out = attend(_t(q), _t(k), _t(v), kp, vp, _t(key_scale), _t(mask), float(sm_scale))
    return out.numpy()


def _requantize(arena, state, table, layout: str, key_bits: int, value_bits: int):
    a, s, tb = _t(arena), _t(state), _t(table)
    reference.requantize_body(a, s, tb, int(key_bits), int(value_bits), _layout(layout))
    return a.numpy(), s.numpy(), tb.numpy()


_REGISTERED = False


def register_ort_ops() -> str:
    """Register the three ops with onnxruntime-extensions (once); returns its custom-op library path."""
    global _REGISTERED
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise ValueError(
            "the custom flavor runs through onnxruntime-extensions: pip install onnxruntime-extensions"
        ) from e
    if not _REGISTERED:
        u8, i32, i64, f32 = (
            PyCustomOpDef.dt_uint8,
            PyCustomOpDef.dt_int32,
            PyCustomOpDef.dt_int64,
            PyCustomOpDef.dt_float,
        )
        s, i = PyCustomOpDef.dt_string, PyCustomOpDef.dt_int64
        onnx_op(
            op_type="PmkvqAppend",
            inputs=[u8, i32, i32, f32, f32, f32],
            outputs=[u8, i32, i32],
            attrs={"layout": s},
        )(_append)
        onnx_op(
            op_type="PmkvqAttention",
            inputs=[f32, f32, f32, u8, i32, i32, i32, f32, i64],
            outputs=[f32],
            attrs={"layout": s, "sm_scale": PyCustomOpDef.dt_float},
        )(_attention)
        onnx_op(
            op_type="PmkvqRequantizeBody",
            inputs=[u8, i32, i32],
            outputs=[u8, i32, i32],
            attrs={"layout": s, "key_bits": i, "value_bits": i},
        )(_requantize)
        _REGISTERED = True
    return get_library_path()


def rewrite_for_ort(model: onnx.ModelProto) -> onnx.ModelProto:
    """In place: ``pmkvq.X`` nodes become ``ai.onnx.contrib.PmkvqX`` with string ``layout`` (see module doc)."""
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        node.domain = _ORT_DOMAIN
        node.op_type = "Pmkvq" + node.op_type
        for a in node.attribute:
            if a.name == "layout":
                text = ",".join(str(x) for x in a.ints)
                a.ClearField("ints")
                a.type = onnx.AttributeProto.STRING
                a.s = text.encode()
    kept = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    model.opset_import.append(onnx.helper.make_opsetid(_ORT_DOMAIN, 1))
    return model


def session_bytes(path: str) -> bytes:
    """The model at ``path`` (weights included) rewritten for the Python ops, serialized."""
    register_ort_ops()
    model = onnx.load(path)
    return rewrite_for_ort(model).SerializeToString()
