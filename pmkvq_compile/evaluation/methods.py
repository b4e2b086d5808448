"""The compared methods at one byte budget, each a recipe for a fresh transformers ``Cache``.

The budget of ``b`` bits is the KV bytes of PM-KVQ's uniform plan at ``b`` bits for ``max_len`` tokens
(``Plan.uniform(config, b, max_len, n_window=window).total_budget_bytes``: codes, float32 scales and zeros,
the 16-bit sink and window included). At that budget:

* ``rtn-b``: per-token RTN at ``b`` bits (:class:`~pmkvq_compile.evaluation.baselines.RTNConfig`).
* ``kivi-b``: KIVI at ``b`` bits; its key group and float16 residual are the largest paper settings whose
  peak bytes over ``[1, max_len]`` tokens fit the budget (:func:`fit_kivi`); when none fits, the cheapest
  one, flagged ``over_budget``.
* ``pmkvq-uniform-b``: PM-KVQ with ``Plan.uniform`` at ``b`` bits: exactly the budget.
* ``pmkvq-calibrated-b``: PM-KVQ with a plan from :func:`pmkvq_compile.calibrate.calibrate` at the same
  budget in bytes (bit choices :func:`calibrated_bit_choices`), given by the caller.
* ``pmkvq-f16s-b`` (not in the default set): ``Plan.uniform`` at ``b`` bits with ``scale_dtype="float16"``,
  given the same budget in bytes per layer; its smaller tokens keep the body at more bits for longer.

``unquantized`` is the reference (a ``DynamicCache`` at the model's dtype); it has no budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers.cache_utils import Cache, DynamicCache

from ..cache import ProgressiveKVCache
from ..plan import LayerPlan, ModelGeometry, Plan
from .baselines import BaselineCache, KIVIConfig, RTNConfig, kivi_bytes, rtn_bytes

__all__ = [
    "DEFAULT_KINDS",
    "KIVI_KEY_GROUPS",
    "METHOD_KINDS",
    "Method",
    "budget_plan",
    "build_methods",
    "calibrated_bit_choices",
    "fit_kivi",
    "peak_bytes",
]

METHOD_KINDS = ("rtn", "kivi", "pmkvq-uniform", "pmkvq-calibrated", "pmkvq-f16s")
DEFAULT_KINDS = ("rtn", "kivi", "pmkvq-uniform", "pmkvq-calibrated")
KIVI_KEY_GROUPS = (32, 64, 128)  # group sizes the KIVI paper reports
KIVI_MAX_RESIDUAL = 128  # the paper's residual length


@dataclass(frozen=True)
class Method:
    """One compared method: ``make_cache()`` returns a fresh cache for one sequence of up to ``max_len`` tokens.

    ``pmkvq`` says whether the model must run with ``attn_implementation="pmkvq"``; ``budget_bytes`` is the
    budget it is compared at (None for the reference); ``peak_bytes`` its largest size over ``[1, max_len]``
    tokens by its closed-form memory model; ``settings`` are reported as they are.
    """

    name: str
    kind: str
    bits: int | None
    make_cache: Callable[[], Cache]
    pmkvq: bool = False
    budget_bytes: int | None = None
    peak_bytes: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def over_budget(self) -> bool:
        return (
            self.budget_bytes is not None
            and self.peak_bytes is not None
            and self.peak_bytes > self.budget_bytes
        )


def budget_plan(config: Any, bits: int, max_len: int, *, window: int, group_size: int | None = None) -> Plan:
    """The uniform PM-KVQ plan that defines the ``bits``-bit budget."""
    return Plan.uniform(config, bits, max_len, n_window=window, group_size=group_size)


def peak_bytes(fn: Callable[[int], int], max_len: int) -> int:
    """``max(fn(n) for n in 1..max_len)``: the peak of a per-sequence memory model."""
    return max(fn(n) for n in range(1, max_len + 1))


def fit_kivi(
    bits: int,
    budget: int,
    geo: ModelGeometry,
    max_len: int,
    *,
    value_group: int,
    key_groups: Sequence[int] = KIVI_KEY_GROUPS,
    max_residual: int = KIVI_MAX_RESIDUAL,
) -> tuple[KIVIConfig, int]:
    """The KIVI settings at ``bits`` that keep the most float16 tokens within ``budget`` (all layers).

    Candidates: key group ``G`` in ``key_groups``, residual ``R`` a multiple of ``G`` up to ``max_residual``.
    Among those whose peak bytes fit, the largest ``R``, then the smallest ``G``; when none fits, the one with
    the smallest peak. Returns ``(config, peak bytes)``.
    """
    cands = []
    for g in key_groups:
        for r in range(g, max(max_residual, g) + 1, g):
            cfg = KIVIConfig(bits=bits, key_group=g, value_group=value_group, residual=r)
            peak = geo.num_layers * peak_bytes(lambda n, c=cfg: kivi_bytes(c, geo, n), max_len)
            cands.append((cfg, peak))
    fitting = [(c, p) for c, p in cands if p <= budget]
    if fitting:
        return max(fitting, key=lambda cp: (cp[0].residual, -cp[0].key_group))
    return min(cands, key=lambda cp: cp[1])


def calibrated_bit_choices(bits: int) -> tuple[int, ...]:
    """Bit choices for the calibrated plan at a ``bits`` budget: one level above and below where they exist."""
    return tuple(b for b in (2 * bits, bits, bits // 2) if b in (8, 4, 2))


def build_methods(
    config: Any,
    budgets: Sequence[int],
    max_len: int,
    *,
    window: int = 32,
    kinds: Sequence[str] = DEFAULT_KINDS,
    calibrated_plans: dict[int, Plan] | None = None,
) -> list[Method]:
    """The reference plus every kind in ``kinds`` at every budget in ``budgets`` (bits, from {8, 4, 2}).

    Raises:
        ValueError: unknown kinds or budgets; ``pmkvq-calibrated`` asked for without a plan for that budget.
    """
    bad = [k for k in kinds if k not in METHOD_KINDS]
    if bad:
        raise ValueError(f"unknown method kinds {bad}; expected some of {list(METHOD_KINDS)}")
    badb = [b for b in budgets if b not in (8, 4, 2)]
    if badb or not budgets:
        raise ValueError(f"budget bits {badb or list(budgets)} are not supported; expected some of [8, 4, 2]")
    geo = ModelGeometry.from_config(config)
    plans = calibrated_plans or {}
    out = [
        Method(
            name="unquantized",
            kind="unquantized",
            bits=None,
            make_cache=lambda: DynamicCache(config=config),
            settings={"storage": "DynamicCache at the model dtype"},
        )
    ]
    for b in budgets:
        uplan = budget_plan(config, b, max_len, window=window)
        budget = uplan.total_budget_bytes
        gs = uplan.group_size
        for kind in kinds:
            if kind == "rtn":
                cfg = RTNConfig(bits=b, group_size=gs)
                peak = geo.num_layers * rtn_bytes(cfg, geo, max_len)
                out.append(
                    Method(
                        f"rtn-{b}",
                        kind,
                        b,
                        lambda c=cfg: BaselineCache(c, config, max_len),
                        budget_bytes=budget,
                        peak_bytes=peak,
                        settings={"bits": b, "group_size": gs, "granularity": "per token"},
                    )
                )
            elif kind == "kivi":
                kcfg, peak = fit_kivi(b, budget, geo, max_len, value_group=gs)
                out.append(
                    Method(
                        f"kivi-{b}",
                        kind,
                        b,
                        lambda c=kcfg: BaselineCache(c, config, max_len),
                        budget_bytes=budget,
                        peak_bytes=peak,
                        settings={
                            "bits": b,
                            "key_group_tokens": kcfg.key_group,
                            "value_group_channels": kcfg.value_group,
                            "residual_fp16_tokens": kcfg.residual,
                        },
                    )
                )
            elif kind == "pmkvq-uniform":
                out.append(_pmkvq_method(f"pmkvq-uniform-{b}", kind, b, uplan, config, budget))
            elif kind == "pmkvq-f16s":
                half = Plan.uniform(config, b, max_len, n_window=window, group_size=gs, scale_dtype="float16")
                half = half.with_layers(
                    [
                        LayerPlan(h.key_bits, h.value_bits, u.budget_bytes)
                        for h, u in zip(half.layers, uplan.layers)
                    ]
                )
                out.append(_pmkvq_method(f"pmkvq-f16s-{b}", kind, b, half, config, budget))
            else:
                plan = plans.get(b)
                if plan is None:
                    raise ValueError(
                        f"pmkvq-calibrated at {b} bits needs a calibrated plan (calibrated_plans[{b}]); "
                        "calibrate one with pmkvq_compile.calibrate.calibrate or leave the kind out"
                    )
                plan.check_model(config)
                if plan.max_len < max_len:
                    raise ValueError(
                        f"the calibrated plan's max_len={plan.max_len} is below max_len={max_len}"
                    )
                out.append(_pmkvq_method(f"pmkvq-calibrated-{b}", kind, b, plan, config, budget))
    return out


def _pmkvq_method(name: str, kind: str, bits: int, plan: Plan, config: Any, budget: int) -> Method:
    return Method(
        name,
        kind,
        bits,
        lambda: ProgressiveKVCache(plan, config, batch_size=1),
        pmkvq=True,
        budget_bytes=budget,
        peak_bytes=plan.total_budget_bytes,
        settings={
            "layer_bits": [[lp.key_bits, lp.value_bits] for lp in plan.layers],
            "key_reparam": any(lp.key_scale is not None for lp in plan.layers),
            "n_sink": plan.n_sink,
            "n_window": plan.n_window,
            "group_size": plan.group_size,
            "max_len": plan.max_len,
            "scale_dtype": plan.scale_dtype,
        },
    )
