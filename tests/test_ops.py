"""The ``pmkvq::`` ops: opcheck (schema, fake, autograd registration) and torch.compile(fullgraph=True)."""

from __future__ import annotations

import torch

from pmkvq_compile import ops  # noqa: F401  (registers the ops)
from pmkvq_compile.kernels import reference as ref

from .kernels.helpers import filled_cache, small_layout

CPU = "cpu"


def _cache():
    lay = small_layout(bits=4, value_bits=4, max_len=60)
    arena, state, table = filled_cache(lay, 2, [13, 9], device=CPU)
    return lay, arena, state, table


def test_opcheck_append_and_requantize() -> None:
    lay, arena, state, table = _cache()
    k = torch.randn(2, lay.num_kv_heads, 3, lay.head_dim)
    ks = torch.rand(lay.num_kv_heads, lay.head_dim // 2) + 0.5
    torch.library.opcheck(
        torch.ops.pmkvq.append.default, (arena, state, table, k, k.clone(), ks, lay.to_list())
    )
    torch.library.opcheck(
        torch.ops.pmkvq.append.default, (arena, state, table, k, k.clone(), None, lay.to_list())
    )
    torch.library.opcheck(torch.ops.pmkvq.requantize_body.default, (arena, state, table, 4, 2, lay.to_list()))


def test_opcheck_attention() -> None:
    lay, arena, state, table = _cache()
    lengths = torch.tensor([22, 15], dtype=torch.int32)
    q = torch.randn(2, 6, lay.head_dim, dtype=torch.float16)
    kn = torch.randn(2, 2, 1, lay.head_dim, dtype=torch.float16)
    torch.library.opcheck(
        torch.ops.pmkvq.decode_attention.default,
        (q, kn, kn.clone(), arena, state, table, lengths, None, lay.to_list(), 0.125, 0),
    )
    qp = torch.randn(2, 6, 5, lay.head_dim)
    knp = torch.randn(2, 2, 5, lay.head_dim)
    torch.library.opcheck(
        torch.ops.pmkvq.prefill_attention.default,
        (qp, knp, knp.clone(), arena, state, table, lengths, None, lay.to_list(), 0.125),
    )


def test_compiled_decode_step_fullgraph() -> None:
    lay, arena, state, table = _cache()
    a2, s2, t2 = arena.clone(), state.clone(), table.clone()
    L = lay.to_list()

    def step(q, k, v, arena, state, table):
        torch.ops.pmkvq.append(arena, state, table, k, v, None, L)
        lengths = (state[0:1] - 1).expand(q.shape[0]).contiguous()
        return torch.ops.pmkvq.decode_attention(q, k, v, arena, state, table, lengths, None, L, 0.125, 0)

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    for _ in range(3):
        q = torch.randn(2, 6, lay.head_dim)
        k = torch.randn(2, 2, 1, lay.head_dim)
        v = torch.randn(2, 2, 1, lay.head_dim)
        got = compiled(q, k, v, arena, state, table)
        ref.append(a2, s2, t2, k, v, None, L)
        n = int(s2[0]) - 1
        want = ref.decode_attention(
            q, k, v, a2, s2, t2, torch.tensor([n, n], dtype=torch.int32), None, L, 0.125, 0
        )
        torch.testing.assert_close(got, want)
        assert torch.equal(arena, a2) and torch.equal(state, s2)
