"""The references themselves, against quant.py (stored values) and plain SDPA (attention)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pmkvq_compile import quant
from pmkvq_compile.kernels import reference as ref
from pmkvq_compile.kernels.layout import ArenaLayout, next_body_bits

from .helpers import empty_cache, small_layout


def _expected_past(lay: ArenaLayout, ks: list[torch.Tensor], vs: list[torch.Tensor], n_chunks: int, bits):
    """Each token quantized at sink or window bits, body tokens ERS'd to the body bits, dequantized."""
    k, v = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
    n_body_end = lay.n_sink + n_chunks * lay.n_window
    out = []
    for x, b in ((k, bits[0]), (v, bits[1])):
        parts = []
        for lo, hi, qb, tb in (
            (0, lay.n_sink, lay.sink_bits, lay.sink_bits),
            (lay.n_sink, n_body_end, lay.window_bits, b),
            (n_body_end, x.shape[2], lay.window_bits, lay.window_bits),
        ):
            if hi <= lo or lo >= x.shape[2]:
                continue
            q, s, z = quant.quantize(x[:, :, lo:hi], qb, lay.group_size)
            q, s = ref.ers_to(q, s, qb, tb)
            parts.append(quant.dequantize(q, s, z, lay.group_size))
        out.append(torch.cat(parts, dim=2))
    return out


def test_append_reference_matches_the_progression_rules() -> None:
    lay = small_layout()
    arena, state, table = empty_cache(lay, 2, "cpu")
    g = torch.Generator().manual_seed(1)
    ks, vs = [], []
    bits = (lay.init_bits, lay.init_bits)
    n_chunks = 0
    for t in (3, 9, 1, 13, 6):
        k = torch.randn(2, lay.num_kv_heads, t, lay.head_dim, generator=g)
        v = torch.randn(2, lay.num_kv_heads, t, lay.head_dim, generator=g)
        ref.append(arena, state, table, k, v, None, lay.to_list())
        ks.append(k)
        vs.append(v)
        n = sum(x.shape[2] for x in ks)
        n_chunks = max(n - lay.n_sink, 0) // lay.n_window
        while n_chunks * lay.chunk_bytes(*bits) > lay.body_capacity:
            bits = next_body_bits(*bits, (lay.key_bits, lay.value_bits))
        assert state[:5].tolist() == [n, n - lay.n_sink - n_chunks * lay.n_window, n_chunks, *bits]
        kp, vp = ref.dequantize_past(arena, state, table, lay.to_list(), n)
        ek, ev = _expected_past(lay, ks, vs, n_chunks, bits)
        assert torch.equal(kp, ek) and torch.equal(vp, ev)
    assert bits == (lay.key_bits, lay.value_bits)


def test_append_reference_sets_overflow_and_changes_nothing() -> None:
    lay = small_layout(max_len=20)
    arena, state, table = empty_cache(lay, 1, "cpu")
    k = torch.randn(1, lay.num_kv_heads, 20, lay.head_dim)
    ref.append(arena, state, table, k, k, None, lay.to_list())
    before = (arena.clone(), state.clone(), table.clone())
    big = torch.randn(1, lay.num_kv_heads, 40, lay.head_dim)
    ref.append(arena, state, table, big, big, None, lay.to_list())
    assert int(state[5]) == 1
    state[5] = 0
    assert torch.equal(arena, before[0]) and torch.equal(state, before[1]) and torch.equal(table, before[2])


@pytest.mark.parametrize("t", [1, 7])
def test_attention_reference_matches_sdpa(t: int) -> None:
    lay = small_layout()
    arena, state, table = empty_cache(lay, 2, "cpu")
    k = torch.randn(2, lay.num_kv_heads, 23, lay.head_dim)
    ref.append(arena, state, table, k, torch.randn_like(k), None, lay.to_list())
    lengths = torch.tensor([23, 17], dtype=torch.int32)
    hq = 3 * lay.num_kv_heads
    q = torch.randn(2, hq, t, lay.head_dim)
    kn, vn = (
        torch.randn(2, lay.num_kv_heads, t, lay.head_dim),
        torch.randn(2, lay.num_kv_heads, t, lay.head_dim),
    )
    out = ref.prefill_attention(q, kn, vn, arena, state, table, lengths, None, lay.to_list(), 0.125)
    kp, vp = ref.dequantize_past(arena, state, table, lay.to_list(), 23)
    for b in range(2):
        n = int(lengths[b])
        kk = torch.cat([kp[b : b + 1, :, :n], kn[b : b + 1]], dim=2)
        vv = torch.cat([vp[b : b + 1, :, :n], vn[b : b + 1]], dim=2)
        mask = torch.ones(t, n + t, dtype=torch.bool).tril(n)
        want = F.scaled_dot_product_attention(
            q[b : b + 1], kk, vv, attn_mask=mask, scale=0.125, enable_gqa=True
        )
        torch.testing.assert_close(out[b : b + 1], want, atol=1e-5, rtol=1e-5)
    if t == 1:
        dec = ref.decode_attention(
            q[:, :, 0], kn, vn, arena, state, table, lengths, None, lay.to_list(), 0.125, 0
        )
        torch.testing.assert_close(dec, out[:, :, 0])


@pytest.mark.parametrize(
    "final, path",
    [
        ((4, 4), [(16, 16), (8, 8), (4, 4), (2, 2)]),
        ((4, 2), [(16, 16), (16, 8), (8, 4), (4, 2), (2, 2)]),
        ((8, 2), [(16, 16), (16, 8), (16, 4), (8, 2), (4, 2), (2, 2)]),
    ],
)
def test_schedule_walks_through_the_final_bits(final, path) -> None:
    got = [(16, 16)]
    while (nxt := next_body_bits(*got[-1], final)) is not None:
        got.append(nxt)
    assert got == path
