"""The plan: the memory model against its formula, validation, JSON + safetensors round trip, model checks."""

from __future__ import annotations

import json

import pytest
import torch

from pmkvq_compile import LayerPlan, ModelGeometry, Plan, PlanMismatchError
from pmkvq_compile.kernels.layout import ArenaLayout
from tests.models import tiny

GEO = ModelGeometry("llama", num_layers=3, num_heads=6, num_kv_heads=2, head_dim=64, hidden_size=384)


def test_uniform_budget_formula() -> None:
    plan = Plan.uniform(GEO, 4, 1000, n_sink=1, n_window=128)
    assert plan.group_size == 64
    # per token per layer: Hkv * (D*kb/8 + D*vb/8 + 16 * groups)
    tok16 = 2 * (64 * 2 + 64 * 2 + 16)
    tok4 = 2 * (32 + 32 + 16)
    chunks = (1000 - 1) // 128  # 7 whole chunks of 128 in the body at max_len
    expected = 1 * tok16 + 128 * tok16 + chunks * 128 * tok4
    assert [lp.budget_bytes for lp in plan.layers] == [expected] * 3
    assert plan.total_budget_bytes == 3 * expected
    assert plan.average_bits() == 4.0
    mixed = Plan.uniform(GEO, 8, 1000, value_bits=2)
    assert mixed.layers[0].budget_bytes == plan.budget_for(8, 2)
    assert plan.budget_for(8, 2) == 1 * tok16 + 128 * tok16 + chunks * 128 * 2 * (64 + 16 + 16)


def test_float16_scales_budget_formula(tmp_path) -> None:
    """``scale_dtype="float16"``: scale and zero of <= 8-bit tokens take 2 bytes each (16-bit ones keep 4), so
    the budget shrinks by 8 bytes per group per head for every body token; saved and loaded with the plan,
    and a plan.json from before the field loads as float32."""
    plan = Plan.uniform(GEO, 4, 1000, n_sink=1, n_window=128, scale_dtype="float16")
    tok16 = 2 * (64 * 2 + 64 * 2 + 16)
    tok4 = 2 * (32 + 32 + 8)
    chunks = (1000 - 1) // 128
    assert plan.layers[0].budget_bytes == 129 * tok16 + chunks * 128 * tok4
    assert plan.token_bytes(8, 16) == 2 * (64 + 128 + 16) and plan.token_bytes(8, 8) == 2 * (64 + 64 + 8)
    back = Plan.load(plan.save(tmp_path / "p"))
    assert back == plan and back.scale_dtype == "float16"
    old = Plan.uniform(GEO, 4, 1000).save(tmp_path / "old")
    d = json.loads((old / "plan.json").read_text())
    del d["scale_dtype"]
    (old / "plan.json").write_text(json.dumps(d))
    assert Plan.load(old).scale_dtype == "float32"


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("group_size", [64, 16])
def test_arena_layout_bytes_match_the_plan(scale_dtype: str, group_size: int) -> None:
    """The cache's layout of a layer (sink, window, chunk regions) and the planner's budget are one memory
    model: the layout's offsets against the formula, and a budget made for (kb, vb) holds exactly its chunks."""
    plan = Plan.uniform(GEO, 4, 1000, n_sink=2, n_window=64, group_size=group_size, scale_dtype=scale_dtype)
    groups = 64 // group_size
    for kb, vb in [(16, 16), (8, 8), (8, 2), (4, 4), (2, 2)]:
        m = 2 if scale_dtype == "float16" and max(kb, vb) <= 8 else 4
        tok = 2 * (64 * (kb + vb) // 8 + 4 * m * groups)
        lay = ArenaLayout.from_plan(plan.with_layers([LayerPlan(kb, vb, plan.budget_for(kb, vb))] * 3), 0)
        assert lay.token_bytes(kb, vb) == plan.token_bytes(kb, vb) == tok
        assert lay.chunk_bytes(kb, vb) == plan.chunk_bytes(kb, vb) == 64 * tok
        tok16 = 2 * (64 * 4 + 16 * groups)
        assert lay.window_offset == plan.sink_bytes == 2 * tok16
        assert lay.body_offset == plan.sink_bytes + plan.window_bytes == 66 * tok16
        assert lay.body_capacity == ((1000 - 2) // 64) * 64 * tok


def test_float16_scales_refusals() -> None:
    with pytest.raises(
        ValueError, match=r"scale_dtype='bfloat16' is not supported; expected one of \['float32', 'float16'\]"
    ):
        Plan.uniform(GEO, 4, 512, scale_dtype="bfloat16")
    # an odd number of (head, token, group) scales would leave regions off the kernels' 16-byte alignment
    g1 = ModelGeometry("llama", 1, 3, 1, 64, 192)
    with pytest.raises(ValueError, match=r"num_kv_heads \* n_window \* groups even, got 1 \* 5 \* 1"):
        Plan.uniform(g1, 4, 512, n_window=5, scale_dtype="float16")
    with pytest.raises(ValueError, match=r"n_sink \* groups even, got 1 \* 1 \* 1"):
        Plan.uniform(g1, 4, 512, n_window=8, sink_bits=8, init_bits=8, window_bits=8, scale_dtype="float16")
    assert Plan.uniform(g1, 4, 512, n_window=8, scale_dtype="float16").n_sink == 1  # a 16-bit sink is fine


def test_group_size_default_is_min_of_head_dim_and_128() -> None:
    g = ModelGeometry("llama", 1, 2, 1, 256, 512)
    assert Plan.uniform(g, 4, 512).group_size == 128
    assert Plan.uniform(GEO, 4, 512, group_size=32).group_size == 32


def test_save_load_roundtrip_exact(tmp_path) -> None:
    torch.manual_seed(0)
    base = Plan.uniform(GEO, 2, 4096, value_bits=4, metadata={"note": "x"})
    layers = list(base.layers)
    layers[1] = LayerPlan(8, 4, layers[1].budget_bytes + 12, key_scale=torch.rand(2, 32) + 0.5)
    plan = base.with_layers(layers)
    out = plan.save(tmp_path / "p")
    assert sorted(p.name for p in out.iterdir()) == ["plan.json", "tensors.safetensors"]
    d = json.loads((out / "plan.json").read_text())
    assert d["format"] == "pmkvq-plan" and d["version"] == 1 and d["model_fingerprint"] == GEO.fingerprint()
    back = Plan.load(out)
    assert back == plan
    assert torch.equal(back.layers[1].key_scale, plan.layers[1].key_scale)
    assert back.layers[0].key_scale is None
    # saving again over the same directory replaces it cleanly
    plan2 = Plan.uniform(GEO, 4, 4096)
    plan2.save(out)
    assert Plan.load(out) == plan2


def test_load_checks_model(tmp_path) -> None:
    model = tiny("llama")
    plan = Plan.uniform(model.config, 4, 256, n_window=16)
    plan.save(tmp_path / "p")
    assert Plan.load(tmp_path / "p", model.config) == plan
    other = tiny("llama", num_key_value_heads=4)
    with pytest.raises(PlanMismatchError, match="num_kv_heads: plan 2 vs model 4"):
        Plan.load(tmp_path / "p", other.config)
    qwen = tiny("qwen2")
    with pytest.raises(PlanMismatchError, match="model_type"):
        plan.check_model(qwen.config)


def test_load_refuses_bad_files(tmp_path) -> None:
    plan = Plan.uniform(GEO, 4, 512)
    out = plan.save(tmp_path / "p")
    d = json.loads((out / "plan.json").read_text())
    with pytest.raises(ValueError, match="no plan at"):
        Plan.load(tmp_path / "missing")
    d2 = dict(d, version=99)
    (out / "plan.json").write_text(json.dumps(d2))
    with pytest.raises(ValueError, match="format version 99"):
        Plan.load(out)
    d3 = dict(d, model_fingerprint="0" * 16)
    (out / "plan.json").write_text(json.dumps(d3))
    with pytest.raises(ValueError, match="corrupt"):
        Plan.load(out)
    d4 = dict(d)
    d4["layers"] = [dict(d["layers"][0], key_scale="layers.0.key_scale"), *d["layers"][1:]]
    (out / "plan.json").write_text(json.dumps(d4))
    with pytest.raises(ValueError, match=r"tensors\.safetensors lacks"):
        Plan.load(out)
    (out / "plan.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Plan.load(out)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=3), r"bits=3 is not supported; expected one of \[16, 8, 4, 2\]"),
        (dict(bits=4, value_bits=1), r"value_bits=1"),
        (dict(bits=4, group_size=48), r"group_size=48"),
        (dict(bits=4, n_window=0), r"n_window=0"),
        (dict(bits=4, n_sink=-1), r"n_sink=-1"),
        (dict(bits=16, init_bits=8), r"exceed init_bits=8"),
    ],
)
def test_uniform_refuses(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        Plan.uniform(GEO, max_len=512, **kwargs)


def test_refuses_max_len_beyond_positions_and_bad_head_dim() -> None:
    g = ModelGeometry("llama", 2, 2, 1, 64, 128, max_position_embeddings=1024)
    with pytest.raises(ValueError, match="max_len=2048 exceeds the model's max_position_embeddings=1024"):
        Plan.uniform(g, 4, 2048)
    with pytest.raises(ValueError, match="head_dim=40"):
        Plan.uniform(ModelGeometry("llama", 1, 2, 1, 40, 80), 4, 256)


def test_layer_plan_validation() -> None:
    with pytest.raises(ValueError, match="key_scale must be a float32 tensor"):
        LayerPlan(4, 4, 100, key_scale=torch.ones(2, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="finite and positive"):
        LayerPlan(4, 4, 100, key_scale=-torch.ones(2, 32))
    with pytest.raises(ValueError, match="budget_bytes=0"):
        LayerPlan(4, 4, 0)
    plan = Plan.uniform(GEO, 4, 512)
    with pytest.raises(ValueError, match=r"key_scale has shape \(3, 32\)"):
        plan.with_layers([LayerPlan(4, 4, 100, key_scale=torch.ones(3, 32))] * 3)
    with pytest.raises(ValueError, match="plan has 2 layers but the model has 3"):
        plan.with_layers(plan.layers[:2])


def test_plan_is_frozen_and_describes() -> None:
    plan = Plan.uniform(GEO, 4, 512)
    with pytest.raises(AttributeError):
        plan.max_len = 3  # type: ignore[misc]
    text = plan.describe()
    assert text.count("\n") == 3 + 1 and "avg 4.00 bits" in text
