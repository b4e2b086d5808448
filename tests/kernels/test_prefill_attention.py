"""Triton prefill / chunked-prefill attention against the reference."""

from __future__ import annotations

import pytest
import torch

from pmkvq_compile.kernels import prefill_attention as kernel
from pmkvq_compile.kernels import reference as ref

from .helpers import DEVICE, filled_cache, make_mixed, small_layout

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize(
    "dtype,t,past,scale_dtype",
    [
        (torch.float32, 17, [9, 12], "float32"),
        (torch.bfloat16, 5, [], "float32"),
        (torch.float16, 19, [21], "float32"),
        (torch.float16, 7, [9, 12, 14], "float16"),  # float16 scales and zeros in the <= 8-bit chunks
    ],
)
def test_prefill_matches_reference(dtype, t, past, scale_dtype) -> None:
    lay = small_layout(bits=4, value_bits=4, max_len=60, scale_dtype=scale_dtype)
    g = torch.Generator().manual_seed(7)
    ks = (torch.rand(lay.num_kv_heads, lay.head_dim // 2, generator=g) + 0.5).to(DEVICE)
    arena, state, table = filled_cache(lay, 2, past, key_scale=ks)
    if int(state[2]) > 1:
        make_mixed(lay, arena, state, table, first_low=1)
    n = int(state[0])
    lengths = torch.tensor([n, max(n - 4, 0)], dtype=torch.int32, device=DEVICE)
    hq = 3 * lay.num_kv_heads
    q = torch.randn(2, hq, t, lay.head_dim, generator=g).to(DEVICE, dtype)
    kn = torch.randn(2, lay.num_kv_heads, t, lay.head_dim, generator=g).to(DEVICE, dtype)
    vn = torch.randn(2, lay.num_kv_heads, t, lay.head_dim, generator=g).to(DEVICE, dtype)
    args = (q, kn, vn, arena, state, table, lengths, ks, lay.to_list(), 0.125)
    want = ref.prefill_attention(*args)
    got = kernel.prefill_attention(*args)
    assert got.dtype == dtype and got.shape == q.shape and got.is_contiguous()
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
