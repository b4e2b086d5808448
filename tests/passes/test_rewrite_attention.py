"""The graph passes on a gpt-fast-style decoder: graph shape, numbers against the eager progressive cache,
declines, and no recompiles."""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo

from pmkvq_compile import ModelGeometry, Plan, ProgressiveKVCache, backend
from tests.gptfast import Transformer

SDPA = torch._C._nn.scaled_dot_product_attention


def _plan(model: Transformer, bits: int, max_len: int, **kw) -> Plan:
    geo = ModelGeometry("gptfast", **model.geometry)
    return Plan.uniform(geo, bits, max_len, n_window=kw.pop("n_window", 8), **kw)


def _capture(be):
    """Wrap a backend to keep the rewritten graph modules."""
    graphs = []
    inner = be.compiler

    def keep(gm, inputs):
        graphs.append(gm)
        return gm.forward

    be.compiler = keep if inner == "eager" else inner
    return graphs


def _run_decode(f, ids: torch.Tensor, prefill: int, steps: int) -> torch.Tensor:
    out = [f(ids[:, :prefill], torch.arange(prefill))]
    for t in range(prefill, prefill + steps):
        out.append(f(ids[:, t : t + 1], torch.arange(t, t + 1)))
    return torch.cat(out, dim=1)


def _reference(model: Transformer, plan: Plan, ids: torch.Tensor, prefill: int, steps: int) -> torch.Tensor:
    cache = ProgressiveKVCache(plan, plan.geometry)
    model.use_reference_cache(cache)
    try:
        return _run_decode(model, ids, prefill, steps)
    finally:
        model.use_reference_cache(None)


@pytest.mark.parametrize("bits", [16, 4, 2])
def test_rewritten_graph_matches_eager_progressive_cache(bits: int) -> None:
    torch._dynamo.reset()
    model = Transformer(dim=64, heads=4, kv_heads=2, layers=2, max_len=80).eval()
    plan = _plan(model, bits, 80)
    be = backend(plan, compiler="eager")
    graphs = _capture(be)
    f = torch.compile(model, backend=be, fullgraph=True)
    ids = torch.randint(0, 64, (1, 80))
    with torch.no_grad():
        got = _run_decode(f, ids, 13, 60)
        ref = _reference(model, plan, ids, 13, 60)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    if bits < 16:  # the body really went down, so the comparison covered requantization
        assert be.body_bits(0) == (bits, bits)
    assert be.nbytes(0) <= plan.layers[0].budget_bytes
    # graph: pmkvq ops in, SDPA, float-cache writes and GQA expansion out
    for gm in graphs:
        targets = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
        assert SDPA not in targets
        assert not any(str(t) in ("repeat_interleave", "<built-in function setitem>") for t in targets)
        assert targets.count(torch.ops.pmkvq.append.default) == 2
        attn = [t for t in targets if t in (torch.ops.pmkvq.decode_attention.default,
                                            torch.ops.pmkvq.prefill_attention.default)]  # fmt: skip
        assert len(attn) == 2
        cache_inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and "k_cache" in n.name]
        assert all(not n.users for n in cache_inputs)  # the float cache is neither read nor written


def test_quantized_graph_really_differs_from_float_attention() -> None:
    torch._dynamo.reset()
    model = Transformer(dim=64, heads=4, kv_heads=2, layers=2, max_len=80).eval()
    f = torch.compile(model, backend=backend(_plan(model, 2, 80), compiler="eager"), fullgraph=True)
    ids = torch.randint(0, 64, (1, 80))
    with torch.no_grad():
        got = _run_decode(f, ids, 13, 60)
        plain = model(ids[:, :73], torch.arange(73))
    assert (got[:, 40:] - plain[:, 40:]).abs().max() > 1e-3


def test_no_recompiles_over_200_steps_and_bit_drops() -> None:
    torch._dynamo.reset()
    model = Transformer(dim=64, heads=4, kv_heads=2, layers=2, max_len=224).eval()
    plan = _plan(model, 2, 224)
    be = backend(plan, compiler="eager")
    f = torch.compile(model, backend=be, fullgraph=True)
    ids = torch.randint(0, 64, (1, 224))
    seen = set()
    with torch.no_grad():
        f(ids[:, :16], torch.arange(16))
        for t in range(16, 220):
            f(ids[:, t : t + 1], torch.arange(t, t + 1))
            seen.add(be.body_bits(1))
    assert {(16, 16), (8, 8), (4, 4), (2, 2)} <= seen  # every level was crossed while decoding
    assert len(be.contexts) == 2  # one prefill graph, one decode graph: no recompiles
    # a new sequence (position 0) restarts the cache instead of appending
    with torch.no_grad():
        f(ids[:, :16], torch.arange(16))
    assert be.body_bits(1) == (16, 16) and len(be.contexts) == 2


def test_cat_cache_is_rewritten() -> None:
    torch._dynamo.reset()
    model = Transformer(dim=64, heads=4, kv_heads=2, layers=2, max_len=64).eval()
    plan = _plan(model, 4, 64)
    be = backend(plan, compiler="eager")
    f = torch.compile(model.forward_cat, backend=be, fullgraph=True)
    ids = torch.randint(0, 64, (1, 48))
    empty = [(torch.zeros(1, 2, 0, 16), torch.zeros(1, 2, 0, 16)) for _ in range(2)]
    with torch.no_grad():
        logits, past = f(ids[:, :10], torch.arange(10), empty)
        outs = [logits]
        for t in range(10, 48):
            logits, past = f(ids[:, t : t + 1], torch.arange(t, t + 1), past)
            outs.append(logits)
        got = torch.cat(outs, 1)
        ref = _reference(model, plan, ids, 10, 38)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert all(len(c.sites) == 2 for c in be.contexts)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(mask="sliding"), "a mask that is not the causal mask"),
        (dict(dropout=0.1), "attention with dropout_p=0.1"),
    ],
)
def test_declined_nodes_stay_unchanged(kwargs, reason: str, caplog) -> None:
    torch._dynamo.reset()
    model = Transformer(dim=64, heads=4, kv_heads=2, layers=2, max_len=64, **kwargs).eval()
    be = backend(_plan(model, 2, 64), compiler="eager")
    graphs = _capture(be)
    f = torch.compile(model, backend=be, fullgraph=True)
    ids = torch.randint(0, 64, (1, 20))
    with caplog.at_level(logging.WARNING, logger="pmkvq_compile.passes"), torch.no_grad():
        got = f(ids, torch.arange(20))
    assert len(be.contexts[0].declined) == 2 and not be.contexts[0].sites
    assert all(reason in r for _, r in be.contexts[0].declined)
    assert sum("leaving" in rec.message and reason in rec.message for rec in caplog.records) == 2
    targets = [n.target for n in graphs[0].graph.nodes]
    assert targets.count(SDPA) == 2 and torch.ops.pmkvq.append.default not in targets
    if "dropout" not in kwargs:
        with torch.no_grad():
            torch.testing.assert_close(got, model(ids, torch.arange(20)), rtol=0, atol=0)


def test_cross_attention_is_declined_and_self_attention_served() -> None:
    torch._dynamo.reset()
    model = Transformer(dim=64, heads=4, kv_heads=2, layers=3, max_len=64, cross_layer=1).eval()
    be = backend(_plan(model, 4, 64), compiler="eager")
    f = torch.compile(model, backend=be, fullgraph=True)
    memory = torch.randn(1, 7, 64)
    with torch.no_grad():
        f(torch.randint(0, 64, (1, 9)), torch.arange(9), memory)
    ctx = be.contexts[0]
    assert sorted(s.layer for s in ctx.sites) == [0, 2]
    assert len(ctx.declined) == 1 and "no KV-cache write feeds K/V" in ctx.declined[0][1]


def test_backend_refuses_bad_arguments() -> None:
    model = Transformer()
    with pytest.raises(ValueError, match="compiler='tvm'"):
        backend(_plan(model, 4, 64), compiler="tvm")
    with pytest.raises(ValueError, match=r"plan must be a pmkvq_compile\.Plan"):
        backend("plan.json")  # type: ignore[arg-type]


def test_inductor_custom_pass_in_an_existing_pipeline() -> None:
    """The pass as Inductor's post-grad custom pass (ATen SDPA, functional index_put writes) under the default
    ``torch.compile`` backend, against the eager progressive cache; uuid() hashes the source and the plan."""
    import torch._inductor.config as inductor_config

    from pmkvq_compile import inductor_pass

    torch._dynamo.reset()
    model = Transformer(dim=64, heads=4, kv_heads=2, layers=2, max_len=64).eval()
    plan = _plan(model, 4, 64)
    p = inductor_pass(plan)
    assert p.uuid() == p.uuid() and p.uuid() != inductor_pass(_plan(model, 2, 64)).uuid()
    f = torch.compile(model, fullgraph=True)
    ids = torch.randint(0, 64, (1, 40))
    with inductor_config.patch(post_grad_custom_post_pass=p), torch.no_grad():
        got = _run_decode(f, ids, 10, 30)
        ref = _reference(model, plan, ids, 10, 30)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert [len(c.sites) for c in p.contexts] == [2, 2] and not any(c.declined for c in p.contexts)
    assert p.states[0].state[0].item() == 40 and tuple(p.states[0].state[3:5].tolist()) == (8, 8)


def test_unfolded_key_scales_are_applied() -> None:
    torch._dynamo.reset()
    model = Transformer(dim=64, heads=4, kv_heads=2, layers=2, max_len=80).eval()
    base = _plan(model, 4, 80)
    g = torch.Generator().manual_seed(0)
    layers = [
        type(lp)(
            lp.key_bits, lp.value_bits, lp.budget_bytes, key_scale=torch.rand(2, 8, generator=g) * 2 + 0.3
        )
        for lp in base.layers
    ]
    plan = base.with_layers(layers)
    f = torch.compile(model, backend=backend(plan, compiler="eager"), fullgraph=True)
    ids = torch.randint(0, 64, (1, 60))
    with torch.no_grad():
        got = _run_decode(f, ids, 9, 50)
        ref = _reference(model, plan, ids, 9, 50)
        unscaled = _reference(model, base, ids, 9, 50)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert (ref - unscaled).abs().max() > 1e-4  # the scales changed what was quantized


def test_transformers_static_cache_graphs_are_matched_and_inconsistency_refused() -> None:
    """HF StaticCache: index_copy_ writes, prefix slices, enable_gqa (prefill) and repeat_kv (decode) are matched;
    its decode mask is not the causal-mask buffer, so decode is declined, and the backend refuses to serve a layer
    from the packed cache in one graph and the float cache in another."""
    from transformers import StaticCache

    from tests.models import tiny

    torch._dynamo.reset()
    model = tiny("llama")
    plan = Plan.uniform(model.config, 4, 64, n_window=8)
    be = backend(plan, compiler="eager")
    f = torch.compile(model, backend=be, fullgraph=True)
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        f(torch.randint(3, 96, (1, 5)), past_key_values=cache, use_cache=True)
        prefill = be.contexts[0]
        if prefill.sites:  # transformers versions whose prefill calls SDPA with is_causal and enable_gqa
            assert sorted(s.layer for s in prefill.sites) == [0, 1]
            with pytest.raises(
                Exception, match="served from the packed cache in one graph but declined in another"
            ):
                f(torch.randint(3, 96, (1, 1)), past_key_values=cache, use_cache=True)
        else:  # versions that pass a mask in prefill too: declined for the mask, so the write was matched
            assert len(prefill.declined) == 2
            assert all("not the causal mask" in reason for _, reason in prefill.declined)


def test_slice_assignment_cache_is_rewritten() -> None:
    """``cache[:, :, a:b] = x`` with Python-int positions (Dynamo specialises each graph on ``a``)."""
    torch._dynamo.reset()
    model = Transformer(dim=64, heads=4, kv_heads=2, layers=2, max_len=64).eval()
    plan = _plan(model, 4, 64)
    for blk in model.layers:
        blk.attention.kv_cache.slice_writes = True
    be = backend(plan, compiler="eager")
    graphs = _capture(be)
    f = torch.compile(model, backend=be, fullgraph=True)
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        got = _run_decode(f, ids, 10, 6)
    for blk in model.layers:
        blk.attention.kv_cache.slice_writes = False
    with torch.no_grad():
        ref = _reference(model, plan, ids, 10, 6)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert all(len(c.sites) == 2 and not c.declined for c in be.contexts)
    for gm in graphs:
        assert not any(n.target is SDPA for n in gm.graph.nodes)


def test_glue_ops_pass_opcheck_and_reset_exactly() -> None:
    """``pmkvq::restart`` / ``restart_always`` (wired in by the rewrite) against their definition."""
    state = torch.tensor([40, 7, 4, 8, 8, 0, 0, 0], dtype=torch.int32)
    for positions, expected in [
        (torch.arange(5, 9), state.tolist()),  # a continuing sequence: unchanged
        (torch.arange(0, 4), [0, 0, 0, 16, 16, 0, 0, 0]),  # position 0 starts over
    ]:
        s = state.clone()
        torch.ops.pmkvq.restart(s, positions, 16)
        assert s.tolist() == expected
        torch.library.opcheck(torch.ops.pmkvq.restart.default, (state.clone(), positions, 16))
    s = state.clone()
    torch.ops.pmkvq.restart_always(s, 8)
    assert s.tolist() == [0, 0, 0, 8, 8, 0, 0, 0]
    torch.library.opcheck(torch.ops.pmkvq.restart_always.default, (state.clone(), 8))
