"""to_onnx + OrtGenerator on a tiny random Llama: graph checks, parity with the eager path, sampling."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from pmkvq_compile import Plan, ProgressiveKVCache, use_pmkvq_attention
from pmkvq_compile.export import OrtGenerator, to_onnx
from pmkvq_compile.export.schema import DOMAIN
from pmkvq_compile.models import cache_kwarg
from tests.models import tiny

N_WINDOW = 8


def _plan(model, bits: int = 4, value_bits: int | None = None, max_len: int = 64) -> Plan:
    """A plan with unfolded key scales (so the key-scale path is exported too)."""
    plan = Plan.uniform(model.config, bits, max_len, value_bits=value_bits, n_window=N_WINDOW)
    gen = torch.Generator().manual_seed(7)
    layers = [dataclasses.replace(lp, key_scale=torch.rand(2, 8, generator=gen) + 0.5) for lp in plan.layers]
    return plan.with_layers(layers)


@pytest.fixture(scope="module")
def model():
    return tiny("llama")


@pytest.fixture(scope="module", params=["standard", "custom"])
def exported(request, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / request.param
    to_onnx(model, _plan(model), out, flavor=request.param)
    return request.param, out


def _eager_logits(model, plan, ids: torch.Tensor, prefill: int) -> tuple[torch.Tensor, ProgressiveKVCache]:
    cache = ProgressiveKVCache(plan, model.config)
    kw = {cache_kwarg(model): cache}
    with torch.no_grad(), use_pmkvq_attention(model):
        out = [model(ids[:, :prefill], **kw).logits]
        out += [model(ids[:, t : t + 1], **kw).logits for t in range(prefill, ids.shape[1])]
    return torch.cat(out, dim=1), cache


def _ort_logits(gen: OrtGenerator, ids: torch.Tensor, prefill: int) -> np.ndarray:
    gen.reset(ids.shape[0])
    out = [gen.step(ids[:, :prefill].numpy())]
    out += [gen.step(ids[:, t : t + 1].numpy()) for t in range(prefill, ids.shape[1])]
    return np.concatenate(out, axis=1)


def test_graphs_are_valid_and_named_like_optimum(exported) -> None:
    flavor, out = exported
    m = onnx.load(str(out / "decoder.onnx"))
    onnx.checker.check_model(m, full_check=True)
    ins = [i.name for i in m.graph.input]
    outs = [o.name for o in m.graph.output]
    assert ins[:3] == ["input_ids", "attention_mask", "position_ids"] and outs[0] == "logits"
    per_layer = ["arena", "state", "table"] if flavor == "custom" else ["sink.key", "body.meta", "state"]
    for i in range(2):
        for name in per_layer:
            assert f"past_key_values.{i}.{name}" in ins and f"present.{i}.{name}" in outs
    domains = {(n.domain, n.op_type) for n in m.graph.node if n.domain}
    ops = {n.op_type for n in m.graph.node}
    if flavor == "custom":
        assert domains == {(DOMAIN, "Append"), (DOMAIN, "Attention")}
        assert sum(n.op_type == "Append" for n in m.graph.node) == 2
    else:
        assert domains == set() and not m.functions  # only the default ONNX domain
        assert {"DequantizeLinear", "BitShift", "BitwiseAnd", "Softmax", "MatMul"} <= ops
        prep = onnx.load(str(out / "prepare.onnx"))
        onnx.checker.check_model(prep, full_check=True)
        assert not {n.domain for n in prep.graph.node} - {""}


def test_teacher_forced_logits_follow_the_eager_path_through_the_progression(model, exported) -> None:
    """4-bit plan, window 8, 60 tokens: the bodies go 16 -> 8 -> 4 bits in both runtimes."""
    _, out = exported
    plan = _plan(model)
    torch.manual_seed(3)
    ids = torch.randint(3, 96, (1, 60))
    ref, cache = _eager_logits(model, plan, ids, 13)
    gen = OrtGenerator(out)
    got = _ort_logits(gen, ids, 13)
    assert cache.body_bits(0) == gen.body_bits(0) == (4, 4)
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=2e-5)


@pytest.mark.parametrize(("bits", "value_bits"), [(2, 2), (8, 2), (16, 16)])
def test_standard_export_runs_other_plans(model, exported, bits: int, value_bits: int) -> None:
    flavor, out = exported
    base = _plan(model)
    plan = Plan.uniform(model.config, bits, 64, value_bits=value_bits, n_window=N_WINDOW)
    plan = plan.with_layers(
        [dataclasses.replace(lp, key_scale=b.key_scale) for lp, b in zip(plan.layers, base.layers)]
    )
    if flavor == "custom":
        with pytest.raises(ValueError, match="standard-flavor"):
            OrtGenerator(out, plan=plan)
        return
    torch.manual_seed(4)
    ids = torch.randint(3, 96, (1, 62))
    ref, cache = _eager_logits(model, plan, ids, 5)
    gen = OrtGenerator(out, plan=plan)
    got = _ort_logits(gen, ids, 5)
    assert cache.body_bits(1) == gen.body_bits(1)
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=2e-5)


def test_greedy_batch_with_left_padding_matches_generate(model, exported) -> None:
    _, out = exported
    plan = _plan(model)
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    cache = ProgressiveKVCache(plan, model.config)
    with use_pmkvq_attention(model):
        ref = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=30,
            min_new_tokens=30,
            do_sample=False,
            pad_token_id=0,
            **{cache_kwarg(model): cache},
        )[:, 12:]
    got = OrtGenerator(out).generate(ids.numpy(), 30, attention_mask=mask.numpy())
    np.testing.assert_array_equal(got, ref.numpy())


def test_sampling_is_seeded_and_top_k_1_is_greedy(model, exported) -> None:
    _, out = exported
    gen = OrtGenerator(out)
    ids = np.array([[5, 17, 33, 2, 71]])
    a = gen.generate(ids, 20, do_sample=True, temperature=1.5, seed=11)
    b = gen.generate(ids, 20, do_sample=True, temperature=1.5, seed=11)
    c = gen.generate(ids, 20, do_sample=True, temperature=1.5, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (1, 20) and ((a >= 0) & (a < 96)).all()
    greedy = gen.generate(ids, 20)
    np.testing.assert_array_equal(gen.generate(ids, 20, do_sample=True, top_k=1, seed=3), greedy)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate(ids, 4, do_sample=True, top_p=0.0)
