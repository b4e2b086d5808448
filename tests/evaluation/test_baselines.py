"""The baseline caches against their own formulas: quantized values and byte counts, re-derived here."""

from __future__ import annotations

import pytest
import torch

from pmkvq_compile.evaluation.baselines import (
    BaselineCache,
    KIVIConfig,
    KIVILayer,
    RTNConfig,
    RTNLayer,
    kivi_bytes,
    kv_nbytes,
    rtn_bytes,
)
from pmkvq_compile.evaluation.methods import KIVI_KEY_GROUPS, build_methods, fit_kivi, peak_bytes
from pmkvq_compile.models import cache_kwarg
from pmkvq_compile.plan import ModelGeometry, Plan
from tests.models import tiny

GEO = ModelGeometry("llama", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, hidden_size=128)


def _kv(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, GEO.num_kv_heads, n, GEO.head_dim, generator=g) * 3
    k[..., 5] += 20  # an outlier channel, as real keys have
    v = torch.randn(1, GEO.num_kv_heads, n, GEO.head_dim, generator=g)
    return k, v


def _feed(
    layer, k: torch.Tensor, v: torch.Tensor, sizes: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    outs, s = [], 0
    for t in sizes:
        outs.append(layer.update(k[:, :, s : s + t], v[:, :, s : s + t]))
        s += t
    return outs


def _rtn_ref(x: torch.Tensor, bits: int, gs: int) -> torch.Tensor:
    """Per-token asymmetric RTN written out: scale = (max - min) / (2^b - 1), zero = -min, round half up."""
    xg = x.reshape(*x.shape[:-1], -1, gs)
    mn, mx = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    scale = ((mx - mn) / (2**bits - 1)).clamp(1e-5, 1e5)
    q = torch.floor((xg - mn) / scale + 0.5).clamp(0, 2**bits - 1)
    return (q * scale + mn).reshape(x.shape)


def _per_channel_ref(x: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """KIVI keys written out: one (min, max) per channel over each group of g tokens."""
    out = torch.empty_like(x)
    for s in range(0, x.shape[2], g):
        xg = x[:, :, s : s + g]
        mn, mx = xg.amin(2, keepdim=True), xg.amax(2, keepdim=True)
        scale = ((mx - mn) / (2**bits - 1)).clamp(1e-5, 1e5)
        q = torch.floor((xg - mn) / scale + 0.5).clamp(0, 2**bits - 1)
        out[:, :, s : s + g] = q * scale + mn
    return out


@pytest.mark.parametrize("bits,gs", [(4, 32), (2, 16), (8, 8)])
def test_rtn_stores_each_token_by_the_rtn_formula_and_counts_its_bytes(bits: int, gs: int) -> None:
    k, v = _kv(45)
    layer = RTNLayer(RTNConfig(bits, gs), GEO, capacity=64)
    sizes = [17, 1, 1, 9, 17]
    outs = _feed(layer, k, v, sizes)
    kd, vd = layer.dequantized()
    torch.testing.assert_close(kd, _rtn_ref(k, bits, gs), rtol=0, atol=1e-4)
    torch.testing.assert_close(vd, _rtn_ref(v, bits, gs), rtol=0, atol=1e-4)
    # every update returns the stored past and its own tokens exactly as given
    s = 0
    for (ko, vo), t in zip(outs, sizes):
        torch.testing.assert_close(ko[:, :, :s], kd[:, :, :s])
        assert torch.equal(ko[:, :, s:], k[:, :, s : s + t]) and torch.equal(vo[:, :, s:], v[:, :, s : s + t])
        s += t
    # bytes: per token and KV head, D codes of `bits` for K and for V + float32 scale and zero per group
    expect = 45 * GEO.num_kv_heads * (2 * GEO.head_dim * bits / 8 + 2 * 2 * 4 * (GEO.head_dim // gs))
    assert layer.nbytes() == expect == rtn_bytes(RTNConfig(bits, gs), GEO, 45)
    assert (kd - k).abs().max() > 1e-3  # really quantized


@pytest.mark.parametrize("bits,g,r,vg", [(2, 4, 8, 16), (4, 8, 8, 32), (2, 8, 16, 8)])
def test_kivi_keys_per_channel_values_per_token_and_fp16_residuals(
    bits: int, g: int, r: int, vg: int
) -> None:
    cfg = KIVIConfig(bits=bits, key_group=g, value_group=vg, residual=r)
    k, v = _kv(53, seed=1)
    layer = KIVILayer(cfg, GEO, capacity=64)
    sizes = [13, 1, 1, 1, 20, 3, 14]
    _feed(layer, k, v, sizes)
    n = sum(sizes)
    kd, vd = layer.dequantized()
    kq = (n // r) * r  # keys are quantized whenever `residual` of them accumulated
    k16, v16 = k.half().float(), v.half().float()
    torch.testing.assert_close(kd[:, :, :kq], _per_channel_ref(k16[:, :, :kq], bits, g), rtol=0, atol=1e-4)
    assert torch.equal(kd[:, :, kq:], k16[:, :, kq:n])
    vq = n - r  # values: all but the latest `residual` are quantized per token
    torch.testing.assert_close(vd[:, :, :vq], _rtn_ref(v16[:, :, :vq], bits, vg), rtol=0, atol=1e-4)
    assert torch.equal(vd[:, :, vq:], v16[:, :, vq:n])
    assert layer.n_kq == kq and layer.n_vq == vq


def test_kivi_bytes_follow_the_formula_at_every_length() -> None:
    cfg = KIVIConfig(bits=2, key_group=4, value_group=16, residual=8)
    k, v = _kv(40, seed=2)
    layer = KIVILayer(cfg, GEO, capacity=40)
    h, d = GEO.num_kv_heads, GEO.head_dim
    seen = []
    for i in range(40):
        layer.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
        n = i + 1
        kq, vq = (n // 8) * 8, max(n - 8, 0)
        expect = h * (
            kq * d * 2 / 8
            + (kq // 4) * d * 8  # key codes + per-channel float32 scale/zero per 4-token group
            + vq * d * 2 / 8
            + vq * (d // 16) * 8  # value codes + per-token float32 scale/zero per 16 channels
            + ((n - kq) + (n - vq)) * d * 2  # float16 residuals
        )
        assert layer.nbytes() == expect == kivi_bytes(cfg, GEO, n)
        seen.append(layer.nbytes())
    assert peak_bytes(lambda n: kivi_bytes(cfg, GEO, n), 40) == max(seen)


def test_fit_kivi_takes_the_largest_residual_that_fits() -> None:
    plan = Plan.uniform(GEO, 4, 600, n_window=32)
    budget = plan.total_budget_bytes
    cfg, peak = fit_kivi(4, budget, GEO, 600, value_group=32)
    assert peak <= budget
    assert peak == GEO.num_layers * peak_bytes(lambda n: kivi_bytes(cfg, GEO, n), 600)
    for g in KIVI_KEY_GROUPS:  # nothing with a longer residual fits
        for r in range(cfg.residual + g - cfg.residual % g, 129, g):
            other = KIVIConfig(4, g, 32, r)
            assert GEO.num_layers * peak_bytes(lambda n, o=other: kivi_bytes(o, GEO, n), 600) > budget
    _tight, tight_peak = fit_kivi(2, 1000, GEO, 600, value_group=32)  # nothing fits: the cheapest one
    assert tight_peak > 1000


def test_baseline_cache_in_a_model_and_byte_counts() -> None:
    model = tiny("llama")
    ids = torch.randint(3, 96, (1, 30))
    cache = BaselineCache(RTNConfig(4, 16), model.config, max_len=40)
    key = cache_kwarg(model)
    with torch.no_grad():
        model(ids[:, :20], **{key: cache})
        model(ids[:, 20:], **{key: cache})
    geo = ModelGeometry.from_config(model.config)
    assert cache.get_seq_length() == 30
    assert kv_nbytes(cache) == geo.num_layers * rtn_bytes(RTNConfig(4, 16), geo, 30)
    with pytest.raises(ValueError, match="exceed the cache capacity 40"), torch.no_grad():
        model(torch.randint(3, 96, (1, 11)), **{key: cache})


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"RTN bits=16 is not supported; expected one of \[8, 4, 2\]"):
        RTNConfig(16, 32)
    with pytest.raises(ValueError, match="residual=12 must be a multiple of key_group=8"):
        KIVIConfig(2, 8, 32, 12)
    with pytest.raises(ValueError, match="group_size=24 must divide head_dim=32"):
        RTNLayer(RTNConfig(4, 24), GEO, 8)
    with pytest.raises(ValueError, match="unknown method kinds"):
        build_methods(GEO, [4], 64, kinds=("gptq",))
    with pytest.raises(ValueError, match=r"budget bits \[3\] are not supported"):
        build_methods(GEO, [3], 64)
    with pytest.raises(ValueError, match="needs a calibrated plan"):
        build_methods(GEO, [4], 64, window=8, kinds=("pmkvq-calibrated",))


def test_float16_scale_method_has_the_same_bytes_and_keeps_more_bits() -> None:
    """``pmkvq-f16s-b``: the uniform plan with float16 scales, given the float32 plan's bytes per layer; fed the
    same tokens, its body is never at fewer bits than the float32 plan's, and it drops later."""
    ms = {m.name: m for m in build_methods(GEO, [2], 600, window=32, kinds=("pmkvq-uniform", "pmkvq-f16s"))}
    u, h = ms["pmkvq-uniform-2"], ms["pmkvq-f16s-2"]
    assert h.budget_bytes == u.budget_bytes == h.peak_bytes == u.peak_bytes
    assert h.settings["scale_dtype"] == "float16" and u.settings["scale_dtype"] == "float32"
    cu, ch = u.make_cache(), h.make_cache()
    k, v = _kv(600, seed=3)
    later = 0
    for t in range(0, 600, 8):
        cu.update(k[:, :, t : t + 8], v[:, :, t : t + 8], 0)
        ch.update(k[:, :, t : t + 8], v[:, :, t : t + 8], 0)
        bu, bh = cu.body_bits(0), ch.body_bits(0)
        assert bh >= bu and ch.nbytes(0) <= ch.layers[0].lp.budget_bytes
        later += bh > bu
    assert later > 0 and ch.body_bits(0) == (2, 2)
