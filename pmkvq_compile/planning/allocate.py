"""Block-wise bit allocation as an integer program solved by HiGHS (PMKVQ.md), and byte budgets.

For layers ``l`` and options ``o`` (a bit-width, or a ``(key_bits, value_bits)`` pair when keys and values may
differ), choose binaries ``x[l, o]`` with ``sum_o x[l, o] = 1``, ``sum mem[l, o] x[l, o] <= budget``, minimising
``sum cost[l, o] x[l, o]``. Memory is the plan's memory model (:meth:`Plan.budget_for`): codes plus the float32
scale and zero of every group, sink and window included.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import quant
from ..plan import LayerPlan, Plan, meta_bytes
from .sensitivity import Sensitivity

__all__ = [
    "InfeasibleBudgetError",
    "allocate",
    "bits_budget",
    "equal_split_plan",
    "kv_options",
    "min_budget",
    "parse_budget",
    "solve_allocation",
]

_BITS_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*bits?\s*$", re.IGNORECASE)


class InfeasibleBudgetError(ValueError):
    """The budget is below the smallest one any choice of bit-widths can meet (``min_budget`` bytes)."""

    def __init__(self, budget: int, min_budget: int, detail: str = "") -> None:
        self.budget, self.min_budget = budget, min_budget
        super().__init__(
            f"budget={budget:,} bytes is infeasible: the smallest feasible budget is {min_budget:,} bytes"
            + (f" ({detail})" if detail else "")
        )


def check_bit_choices(bit_choices: Sequence[int], *, init_bits: int = 16) -> tuple[int, ...]:
    """Validate bit choices: a non-empty set drawn from {16, 8, 4, 2}, none above ``init_bits``; sorted descending."""
    if isinstance(bit_choices, (str, bytes)) or not isinstance(bit_choices, Sequence) or not bit_choices:
        raise ValueError(
            f"bit_choices={bit_choices!r} must be a non-empty sequence drawn from {quant.SUPPORTED_BITS}"
        )
    out = tuple(sorted({quant.check_bits(b, what="bit choice") for b in bit_choices}, reverse=True))
    if out[0] > init_bits:
        raise ValueError(f"bit choice {out[0]} exceeds init_bits={init_bits}")
    return out


def kv_options(bit_choices: Sequence[int], separate_kv: bool) -> list[tuple[int, int]]:
    """The per-layer options: ``(b, b)`` for each choice, or every ``(key_bits, value_bits)`` pair."""
    bits = check_bit_choices(bit_choices)
    if separate_kv:
        return list(itertools.product(bits, bits))
    return [(b, b) for b in bits]


def bits_budget(proto: Plan, bits: float) -> int:
    """Bytes of a cache whose body averages ``bits`` per K/V element at ``proto.max_len``, all layers.

    The memory model is linear in the body bits, so this interpolates :meth:`Plan.budget_for` linearly:
    sink + full window (at their bits) + ``max_chunks`` body chunks whose codes take ``bits`` per element and
    whose scales and zeros are counted in full (float32, or float16 at <= 8 bits with
    ``scale_dtype="float16"``). For a supported width ``b`` it equals the budget of ``Plan.uniform(..., b)``;
    rounded down to whole bytes.
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"a budget of {bits} bits is outside the supported range [2, 16]")
    g = proto.geometry
    groups = g.head_dim // proto.group_size
    token = g.num_kv_heads * (
        2 * g.head_dim * bits / 8 + 4 * meta_bytes(bits, bits, proto.scale_dtype) * groups
    )
    layer = proto.sink_bytes + proto.window_bytes + proto.max_chunks * proto.n_window * token
    return math.floor(layer * g.num_layers + 1e-9)


def parse_budget(budget: int | str, proto: Plan) -> int:
    """``budget`` as bytes: a positive int, or a string ``"<N>bit"`` (see :func:`bits_budget`), e.g. ``"2.5bit"``."""
    if isinstance(budget, str):
        m = _BITS_RE.match(budget)
        if m is None:
            raise ValueError(
                f"budget={budget!r} is not understood; give an int number of bytes or a string like '3bit' or '2.5bit'"
            )
        return bits_budget(proto, float(m.group(1)))
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise ValueError(
            f"budget={budget!r} must be a positive int number of bytes or a string like '3bit' or '2.5bit'"
        )
    return int(budget)


def min_budget(proto: Plan, options: Sequence[tuple[int, int]]) -> int:
    """The smallest total budget the options allow: every layer at its cheapest option."""
    return proto.geometry.num_layers * min(proto.budget_for(kb, vb) for kb, vb in options)


def _quiet_highs(highspy: Any) -> Any:
    """A ``Highs`` instance with output off; its one-time copyright banner goes to /dev/null, not stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    h.setOptionValue("output_flag", False)
    return h


def solve_allocation(cost: np.ndarray, mem: np.ndarray, budget: int) -> tuple[np.ndarray, float]:
    """Solve the multiple-choice knapsack exactly with HiGHS.

    Args:
        cost: float ``[L, O]`` (finite, >= 0 not required).
        mem: int ``[L, O]`` bytes.
        budget: int bytes.

    Returns:
        ``(choice [L] int64, objective)``: option index per layer and ``sum cost[l, choice[l]]``.

    Raises:
        InfeasibleBudgetError: ``budget < sum_l min_o mem[l, o]``.
    """
    import highspy

    cost = np.asarray(cost, dtype=np.float64)
    mem = np.asarray(mem, dtype=np.int64)
    if cost.ndim != 2 or cost.shape != mem.shape or cost.size == 0:
        raise ValueError(f"cost and mem must both be non-empty [L, O], got {cost.shape} / {mem.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("cost contains NaN or inf")
    n_layers, n_opt = cost.shape
    base = mem.min(axis=1)
    floor = int(base.sum())
    if budget < floor:
        raise InfeasibleBudgetError(budget, floor)
    # Exact integer rescaling: per-layer extra bytes over the cheapest option, divided by their gcd.
    extra = mem - base[:, None]
    unit = math.gcd(*[int(e) for e in extra.ravel() if e]) if extra.any() else 1
    extra_u = extra // unit
    slack_u = (budget - floor) // unit
    # Costs shifted per layer (constant) and normalised: HiGHS tolerances are absolute.
    shift = cost.min(axis=1)
    c = cost - shift[:, None]
    norm = float(c.max()) or 1.0
    c = c / norm

    h = _quiet_highs(highspy)
    h.setOptionValue("mip_rel_gap", 0.0)
    h.setOptionValue("mip_abs_gap", 0.0)
    x = h.addBinaries(n_layers * n_opt)
    for layer in range(n_layers):
        h.addConstr(h.qsum(x[layer * n_opt + o] for o in range(n_opt)) == 1)
    h.addConstr(
        h.qsum(
            float(extra_u[i // n_opt, i % n_opt]) * x[i] for i in range(n_layers * n_opt) if extra_u.flat[i]
        )
        <= float(slack_u)
    )
    h.minimize(h.qsum(float(c.flat[i]) * x[i] for i in range(n_layers * n_opt)))
    status = h.modelStatusToString(h.getModelStatus())
    if status != "Optimal":
        raise RuntimeError(f"HiGHS did not solve the allocation problem: {status}")
    vals = np.asarray(h.getSolution().col_value, dtype=np.float64).reshape(n_layers, n_opt)
    choice = vals.argmax(axis=1).astype(np.int64)
    used = int(mem[np.arange(n_layers), choice].sum())
    if used > budget:  # cannot happen with integral solutions; a guard against tolerance surprises
        raise RuntimeError(f"HiGHS returned an allocation of {used:,} bytes over the budget {budget:,}")
    return choice, float(cost[np.arange(n_layers), choice].sum())


def allocate(
    proto: Plan,
    sensitivity: Sensitivity,
    budget: int,
    *,
    separate_kv: bool = False,
) -> list[LayerPlan]:
    """Per-layer bits minimising total sensitivity within ``budget`` bytes (one sequence of ``proto.max_len``).

    Each layer's budget is ``proto.budget_for(key_bits, value_bits)``. With ``separate_kv`` every
    ``(key_bits, value_bits)`` pair of the sensitivity's bit choices is an option, else only equal pairs.
    Raises :class:`InfeasibleBudgetError` naming the smallest feasible budget.
    """
    if sensitivity.num_layers != proto.geometry.num_layers:
        raise ValueError(
            f"sensitivity covers {sensitivity.num_layers} layers, the plan {proto.geometry.num_layers}"
        )
    options = kv_options(sensitivity.bit_choices, separate_kv)
    n_layers = proto.geometry.num_layers
    mem = np.array(
        [[proto.budget_for(kb, vb) for kb, vb in options] for _ in range(n_layers)], dtype=np.int64
    )
    cost = np.array(
        [
            [sensitivity.key_cost(layer, kb) + sensitivity.value_cost(layer, vb) for kb, vb in options]
            for layer in range(n_layers)
        ],
        dtype=np.float64,
    )
    floor = min_budget(proto, options)
    if budget < floor:
        lo = min(options, key=lambda o: proto.budget_for(*o))
        raise InfeasibleBudgetError(
            budget, floor, f"every layer at {lo[0]}/{lo[1]} bits (K/V), max_len {proto.max_len}"
        )
    choice, _ = solve_allocation(cost, mem, budget)
    return [LayerPlan(*options[o], proto.budget_for(*options[o])) for o in choice]


def equal_split_plan(proto: Plan, budget: int, *, metadata: dict[str, str] | None = None) -> Plan:
    """The progressive cache without allocation: every layer gets the same ``budget // num_layers`` bytes,
    rounded down to a multiple of 4 (the arena's alignment: :class:`~pmkvq_compile.kernels.layout.ArenaLayout`
    refuses other budgets).

    Its final ``(key_bits, value_bits)`` is the pair with the most bits whose :meth:`Plan.budget_for` fits the
    layer budget (keys get the larger half on ties, e.g. 4/2 for a 3-bit budget); the cache then spends the
    layer budget as it is (more bits while the sequence is short).
    """
    n_layers = proto.geometry.num_layers
    per_layer = budget // n_layers // 4 * 4
    pairs = [
        (kb, vb)
        for kb in quant.SUPPORTED_BITS
        for vb in quant.SUPPORTED_BITS
        if max(kb, vb) <= proto.init_bits and proto.budget_for(kb, vb) <= per_layer
    ]
    if not pairs:
        raise InfeasibleBudgetError(budget, n_layers * proto.budget_for(2, 2), "every layer at 2/2 bits")
    kb, vb = max(pairs, key=lambda p: (p[0] + p[1], p[0]))
    layers = [LayerPlan(kb, vb, per_layer) for _ in range(n_layers)]
    return proto.with_layers(layers, metadata=dict(metadata or {"source": "equal split"}))
