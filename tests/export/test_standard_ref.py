"""The standard flavor's layout (standard_ref) and the host schedule mirror against the arena references."""

from __future__ import annotations

import pytest
import torch

from pmkvq_compile import Plan
from pmkvq_compile.cache import BudgetExceededError, ProgressiveLayer
from pmkvq_compile.export import standard_ref
from pmkvq_compile.export.schedule import LayerMirror, plan_step
from pmkvq_compile.export.step import attend
from pmkvq_compile.kernels import reference
from pmkvq_compile.kernels.layout import ArenaLayout
from pmkvq_compile.plan import ModelGeometry

GEO = ModelGeometry("llama", 1, 4, 2, 32, 128, 4096)


def _plan(bits: int, value_bits: int, max_len: int, n_window: int, group: int) -> Plan:
    return Plan.uniform(GEO, bits, max_len, value_bits=value_bits, n_window=n_window, group_size=group)


@pytest.mark.parametrize(
    ("bits", "value_bits", "steps"),
    [
        (4, 4, [13, 1, 1, 5, 1, 1, 30, 1, 1, 1, 17, 1, 1]),
        (8, 2, [1, 1, 9, 1, 40, 1, 1, 22, 3]),
        (2, 2, [61, 1, 1]),
    ],
)
def test_standard_layout_holds_the_arena_codes(bits: int, value_bits: int, steps: list[int]) -> None:
    """Driving standard_ref (prepare before a flushing step, then step) as OrtGenerator does gives the same
    dequantized past as reference.append on the arena after every step, and the mirror tracks the arena state."""
    plan = _plan(bits, value_bits, sum(steps) + 1, 7, 16)
    lay = ArenaLayout.from_plan(plan, 0)
    torch.manual_seed(bits * 10 + value_bits)
    key_scale = torch.rand(2, 16) + 0.5
    arena = torch.zeros(2, lay.budget_bytes, dtype=torch.uint8)
    state, table = lay.initial_state(), lay.empty_table()
    std = standard_ref.initial_state(lay, 2)
    mirror = LayerMirror.empty(lay)
    shrunk = False
    for t in steps:
        k, v = torch.randn(2, 2, t, 32) * 3, torch.randn(2, 2, t, 32)
        sp = plan_step(lay, mirror, t)
        if sp.n_flush:
            std[6:] = standard_ref.prepare(lay, std, sp.key_bits, sp.value_bits, True)
        past = mirror.n_tokens
        reference.append(arena, state, table, k, v, key_scale, lay.to_list())
        q = torch.randn(2, 4, t, 32)
        mask = torch.ones(2, past + t, dtype=torch.int64)
        out, std = standard_ref.step(lay, q, k, v, std, key_scale, mask, 0.25)
        mirror = sp.after
        assert state[:5].tolist() == [
            mirror.n_tokens,
            mirror.window_len,
            mirror.n_chunks,
            mirror.key_bits,
            mirror.value_bits,
        ]
        assert std[-1][:5].tolist() == [
            mirror.n_tokens,
            mirror.window_len,
            mirror.n_chunks * lay.n_window,
            mirror.key_bits,
            mirror.value_bits,
        ]
        kp, vp = reference.dequantize_past(arena, state, table, lay.to_list(), past)
        ref = attend(q, k, v, kp, vp, key_scale, mask, 0.25)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        shrunk |= sp.key_bits < 16
    assert shrunk and (mirror.key_bits, mirror.value_bits) == (bits, value_bits)


def test_schedule_mirror_matches_the_eager_cache_and_refuses_like_it() -> None:
    plan = _plan(2, 2, 40, 4, 32)
    lay = ArenaLayout.from_plan(plan, 0)
    layer = ProgressiveLayer(plan, 0, batch_size=1)
    mirror = LayerMirror.empty(lay)
    torch.manual_seed(0)
    with pytest.raises(BudgetExceededError):
        for t in [3, 1, 6, 1, 1, 9, 1, 1, 1, 30, 1, 1, 50]:
            try:
                sp = plan_step(lay, mirror, t)
            except BudgetExceededError:
                with pytest.raises(BudgetExceededError):
                    layer.update(torch.randn(1, 2, t, 32), torch.randn(1, 2, t, 32))
                raise
            layer.update(torch.randn(1, 2, t, 32), torch.randn(1, 2, t, 32))
            mirror = sp.after
            assert (mirror.n_tokens, mirror.window_len, mirror.n_chunks) == (
                layer.n_tokens,
                layer.window_len,
                len(layer.chunk_bits),
            )
            assert (mirror.key_bits, mirror.value_bits) == layer.body_bits


def test_capacities_cover_every_level_of_the_schedule() -> None:
    plan = Plan.uniform(GEO, 2, 300, value_bits=4, n_window=8, group_size=16)
    lay = ArenaLayout.from_plan(plan, 0)
    kcap, vcap, tcap = standard_ref.capacities(lay)
    for kb, vb in standard_ref.levels(lay):
        chunks = lay.body_capacity // lay.chunk_bytes(kb, vb)
        assert chunks * 8 * 32 * kb // 8 <= kcap and chunks * 8 * 32 * vb // 8 <= vcap and chunks * 8 <= tcap
    assert standard_ref.levels(lay)[-1] == (2, 2)
