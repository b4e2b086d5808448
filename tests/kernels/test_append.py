"""Triton append and body requantization against the reference, byte for byte.

The reference runs on the CPU: PyTorch's CUDA division by a Python scalar multiplies by the reciprocal,
so ``quant.quantize`` on CUDA can differ from IEEE division by one ulp in the scale; the kernels divide
with IEEE rounding (``div_rn``), as the CPU reference does.
"""

from __future__ import annotations

import pytest
import torch

from pmkvq_compile import quant
from pmkvq_compile.kernels import append as kernel
from pmkvq_compile.kernels import reference as ref

from .helpers import DEVICE, empty_cache, filled_cache, small_layout

CASES = [
    # (layout kwargs, steps, dtype, key scale)
    (dict(), [3, 9, 1, 13, 1], torch.float16, True),
    (
        dict(d=128, group=128, hkv=1, n_window=7, bits=8, value_bits=4, max_len=50),
        [1, 17, 2],
        torch.bfloat16,
        False,
    ),
    (dict(n_sink=0, group=64, bits=2, value_bits=2, max_len=26), [6, 1, 11], torch.float32, False),
    # float16 scales and zeros at <= 8 bits: the body's 16 -> 8 step narrows them in place
    (dict(scale_dtype="float16"), [3, 9, 1, 13, 1], torch.float16, True),
    (
        dict(d=128, group=64, hkv=1, n_window=6, bits=8, value_bits=4, max_len=50, scale_dtype="float16"),
        [1, 17, 2],
        torch.bfloat16,
        False,
    ),
]


@pytest.mark.parametrize("kw,steps,dtype,with_scale", CASES)
def test_append_bit_exact(kw, steps, dtype, with_scale) -> None:
    lay = small_layout(**kw)
    L = lay.to_list()
    g = torch.Generator().manual_seed(3)
    ks = (
        (torch.rand(lay.num_kv_heads, lay.head_dim // 2, generator=g) + 0.5).to(DEVICE)
        if with_scale
        else None
    )
    a1, s1, t1 = empty_cache(lay, 2, "cpu")
    a2, s2, t2 = empty_cache(lay, 2)
    ks_cpu = ks.cpu() if ks is not None else None
    for t in steps:
        k = torch.randn(2, lay.num_kv_heads, t, lay.head_dim, generator=g).to(DEVICE, dtype)
        v = torch.randn(2, lay.num_kv_heads, t, lay.head_dim, generator=g).to(DEVICE, dtype)
        ref.append(a1, s1, t1, k.cpu(), v.cpu(), ks_cpu, L)
        kernel.append(a2, s2, t2, k, v, ks, L)
        assert torch.equal(s1, s2.cpu()), (s1.tolist(), s2.tolist())
        assert torch.equal(t1, t2.cpu())
        assert torch.equal(a1, a2.cpu())
    assert int(s1[2]) > 0  # some chunks reached the body


def test_append_overflow_flag() -> None:
    lay = small_layout(max_len=20)
    arena, state, table = empty_cache(lay, 1)
    k = torch.randn(1, lay.num_kv_heads, 20, lay.head_dim, device=DEVICE)
    kernel.append(arena, state, table, k, k, None, lay.to_list())
    before = (arena.clone(), state.clone(), table.clone())
    big = torch.randn(1, lay.num_kv_heads, 25, lay.head_dim, device=DEVICE)
    kernel.append(arena, state, table, big, big, None, lay.to_list())
    assert int(state[5]) == 1
    state[5] = 0
    assert torch.equal(arena, before[0]) and torch.equal(state, before[1]) and torch.equal(table, before[2])


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("target", [(8, 8), (4, 2), (2, 2)])
def test_requantize_body_bit_exact(target, scale_dtype) -> None:
    lay = small_layout(bits=4, value_bits=4, max_len=150, scale_dtype=scale_dtype)
    arena, state, table = filled_cache(lay, 2, [22])
    assert state[3:5].tolist() == [16, 16]
    a2, s2, t2 = arena.clone(), state.clone(), table.clone()
    ref.requantize_body(arena, state, table, *target, lay.to_list())
    kernel.requantize_body_launch(a2, s2, t2, *target, lay.to_list())
    assert torch.equal(state, s2) and torch.equal(table, t2) and torch.equal(arena, a2)
    # the first chunk, against quant.requantize applied level by level
    before = filled_cache(lay, 2, [22])
    o, kb, vb = before[2][0].tolist()
    kq, kscale, *_ = ref.read_region(before[0], lay, o, lay.n_window, kb, vb, lay.n_window)
    bits = kb
    while bits > target[0]:
        kq, kscale = quant.requantize(kq, kscale, bits)
        bits //= 2
    o2, kb2, vb2 = t2[0].tolist()
    got = ref.read_region(a2, lay, o2, lay.n_window, kb2, vb2, lay.n_window)
    # stored as float16 in a float16-scale layout (every target here is <= 8 bits): rounded to nearest even
    want = kscale.half().float() if scale_dtype == "float16" else kscale
    assert lay.meta_bytes(kb2, vb2) == (2 if scale_dtype == "float16" else 4)
    assert torch.equal(got[0], kq) and torch.equal(got[1], want)


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_requantize_body_in_place_steps(scale_dtype, monkeypatch) -> None:
    """The chunks that overlap their own old place move in order in steps of R rows: 48 rows per chunk in
    steps of 16 (three per section), from 16 to 8 bits (float16 meta narrowed in place) and from 8 to 2,
    bit-exact with the reference."""
    lay = small_layout(bits=8, value_bits=8, n_window=24, max_len=200, scale_dtype=scale_dtype)
    arena, state, table = filled_cache(lay, 2, [100])
    assert state[2:5].tolist() == [4, 16, 16]
    a2, s2, t2 = arena.clone(), state.clone(), table.clone()
    monkeypatch.setenv("PMKVQ_SHRINK_CFG", "16,2,2,16")
    for target in ((8, 8), (2, 2)):
        ref.requantize_body(arena, state, table, *target, lay.to_list())
        kernel.requantize_body_launch(a2, s2, t2, *target, lay.to_list())
        assert torch.equal(state, s2) and torch.equal(table, t2) and torch.equal(arena, a2)


@pytest.mark.parametrize(
    "cfg,reverse", [("16,1", False), ("64,8", True), ("16,1,3,4", True), ("32,4,5,8", False)]
)
def test_requantize_body_shrink_step_sizes(cfg, reverse, monkeypatch) -> None:
    """``PMKVQ_SHRINK_CFG`` (a sweep knob: rows per step, warps, programs per row, rows per work item) changes
    how the in-place compaction is cut into steps and shared, not its result: bit-exact with the reference on
    a 27-chunk body (9 waves at 4 -> 2 bits: the first two chunks alone, then up to 8 at once), with items of
    a whole chunk (10 rows) and of 4 or 8 rows (a short last part). With ``reverse`` each wave's items run
    last first, where a wave wider than the space already read would overwrite a chunk before it is read (the
    interpreter runs programs one after another, so only the order of items can be adversarial). A bad value
    is refused by name before the cache is touched."""
    lay = small_layout(bits=4, value_bits=4, max_len=150)
    arena, state, table = filled_cache(lay, 2, [140])
    assert state[2:5].tolist() == [27, 4, 4]
    a2, s2, t2 = arena.clone(), state.clone(), table.clone()
    ref.requantize_body(arena, state, table, 4, 2, lay.to_list())
    monkeypatch.setenv("PMKVQ_SHRINK_CFG", cfg)
    monkeypatch.setattr(kernel, "_SHRINK_REVERSE", reverse)
    kernel.requantize_body_launch(a2, s2, t2, 4, 2, lay.to_list())
    assert torch.equal(state, s2) and torch.equal(table, t2) and torch.equal(arena, a2)
    ref.requantize_body(arena, state, table, 2, 2, lay.to_list())
    kernel.requantize_body_launch(a2, s2, t2, 2, 2, lay.to_list())
    assert torch.equal(state, s2) and torch.equal(table, t2) and torch.equal(arena, a2)
    monkeypatch.setenv("PMKVQ_SHRINK_CFG", "24,4")
    before = (a2.clone(), s2.clone(), t2.clone())
    with pytest.raises(
        ValueError, match=r"PMKVQ_SHRINK_CFG must be .R,num_warps\[,programs\[,item_rows\]\]..*got '24,4'"
    ):
        kernel.requantize_body_launch(a2, s2, t2, 2, 2, lay.to_list())
    assert torch.equal(a2, before[0]) and torch.equal(s2, before[1]) and torch.equal(t2, before[2])
