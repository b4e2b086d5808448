"""The progressive cache against a transcription of PMKVQ.md's rules, written independently of cache.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pmkvq_compile import (
    BudgetExceededError,
    ModelGeometry,
    Plan,
    PlanMismatchError,
    ProgressiveKVCache,
    quant,
)
from pmkvq_compile.attention import pmkvq_attention_forward

GEO = ModelGeometry("llama", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64)
LEVELS = [16, 8, 4, 2]


def reference_state(plan: Plan, n_tokens: int) -> tuple[int, int, int]:
    """(sink tokens, body chunks, body bits) after ``n_tokens``: the paper's rule, for uniform K = V bits.

    Tokens fill the sink, then the window; a full window becomes a body chunk; after each chunk, while
    sink + full window + body exceed the budget, the whole body goes one level down 16 -> 8 -> 4 -> 2.
    """
    hkv, d, groups = (
        plan.geometry.num_kv_heads,
        plan.geometry.head_dim,
        plan.geometry.head_dim // plan.group_size,
    )

    def tok(b: int) -> int:
        return hkv * (2 * d * b // 8 + 16 * groups)

    budget = plan.layers[0].budget_bytes
    sink = min(n_tokens, plan.n_sink)
    chunks = max(n_tokens - plan.n_sink, 0) // plan.n_window
    level = 0
    for c in range(1, chunks + 1):
        while (
            plan.n_sink * tok(16) + plan.n_window * tok(16) + c * plan.n_window * tok(LEVELS[level]) > budget
        ):
            level += 1
            if level == len(LEVELS):
                raise AssertionError("reference overflow")
    return sink, chunks, LEVELS[level]


def reference_dequant(x: torch.Tensor, bits: int, gs: int) -> torch.Tensor:
    """Quantize at 16 bits, ERS down to ``bits``, dequantize (x: [B, H, T, D])."""
    q, s, z = quant.quantize(x, 16, gs)
    b = 16
    while b > bits:
        q, s = quant.requantize(q, s, b)
        b //= 2
    return quant.dequantize(q, s, z, gs)


def reference_cache_contents(plan: Plan, k: torch.Tensor) -> torch.Tensor:
    sink, chunks, bits = reference_state(plan, k.shape[2])
    gs = plan.group_size
    out = reference_dequant(k, 16, gs)  # sink and window tokens: 16-bit codes
    body = slice(sink, sink + chunks * plan.n_window)
    out[:, :, body] = reference_dequant(k[:, :, body], bits, gs)
    return out


def make_plan(bits: int = 2, max_len: int = 40, **kw) -> Plan:
    return Plan.uniform(GEO, bits, max_len, n_sink=kw.pop("n_sink", 1), n_window=kw.pop("n_window", 4), **kw)


@pytest.mark.parametrize("bits, n_sink", [(2, 1), (4, 1), (8, 0), (2, 3)])
def test_progression_token_by_token(bits: int, n_sink: int) -> None:
    torch.manual_seed(bits)
    plan = make_plan(bits, 41, n_sink=n_sink)
    cache = ProgressiveKVCache(plan, GEO)
    k = torch.randn(2, 2, 41, 16) * 2
    v = torch.randn(2, 2, 41, 16)
    seen_bits = []
    pos = 0
    for step in [7, *([1] * 34)]:
        for layer in range(2):
            cache.update(k[:, :, pos : pos + step], v[:, :, pos : pos + step], layer)
        pos += step
        _, _, ref_bits = reference_state(plan, pos)
        assert cache.body_bits(0) == (ref_bits, ref_bits)
        assert cache.nbytes(0) <= plan.layers[0].budget_bytes
        kd, vd = cache.layers[1].dequantized()
        assert torch.equal(kd, reference_cache_contents(plan, k[:, :, :pos]))
        assert torch.equal(vd, reference_cache_contents(plan, v[:, :, :pos]))
        seen_bits.append(ref_bits)
    # the body really progressed down to the plan's bits and never further
    assert seen_bits[0] == 16 and seen_bits[-1] == bits
    assert cache.get_seq_length() == 41


@pytest.mark.parametrize("bits", [2, 8])
def test_progression_with_float16_scales(bits: int) -> None:
    """``scale_dtype="float16"``: the body follows the same rule with 8 fewer bytes per token and head at
    <= 8 bits; what it holds is the float32-scale cache's contents up to float16 rounding of each stored
    scale and zero (2^-11 relative, compounded by at most 3 ERS levels), and it equals, bit for bit, the
    arena reference (kernels/reference.py, the ops' CPU path: a separate implementation) fed the same
    tokens."""
    from pmkvq_compile.kernels import reference as ref
    from pmkvq_compile.kernels.layout import ArenaLayout

    torch.manual_seed(bits + 1)
    plan = make_plan(bits, 41, scale_dtype="float16")
    assert plan.token_bytes(bits, bits) == 2 * (2 * 16 * bits // 8 + 8)
    cache = ProgressiveKVCache(plan, GEO)
    lay = ArenaLayout.from_plan(plan, 0)
    arena = torch.zeros(2, lay.budget_bytes, dtype=torch.uint8)
    state, table = lay.initial_state(), lay.empty_table()
    k = torch.randn(2, 2, 41, 16) * 2
    v = torch.randn(2, 2, 41, 16)
    plan32 = make_plan(bits, 41)
    pos = compared = compared_low = 0
    for step in [7, *([1] * 34)]:
        cache.update(k[:, :, pos : pos + step], v[:, :, pos : pos + step], 0)
        ref.append(
            arena, state, table, k[:, :, pos : pos + step], v[:, :, pos : pos + step], None, lay.to_list()
        )
        pos += step
        kd, vd = cache.layers[0].dequantized()
        kr, vr = ref.dequantize_past(arena, state, table, lay.to_list(), pos)
        assert torch.equal(kd, kr) and torch.equal(vd, vr)
        assert cache.body_bits(0) == tuple(state[3:5].tolist())
        assert cache.nbytes(0) <= plan.layers[0].budget_bytes
        # against the float32-scale contents where that cache's body has the same bits: each stored value
        # is within 4 roundings of 2^-11 (relative to the values' range)
        if reference_state(plan32, pos)[2] == cache.body_bits(0)[0]:
            k32 = reference_cache_contents(plan32, k[:, :, :pos])
            assert (kd - k32).abs().max() <= 4 * 2**-11 * 2 * k[:, :, :pos].abs().amax()
            compared += 1
            compared_low += cache.body_bits(0)[0] <= 8
    assert cache.body_bits(0) == (bits, bits) and compared >= 10 and compared_low >= 3
    # the smaller scales let the same budget hold more tokens at higher bits: never fewer bits than float32
    assert plan.layers[0].budget_bytes < make_plan(bits, 41).layers[0].budget_bytes


def test_prefill_at_once_equals_token_by_token() -> None:
    torch.manual_seed(0)
    plan = make_plan(4, 40)
    k, v = torch.randn(1, 2, 37, 16), torch.randn(1, 2, 37, 16)
    a, b = ProgressiveKVCache(plan, GEO), ProgressiveKVCache(plan, GEO)
    a.update(k, v, 0)
    for t in range(37):
        b.update(k[:, :, t : t + 1], v[:, :, t : t + 1], 0)
    la, lb = a.layers[0], b.layers[0]
    assert la.chunk_bits == lb.chunk_bits == [(4, 4)] * 9
    used = slice(la.body_offset, la.body_offset + la.body_bytes())  # free space may hold stale bytes
    assert torch.equal(la.arena[:, used], lb.arena[:, used])
    assert all(torch.equal(x, y) for x, y in zip(la.dequantized(), lb.dequantized()))


def test_nbytes_counts_codes_scales_and_zeros() -> None:
    plan = make_plan(2, 40)
    cache = ProgressiveKVCache(plan, GEO)
    cache.update(torch.randn(1, 2, 11, 16), torch.randn(1, 2, 11, 16), 0)
    # 1 sink + 2 chunks of 4 (body) + 2 in the window; at 11 tokens the body is still 16-bit
    tok16 = 2 * (2 * 16 * 2 + 16)
    assert cache.body_bits(0) == (16, 16)
    assert cache.nbytes(0) == 1 * tok16 + 8 * tok16 + 2 * tok16
    assert cache.nbytes() == cache.nbytes(0)  # layer 1 holds nothing yet


def test_budget_exceeded_leaves_cache_untouched() -> None:
    torch.manual_seed(0)
    plan = make_plan(2, 40)
    cache = ProgressiveKVCache(plan, GEO)
    cache.update(torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16), 0)
    layer = cache.layers[0]
    before = (layer.arena.clone(), layer.n_tokens, layer.window_len, list(layer.chunk_bits), layer.body_bits)
    with pytest.raises(
        BudgetExceededError, match=r"layer 0: 41 tokens need [\d,]+ bytes .* budget is [\d,]+ bytes"
    ):
        cache.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), 0)
    after = (layer.arena, layer.n_tokens, layer.window_len, layer.chunk_bits, layer.body_bits)
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:]
    assert cache.nbytes(0) <= plan.layers[0].budget_bytes


def test_body_holds_chunks_of_different_bits_side_by_side() -> None:
    torch.manual_seed(0)
    plan = make_plan(2, 200)
    cache = ProgressiveKVCache(plan, GEO, batch_size=2)
    layer = cache.layers[0]
    bits = [(16, 16), (4, 2), (2, 8), (8, 4)]
    segs = layer.chunk_segments(bits)
    # compact: each chunk starts where the previous ends
    for a, b, (kb, vb) in zip(segs, segs[1:], bits):
        assert b.offset == a.offset + plan.chunk_bytes(kb, vb)
    written = []
    for seg, (kb, vb) in zip(segs, bits):
        k, v = torch.randn(2, 2, 4, 16), torch.randn(2, 2, 4, 16)
        kq, ks, kz = quant.quantize(k, kb, 16)
        vq, vs, vz = quant.quantize(v, vb, 16)
        layer._write(seg, 0, kq, ks, kz, vq, vs, vz)
        written.append((kq, ks, kz, vq, vs, vz))
    for seg, parts in zip(segs, written):
        for got, exp in zip(layer._read(seg, 4), parts):
            assert torch.equal(got, exp)


def test_attention_reads_past_from_cache_and_new_tokens_in_full_precision() -> None:
    torch.manual_seed(0)
    plan = make_plan(2, 40)
    cache = ProgressiveKVCache(plan, GEO)
    k, v = torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    cache.update(k[:, :, :29], v[:, :, :29], 0)
    kn, vn = cache.update(k[:, :, 29:], v[:, :, 29:], 0)
    q = torch.randn(1, 4, 1, 16)
    module = torch.nn.Module()
    out, _ = pmkvq_attention_forward(module, q, kn, vn, None, scaling=0.25)
    kr = torch.cat([reference_cache_contents(plan, k[:, :, :29]), k[:, :, 29:]], dim=2)
    vr = torch.cat([reference_cache_contents(plan, v[:, :, :29]), v[:, :, 29:]], dim=2)
    exp = F.scaled_dot_product_attention(
        q, kr.repeat_interleave(2, 1), vr.repeat_interleave(2, 1), scale=0.25
    )
    torch.testing.assert_close(out, exp.transpose(1, 2), rtol=1e-5, atol=1e-6)
    # and it differs from attention over the unquantized past: the cache is really read
    plain = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), scale=0.25
    )
    assert (out - plain.transpose(1, 2)).abs().max() > 1e-3


def test_key_scale_keeps_attention_and_flattens_keys() -> None:
    torch.manual_seed(0)
    base = make_plan(16, 40)
    scale = torch.rand(2, 8) * 3 + 0.2
    layers = [type(lp)(lp.key_bits, lp.value_bits, lp.budget_bytes, key_scale=scale) for lp in base.layers]
    scaled = base.with_layers(layers)
    k, v, q = torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 4, 1, 16)
    outs = []
    for plan in (base, scaled):
        cache = ProgressiveKVCache(plan, GEO)
        cache.update(k[:, :, :11], v[:, :, :11], 0)
        kn, vn = cache.update(k[:, :, 11:], v[:, :, 11:], 0)
        outs.append(pmkvq_attention_forward(torch.nn.Module(), q, kn, vn, None)[0])
        kd, _ = cache.layers[0].dequantized()
        if plan is scaled:  # stored keys are K / s (both channels of a rotary pair)
            s_full = torch.cat([scale, scale], -1)[None, :, None, :]
            torch.testing.assert_close(kd[:, :, :11], k[:, :, :11] / s_full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_bad_input_is_refused() -> None:
    plan = make_plan(4, 40)
    cache = ProgressiveKVCache(plan, GEO, batch_size=2)
    with pytest.raises(ValueError, match=r"expected key/value states \[B, 2, T, 16\]"):
        cache.update(torch.randn(2, 3, 1, 16), torch.randn(2, 3, 1, 16), 0)
    with pytest.raises(ValueError, match="cache holds batch 2, got batch 1"):
        cache.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), 0)
    assert cache.get_seq_length() == 0
    other = ModelGeometry("llama", 2, 4, 1, 16, 64)
    with pytest.raises(PlanMismatchError):
        ProgressiveKVCache(plan, other)
    with pytest.raises(ValueError, match=r"plan must be a pmkvq_compile\.Plan"):
        ProgressiveKVCache("plan.json", GEO)  # type: ignore[arg-type]


def test_layer_budget_the_arena_cannot_hold_is_refused() -> None:
    """The cache takes its byte layout from ArenaLayout; a layer budget below sink + window or not
    divisible by 4 is refused with the layer named."""
    plan = make_plan(2, 40)
    small = plan.sink_bytes + plan.window_bytes - 4
    for budget, msg in (
        (small, "is below sink \\+ window"),
        (plan.layers[1].budget_bytes + 2, "must be divisible by 4"),
    ):
        lp = dataclasses.replace(plan.layers[1], budget_bytes=budget)
        bad = dataclasses.replace(plan, layers=(plan.layers[0], lp, *plan.layers[2:]))
        with pytest.raises(ValueError, match=f"layer 1: budget_bytes={budget} {msg}"):
            ProgressiveKVCache(bad, GEO)


def test_preallocated_memory_is_the_budget() -> None:
    plan = make_plan(4, 40)
    cache = ProgressiveKVCache(plan, GEO, batch_size=3)
    assert cache.allocated_bytes() == 3 * plan.total_budget_bytes
    ptrs = [lay.arena.data_ptr() for lay in cache.layers]
    for _ in range(40):
        for layer in range(2):
            cache.update(torch.randn(3, 2, 1, 16), torch.randn(3, 2, 1, 16), layer)
    assert [lay.arena.data_ptr() for lay in cache.layers] == ptrs  # never reallocated
    assert cache.allocated_bytes() == 3 * plan.total_budget_bytes
