"""The HiGHS allocation against brute force, byte budgets and the memory model, infeasible budgets."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pmkvq_compile.kernels.layout import ArenaLayout
from pmkvq_compile.plan import ModelGeometry, Plan
from pmkvq_compile.planning import (
    InfeasibleBudgetError,
    Sensitivity,
    allocate,
    bits_budget,
    check_bit_choices,
    equal_split_plan,
    parse_budget,
    solve_allocation,
)

GEO = ModelGeometry("llama", num_layers=5, num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64)


def _proto(max_len: int = 1000, n_window: int = 32) -> Plan:
    return Plan.uniform(GEO, 2, max_len, n_window=n_window)


def _brute(cost: np.ndarray, mem: np.ndarray, budget: int) -> float | None:
    best = None
    for choice in itertools.product(range(cost.shape[1]), repeat=cost.shape[0]):
        rows = np.arange(cost.shape[0])
        if mem[rows, choice].sum() <= budget:
            c = float(cost[rows, choice].sum())
            best = c if best is None else min(best, c)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_solver_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_layers, n_opt = int(rng.integers(2, 6)), int(rng.integers(2, 5))
    cost = rng.exponential(size=(n_layers, n_opt)) * 10.0 ** rng.integers(-9, 2)
    mem = rng.integers(100, 10_000, size=(n_layers, n_opt))
    lo, hi = int(mem.min(1).sum()), int(mem.max(1).sum())
    for budget in (lo, int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)), hi):
        choice, obj = solve_allocation(cost, mem, budget)
        assert int(mem[np.arange(n_layers), choice].sum()) <= budget
        assert obj == pytest.approx(float(cost[np.arange(n_layers), choice].sum()))
        assert obj == pytest.approx(_brute(cost, mem, budget), rel=1e-9, abs=0)


def test_solver_refuses_infeasible_and_names_min_budget() -> None:
    cost = np.ones((3, 2))
    mem = np.array([[10, 20], [5, 7], [1, 2]])
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible budget is 16 bytes") as e:
        solve_allocation(cost, mem, 15)
    assert e.value.min_budget == 16
    choice, _ = solve_allocation(cost, mem, 16)
    assert choice.tolist() == [0, 0, 0]


def _sens(key: list[list[float]], value: list[list[float]], bits=(4, 2)) -> Sensitivity:
    return Sensitivity(bits, torch.tensor(key, dtype=torch.float64), torch.tensor(value, dtype=torch.float64))


@pytest.mark.parametrize("separate_kv", [False, True])
def test_allocate_is_optimal_over_the_plan_memory_model(separate_kv: bool) -> None:
    proto = _proto()
    rng = np.random.default_rng(1)
    ks = rng.exponential(size=(5, 3)).cumsum(1)  # bits (8, 4, 2): cost grows as bits drop
    vs = rng.exponential(size=(5, 3)).cumsum(1)
    sens = _sens(ks.tolist(), vs.tolist(), bits=(8, 4, 2))
    opts = [(a, b) for a in (8, 4, 2) for b in (8, 4, 2)] if separate_kv else [(8, 8), (4, 4), (2, 2)]
    cost = np.array([[sens.key_cost(i, a) + sens.value_cost(i, b) for a, b in opts] for i in range(5)])
    mem = np.array([[proto.budget_for(a, b) for a, b in opts] for _ in range(5)])
    for budget in (bits_budget(proto, 3), bits_budget(proto, 4.5), bits_budget(proto, 6)):
        layers = allocate(proto, sens, budget, separate_kv=separate_kv)
        assert sum(lp.budget_bytes for lp in layers) <= budget
        assert all(lp.budget_bytes == proto.budget_for(lp.key_bits, lp.value_bits) for lp in layers)
        got = sum(
            sens.key_cost(i, lp.key_bits) + sens.value_cost(i, lp.value_bits) for i, lp in enumerate(layers)
        )
        assert got == pytest.approx(_brute(cost, mem, budget))
        if not separate_kv:
            assert all(lp.key_bits == lp.value_bits for lp in layers)


def test_separate_kv_uses_the_asymmetry() -> None:
    proto = _proto()
    # keys are very sensitive, values not at all: keys keep 4 bits, values go to 2
    sens = _sens([[0.0, 100.0]] * 5, [[0.0, 0.001]] * 5)
    layers = allocate(proto, sens, bits_budget(proto, 3), separate_kv=True)
    assert {(lp.key_bits, lp.value_bits) for lp in layers} == {(4, 2)}
    tied = allocate(proto, sens, bits_budget(proto, 3), separate_kv=False)
    assert sorted(lp.key_bits for lp in tied) == [2, 2, 2, 4, 4]  # 2 layers of 4 fit in a 3-bit budget


def test_allocation_prefers_the_sensitive_layers() -> None:
    proto = _proto()
    sens = _sens([[0.0, 1.0], [0.0, 9.0], [0.0, 2.0], [0.0, 8.0], [0.0, 0.5]], [[0.0, 0.0]] * 5)
    layers = allocate(proto, sens, bits_budget(proto, 3))
    assert [lp.key_bits for lp in layers] == [2, 4, 2, 4, 2]


def test_bits_budget_interpolates_the_memory_model() -> None:
    proto = _proto()
    for b in (2, 4, 8, 16):
        assert bits_budget(proto, b) == Plan.uniform(GEO, b, 1000, n_window=32).total_budget_bytes
    assert bits_budget(proto, 3) == GEO.num_layers * proto.budget_for(4, 2)
    assert bits_budget(proto, 2) < bits_budget(proto, 2.5) < bits_budget(proto, 3)
    assert parse_budget("2.5bit", proto) == parse_budget(" 2.5 bits ", proto) == bits_budget(proto, 2.5)
    assert parse_budget(12345, proto) == 12345
    # float16 scales: 2 bytes per scale and zero at <= 8 bits, so the budget of b bits is that plan's
    half = Plan.uniform(GEO, 2, 1000, n_window=32, scale_dtype="float16")
    for b in (2, 4, 8, 16):
        want = Plan.uniform(GEO, b, 1000, n_window=32, scale_dtype="float16").total_budget_bytes
        assert bits_budget(half, b) == want
        assert (want < bits_budget(proto, b)) == (b <= 8)


@pytest.mark.parametrize("bad", ["3 bytes", "", "bit", 0, -5, 2.5, True, "1bit", "17bit"])
def test_bad_budgets_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="budget"):
        parse_budget(bad, _proto())


@pytest.mark.parametrize("bad", [(3,), (), (4, 1), (32, 4), "4,2", (4.0, 2)])
def test_bad_bit_choices_are_refused(bad) -> None:
    with pytest.raises(ValueError, match=r"bit|expected one of"):
        check_bit_choices(bad)


def test_allocate_below_minimum_names_it() -> None:
    proto = _proto()
    floor = GEO.num_layers * proto.budget_for(2, 2)
    with pytest.raises(InfeasibleBudgetError, match=f"{floor:,} bytes"):
        allocate(proto, _sens([[0, 1]] * 5, [[0, 1]] * 5), floor - 1)


def test_equal_split_gives_every_layer_the_same_bytes() -> None:
    proto = _proto()
    p3 = equal_split_plan(proto, bits_budget(proto, 3))
    assert {(lp.key_bits, lp.value_bits) for lp in p3.layers} == {(4, 2)}
    assert p3.total_budget_bytes <= bits_budget(proto, 3)
    p25 = equal_split_plan(proto, bits_budget(proto, 2.5))
    assert {(lp.key_bits, lp.value_bits) for lp in p25.layers} == {(2, 2)}
    assert len({lp.budget_bytes for lp in p25.layers}) == 1
    assert p25.layers[0].budget_bytes > proto.budget_for(2, 2)
    with pytest.raises(InfeasibleBudgetError):
        equal_split_plan(proto, bits_budget(proto, 2) - 10)


def test_equal_split_budgets_fit_the_arena_alignment() -> None:
    """A budget that does not split into multiples of 4 bytes per layer is rounded down, so the cache (and the
    kernels' ArenaLayout, which refuses other budgets) accept the plan."""
    proto = _proto()
    budget = bits_budget(proto, 3) + 7 * GEO.num_layers + 3
    plan = equal_split_plan(proto, budget)
    assert all(lp.budget_bytes % 4 == 0 for lp in plan.layers)
    assert 0 <= budget - plan.total_budget_bytes < 5 * GEO.num_layers
    assert (budget // GEO.num_layers) % 4  # the unrounded split would not fit
    for i in range(GEO.num_layers):
        ArenaLayout.from_plan(plan, i)
