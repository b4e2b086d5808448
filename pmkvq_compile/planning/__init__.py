"""Planning: sensitivity profiling with positional interpolation and the HiGHS bit-allocation program."""

from .allocate import (
    InfeasibleBudgetError,
    allocate,
    bits_budget,
    check_bit_choices,
    equal_split_plan,
    kv_options,
    min_budget,
    parse_budget,
    solve_allocation,
)
from .capture import pi_position_ids
from .sensitivity import Sensitivity, profile_sensitivity

__all__ = [
    "InfeasibleBudgetError",
    "Sensitivity",
    "allocate",
    "bits_budget",
    "check_bit_choices",
    "equal_split_plan",
    "kv_options",
    "min_budget",
    "parse_budget",
    "pi_position_ids",
    "profile_sensitivity",
    "solve_allocation",
]
