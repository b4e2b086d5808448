"""Sensitivity profiling: K after RoPE at PI positions, gradients checked by finite differences."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from pmkvq_compile.models import cache_kwarg
from pmkvq_compile.planning import pi_position_ids, profile_sensitivity
from pmkvq_compile.planning.capture import Recorder, calibration_attention, forward_sample
from pmkvq_compile.planning.sensitivity import _GradRecorder
from tests.models import tiny


def test_pi_position_ids() -> None:
    assert torch.equal(pi_position_ids(64, 256)[0], torch.arange(0, 256, 4))
    assert torch.equal(pi_position_ids(64, None)[0], torch.arange(64))
    assert torch.equal(pi_position_ids(64, 32)[0], torch.arange(64))
    p = pi_position_ids(100, 250)[0]
    assert p[0] == 0 and p[-1] < 250 and bool((p.diff() >= 2).all())


class _Keys(Recorder):
    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}

    def record(self, layer, query, key, value):
        self.k[layer] = key.detach().clone()
        return query, key, value


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_captured_keys_are_the_models_post_rope_keys_at_pi_positions(arch: str) -> None:
    model = tiny(arch)
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(0))
    pos = pi_position_ids(40, 400)
    rec = _Keys()
    with calibration_attention(model, rec), torch.no_grad():
        got = forward_sample(model, ids, pos).logits
    assert model.config._attn_implementation != "pmkvq_calibrate"  # restored
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        want = model(ids[None], position_ids=pos, use_cache=True, **{cache_kwarg(model): cache}).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(rec.k[layer], cache.layers[layer].keys, rtol=1e-5, atol=1e-6)


class _Nudge(Recorder):
    """Adds ``delta`` to one layer's K or V."""

    def __init__(self, layer: int, which: str, delta: torch.Tensor) -> None:
        self.layer, self.which, self.delta = layer, which, delta

    def record(self, layer, query, key, value):
        if layer == self.layer:
            if self.which == "k":
                key = key + self.delta
            else:
                value = value + self.delta
        return query, key, value


def test_gradients_match_finite_differences() -> None:
    # float64 model; its RMSNorm still rounds through float32, so the check is a directional derivative
    # along the gradient (large enough to be far above that rounding), not element by element.
    model = tiny("llama").double()
    ids = torch.randint(0, 96, (24,), generator=torch.Generator().manual_seed(1))
    pos = pi_position_ids(24, 96)
    rec = _GradRecorder(None)
    with calibration_attention(model, rec), torch.enable_grad():
        loss = forward_sample(model, ids, pos, labels=True).loss
        gk, gv = torch.autograd.grad(loss, [rec.keys[1], rec.values[0]])
    assert all(p.grad is None for p in model.parameters())
    for layer, which, grad in ((1, "k", gk), (0, "v", gv)):
        norm = grad.norm()
        eps = 1e-2
        losses = []
        for sign in (1, -1):
            nudge = _Nudge(layer, which, sign * eps * grad / norm)
            with calibration_attention(model, nudge), torch.no_grad():
                logits = forward_sample(model, ids, pos).logits[0]
                losses.append(float(torch.nn.functional.cross_entropy(logits[:-1], ids[1:])))
        fd = (losses[0] - losses[1]) / (2 * eps)
        assert fd == pytest.approx(float(norm), rel=2e-3)


def test_profile_shapes_monotonicity_and_pi_effect() -> None:
    model = tiny("qwen2", num_hidden_layers=3)
    g = torch.Generator().manual_seed(2)
    samples = [torch.randint(0, 96, (48,), generator=g) for _ in range(2)]
    sens = profile_sensitivity(model, samples, bit_choices=(8, 4, 2), group_size=16, progress=False)
    assert sens.key.shape == sens.value.shape == (3, 3)
    assert bool((sens.key > 0).all()) and bool((sens.value > 0).all())
    # fewer bits, more error: columns are 8, 4, 2 bits
    assert bool((sens.key[:, 0] < sens.key[:, 1]).all()) and bool((sens.key[:, 1] < sens.key[:, 2]).all())
    assert bool((sens.value[:, 1] < sens.value[:, 2]).all())
    pi = profile_sensitivity(
        model, samples, bit_choices=(4, 2), group_size=16, effective_len=480, progress=False
    )
    assert not torch.allclose(pi.key, sens.key[:, 1:])  # positions changed the keys and gradients
    assert torch.equal(
        pi.key,
        profile_sensitivity(
            model, samples, bit_choices=(4, 2), group_size=16, effective_len=480, progress=False
        ).key,
    )
    with pytest.raises(ValueError, match="at least one calibration sample"):
        profile_sensitivity(model, [], bit_choices=(4, 2), group_size=16)
