"""The pmkvq domain schema: the checker validates pmkvq nodes, and ORT runs them through the Python ops."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from pmkvq_compile import Plan
from pmkvq_compile.export.custom import register_ort_ops, rewrite_for_ort
from pmkvq_compile.export.schema import DOMAIN, load_schema, register_schemas
from pmkvq_compile.kernels import reference
from pmkvq_compile.kernels.layout import ArenaLayout
from pmkvq_compile.plan import ModelGeometry


def _requantize_model(lay: ArenaLayout, key_bits: int, value_bits: int, **extra) -> onnx.ModelProto:
    attrs = {"layout": lay.to_list(), "key_bits": key_bits, "value_bits": value_bits, **extra}
    attrs = {k: v for k, v in attrs.items() if v is not None}
    node = helper.make_node("RequantizeBody", ["a", "s", "t"], ["a2", "s2", "t2"], domain=DOMAIN, **attrs)
    io = [
        ("a", TensorProto.UINT8, ["B", lay.budget_bytes]),
        ("s", TensorProto.INT32, [8]),
        ("t", TensorProto.INT32, [lay.max_chunks, 3]),
    ]
    graph = helper.make_graph(
        [node],
        "requantize",
        [helper.make_tensor_value_info(*x) for x in io],
        [helper.make_tensor_value_info(n + "2", d, s) for n, d, s in io],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)], ir_version=10
    )


def test_schema_file_lists_the_three_ops_and_registers_them() -> None:
    names = [op["name"] for op in load_schema()["ops"]]
    assert names == ["Append", "Attention", "RequantizeBody"]
    assert register_schemas() == tuple(names)
    assert all(onnx.defs.has(n, DOMAIN) for n in names)


def test_checker_rejects_a_pmkvq_node_without_its_attributes() -> None:
    register_schemas()
    lay = ArenaLayout.from_plan(Plan.uniform(ModelGeometry("llama", 1, 4, 2, 32, 128), 4, 64, n_window=8), 0)
    onnx.checker.check_model(_requantize_model(lay, 4, 4), full_check=True)
    with pytest.raises(onnx.checker.ValidationError, match="value_bits"):
        onnx.checker.check_model(_requantize_model(lay, 4, None), full_check=True)


def test_requantize_body_node_runs_in_ort_like_the_reference() -> None:
    plan = Plan.uniform(ModelGeometry("llama", 1, 4, 2, 32, 128), 2, 96, n_window=8)
    lay = ArenaLayout.from_plan(plan, 0)
    arena = torch.zeros(2, lay.budget_bytes, dtype=torch.uint8)
    state, table = lay.initial_state(), lay.empty_table()
    torch.manual_seed(0)
    reference.append(
        arena, state, table, torch.randn(2, 2, 30, 32), torch.randn(2, 2, 30, 32), None, lay.to_list()
    )
    assert int(state[2]) >= 3 and int(state[3]) > 4  # body chunks above the target bits
    model = _requantize_model(lay, 4, 2)
    onnx.checker.check_model(model, full_check=True)
    so = ort.SessionOptions()
    so.register_custom_ops_library(register_ort_ops())
    sess = ort.InferenceSession(
        rewrite_for_ort(model).SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    got = sess.run(None, {"a": arena.numpy(), "s": state.numpy(), "t": table.numpy()})
    reference.requantize_body(arena, state, table, 4, 2, lay.to_list())
    assert (int(state[3]), int(state[4])) == (4, 2)
    for g, r in zip(got, (arena, state, table)):
        np.testing.assert_array_equal(g, r.numpy())
