"""Key reparameterization: exact folding (GQA, biases, RoPE commuting), PI key maxima, the alpha search."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from pmkvq_compile import ProgressiveKVCache, use_pmkvq_attention
from pmkvq_compile.calibration import (
    ALPHA_GRID,
    KeyStatistics,
    collect_key_statistics,
    fold_key_scales,
    key_scales_from_max,
    search_key_scales,
)
from pmkvq_compile.models import cache_kwarg
from pmkvq_compile.plan import LayerPlan, Plan
from pmkvq_compile.planning.capture import Recorder, calibration_attention, forward_sample, pi_position_ids
from tests.models import tiny


class _QK(Recorder):
    def __init__(self) -> None:
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}

    def record(self, layer, query, key, value):
        self.q[layer], self.k[layer] = query.detach().clone(), key.detach().clone()
        return query, key, value


def _qk(model, ids, pos) -> _QK:
    rec = _QK()
    with calibration_attention(model, rec), torch.no_grad():
        forward_sample(model, ids, pos)
    return rec


def _scales(model, seed: int = 0) -> list[torch.Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.num_key_value_heads, cfg.head_dim // 2)
    return [torch.exp(2 * torch.randn(shape, generator=g)) for _ in range(cfg.num_hidden_layers)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k biases; both GQA 4 query / 2 KV heads
def test_folding_keeps_qk_and_commutes_with_rope(arch: str) -> None:
    model = tiny(arch)
    ids = torch.randint(0, 96, (33,), generator=torch.Generator().manual_seed(3))
    pos = pi_position_ids(33, 500)
    before = _qk(model, ids, pos)
    with torch.no_grad():
        logits_before = forward_sample(model, ids, pos).logits
    scales = _scales(model)
    fold_key_scales(model, scales)
    after = _qk(model, ids, pos)
    rep = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer, s in enumerate(scales):
        full = torch.cat([s, s], -1)[None, :, None, :]
        # RoPE commutes: the folded model's keys are the original keys divided by s
        want_k, want_q = before.k[layer] / full, before.q[layer] * full.repeat_interleave(rep, 1)
        torch.testing.assert_close(after.k[layer], want_k, rtol=1e-5, atol=1e-6 * float(want_k.abs().max()))
        torch.testing.assert_close(after.q[layer], want_q, rtol=1e-5, atol=1e-6 * float(want_q.abs().max()))
        # q . k per query head and its KV head: unchanged to float32 rounding
        kb, ka = before.k[layer].repeat_interleave(rep, 1), after.k[layer].repeat_interleave(rep, 1)
        sb = before.q[layer] @ kb.transpose(-1, -2)
        sa = after.q[layer] @ ka.transpose(-1, -2)
        torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-4 * float(sb.abs().max()))
    with torch.no_grad():
        torch.testing.assert_close(
            forward_sample(model, ids, pos).logits, logits_before, rtol=1e-4, atol=1e-4
        )


def test_folding_identity_scales_is_a_no_op_and_wrong_shapes_are_refused() -> None:
    model = tiny("llama")
    w = model.model.layers[0].self_attn.k_proj.weight.clone()
    fold_key_scales(model, [torch.ones(2, 8), None])
    assert torch.equal(model.model.layers[0].self_attn.k_proj.weight, w)
    with pytest.raises(ValueError, match="does not fit"):
        fold_key_scales(model, [torch.ones(4, 8), None])
    with pytest.raises(ValueError, match="the model has 2"):
        fold_key_scales(model, [None])


def test_unfolded_scales_in_the_cache_match_the_folded_model() -> None:
    """The cache's unfolded key_scale path and the folded weights are the same function (16-bit cache)."""
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(4))
    model = tiny("qwen2")
    scales = _scales(model, seed=1)
    base = Plan.uniform(model.config, 16, 64, n_window=8)
    unfolded = base.with_layers(
        [LayerPlan(16, 16, lp.budget_bytes, key_scale=s) for lp, s in zip(base.layers, scales)]
    )
    folded_model = tiny("qwen2")
    fold_key_scales(folded_model, scales)
    folded = unfolded.with_layers(unfolded.layers, key_scales_folded=True)
    outs = []
    for m, plan in ((model, unfolded), (folded_model, folded)):
        cache = ProgressiveKVCache(plan, m.config)
        with use_pmkvq_attention(m), torch.no_grad():
            first = m(ids[:, :30], use_cache=True, **{cache_kwarg(m): cache}).logits
            rest = m(ids[:, 30:], use_cache=True, **{cache_kwarg(m): cache}).logits
        outs.append(torch.cat([first, rest], 1))
    with torch.no_grad():
        plain = model(ids).logits
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(outs[0], plain, rtol=2e-3, atol=2e-3)


def test_folding_is_refused_with_qk_norm() -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    with pytest.raises(ValueError, match="fold=False"):
        fold_key_scales(Qwen3ForCausalLM(cfg).eval(), [torch.ones(2, 8)])


def test_key_maxima_with_pi_match_the_cache_keys() -> None:
    model = tiny("llama")
    g = torch.Generator().manual_seed(5)
    samples = [torch.randint(0, 96, (48,), generator=g), torch.randint(0, 96, (30,), generator=g)]
    stats = collect_key_statistics(model, samples, effective_len=480, n_search_samples=1, progress=False)
    want = [torch.zeros(2, 8) for _ in range(2)]
    for ids in samples:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(
                ids[None],
                position_ids=pi_position_ids(ids.numel(), 480),
                use_cache=True,
                **{cache_kwarg(model): cache},
            )
        for layer in range(2):
            a = cache.layers[layer].keys[0].abs()  # [Hkv, T, D]
            want[layer] = torch.maximum(want[layer], torch.maximum(a[..., :8], a[..., 8:]).amax(1))
    for layer in range(2):
        torch.testing.assert_close(stats.key_max[layer], want[layer])
        assert len(stats.captured[layer]) == 1 and stats.captured[layer][0][1].shape == (2, 48, 16)
    plain = collect_key_statistics(model, samples, effective_len=None, progress=False)
    assert not torch.allclose(plain.key_max[0], stats.key_max[0])  # PI changes the keys the maxima see


def test_key_scales_from_max_clamps() -> None:
    m = torch.tensor([[0.0, 1e-9, 4.0, 1e12]])
    torch.testing.assert_close(key_scales_from_max(m, 0.5), torch.tensor([[1e-4, 1e-4, 2.0, 1e4]]))
    assert torch.equal(key_scales_from_max(m, 0.0), torch.ones(1, 4))
    assert ALPHA_GRID[0] == 1.0 and ALPHA_GRID[-1] == pytest.approx(0.05) and len(ALPHA_GRID) == 20


def _synthetic_stats(outlier: float) -> KeyStatistics:
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 64, 16, generator=g)
    k = torch.randn(1, 64, 16, generator=g)
    k[..., 3] *= outlier  # one outlier channel (pair 3)
    k[..., 11] *= outlier
    v = torch.randn(1, 64, 16, generator=g)
    a = k.abs()
    m = torch.maximum(a[..., :8], a[..., 8:]).amax(1)
    return KeyStatistics(key_max=[m], captured=[[(q, k, v)]], scaling=[0.25])


def test_alpha_search_removes_an_outlier_channel() -> None:
    res = search_key_scales(_synthetic_stats(30.0), key_bits=2, group_size=16, progress=False)
    assert res.alphas[0] in ALPHA_GRID and res.alphas[0] > 0
    assert res.mse_best[0] < 0.5 * res.mse_none[0]
    torch.testing.assert_close(
        res.scales[0], key_scales_from_max(_synthetic_stats(30.0).key_max[0], res.alphas[0])
    )


def test_alpha_search_never_worse_than_no_reparam() -> None:
    res = search_key_scales(_synthetic_stats(1.0), key_bits=4, value_bits=4, group_size=16, progress=False)
    assert res.mse_best[0] <= res.mse_none[0]
    with pytest.raises(ValueError, match="target bits"):
        search_key_scales(_synthetic_stats(1.0), key_bits=3, group_size=16)
