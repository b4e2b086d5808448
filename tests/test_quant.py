"""The quantizer against its formulas (PMKVQ.md), exhaustive ERS, lossless packing, refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pmkvq_compile import quant


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
@pytest.mark.parametrize("gs", [16, 32])
def test_quantize_matches_formula(bits: int, gs: int) -> None:
    torch.manual_seed(bits + gs)
    x = torch.randn(3, 5, 32) * 3
    q, scale, zero = quant.quantize(x, bits, gs)
    assert q.dtype == torch.int32 and q.shape == x.shape
    assert scale.shape == zero.shape == (3, 5, 32 // gs) and scale.dtype == torch.float32
    xg = x.reshape(3, 5, 32 // gs, gs)
    exp_scale = ((xg.amax(-1) - xg.amin(-1)) / (2**bits - 1)).clamp(1e-5, 1e5)
    torch.testing.assert_close(scale, exp_scale, rtol=0, atol=0)
    torch.testing.assert_close(zero, -xg.amin(-1), rtol=0, atol=0)
    assert int(q.min()) >= 0 and int(q.max()) <= 2**bits - 1
    # each code is the nearest level: |x - x_hat| <= scale / 2 (plus float slack)
    xh = quant.dequantize(q, scale, zero, gs)
    err = (xh - x).abs().reshape(3, 5, 32 // gs, gs)
    assert bool((err <= scale.unsqueeze(-1) * (0.5 + 1e-4) + 1e-6).all())
    # the extremes are represented: min -> code 0, max -> top code
    assert bool((q.reshape(xg.shape).amin(-1) == 0).all())
    if bits <= 8:
        assert bool((q.reshape(xg.shape).amax(-1) == 2**bits - 1).all())


def test_quantize_constant_group_uses_scale_floor() -> None:
    x = torch.full((2, 16), 0.25)
    q, scale, zero = quant.quantize(x, 4, 16)
    assert torch.equal(scale, torch.full((2, 1), 1e-5))
    assert torch.equal(zero, torch.full((2, 1), -0.25))
    assert torch.equal(q, torch.zeros_like(q))
    torch.testing.assert_close(quant.dequantize(q, scale, zero, 16), x)


def test_quantize_error_shrinks_with_bits() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 64)
    errs = [(quant.dequantize(*quant.quantize(x, b, 64), 64) - x).pow(2).mean().item() for b in (2, 4, 8, 16)]
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert errs[3] < 1e-8


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_ers_exhaustive(bits: int) -> None:
    """Every code: ERS equals round-half-up(q / (2^c + 1)), computed with exact integer arithmetic."""
    c = bits // 2
    q = torch.arange(2**bits, dtype=torch.int32)
    got = quant.ers_codes(q, bits)
    d = (1 << c) + 1
    expected = (2 * q.to(torch.int64) + d) // (2 * d)  # floor(q/d + 1/2)
    assert torch.equal(got.to(torch.int64), expected)
    assert int(got.max()) == 2**c - 1 and int(got[-1]) == 2**c - 1


def test_requantize_scale_and_reconstruction() -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 8, 64)
    q, s, z = quant.quantize(x, 8, 32)
    q2, s2 = quant.requantize(q, s, 8)
    torch.testing.assert_close(s2, s * 17, rtol=0, atol=0)
    x4 = quant.dequantize(q2, s2, z, 32)
    # a 4-bit grid of step 17*s: error at most half a step plus the 8-bit error
    bound = (s2 / 2 + s / 2).repeat_interleave(32, dim=-1)
    assert bool(((x4 - x).abs() <= bound * (1 + 1e-4) + 1e-6).all())
    with pytest.raises(ValueError, match="integer codes"):
        quant.requantize(q.float(), s, 8)
    with pytest.raises(ValueError, match="bits"):
        quant.requantize(q, s, 2)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([16, 8, 4, 2]),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    d_groups=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_pack_roundtrip_property(bits: int, lead: list[int], d_groups: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    d = 16 * d_groups
    q = torch.randint(0, 2**bits, (*lead, d), generator=g, dtype=torch.int32)
    p = quant.pack(q, bits)
    assert p.dtype == torch.uint8 and p.shape == (*lead, d * bits // 8)
    assert torch.equal(quant.unpack(p, bits), q)


def test_pack_layout_little_endian() -> None:
    q = torch.tensor([1, 2, 3, 0], dtype=torch.int32)
    assert quant.pack(q, 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert quant.pack(q, 4).tolist() == [0x21, 0x03]
    assert quant.pack(torch.tensor([0x1234], dtype=torch.int32), 16).tolist() == [0x34, 0x12]


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([16, 8, 4, 2]),
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-100, 100),
    seed=st.integers(0, 2**16),
)
def test_quantize_property_bounds(bits: int, scale: float, shift: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 32, generator=g) * scale + shift
    q, s, z = quant.quantize(x, bits, 16)
    assert int(q.min()) >= 0 and int(q.max()) <= 2**bits - 1
    assert bool((s >= 1e-5).all() and (s <= 1e5).all())
    xh = quant.dequantize(q, s, z, 16)
    step = s.repeat_interleave(16, dim=-1)
    # half a step, plus float32 rounding of values of this magnitude
    slack = 1e-5 * (x.abs() + s.repeat_interleave(16, dim=-1) * 2**bits)
    assert bool(((xh - x).abs() <= step / 2 + slack).all())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: quant.quantize(torch.randn(4, 16), 3, 16), r"bits=3 .*\[16, 8, 4, 2\]"),
        (lambda: quant.quantize(torch.randn(4, 16), True, 16), r"bits=True"),
        (lambda: quant.quantize(torch.randn(4, 24), 4, 16), r"24 is not divisible by group_size=16"),
        (lambda: quant.quantize(torch.arange(16), 4, 16), r"floating tensor, got torch.int64"),
        (lambda: quant.quantize(torch.tensor([float("nan")] * 16), 4, 16), r"NaN or inf"),
        (lambda: quant.quantize(torch.tensor([float("inf")] * 16), 4, 16), r"NaN or inf"),
        (lambda: quant.quantize(torch.randn(4, 16), 4, 0), r"group_size=0"),
        (lambda: quant.unpack(torch.zeros(4, dtype=torch.int32), 4), r"uint8"),
        (lambda: quant.pack(torch.zeros(3, dtype=torch.int32), 2), r"whole bytes"),
    ],
)
def test_bad_input(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_half_precision_input() -> None:
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    q, s, z = quant.quantize(x, 8, 32)
    q32, s32, z32 = quant.quantize(x.float(), 8, 32)
    assert torch.equal(q, q32) and torch.equal(s, s32) and torch.equal(z, z32)
