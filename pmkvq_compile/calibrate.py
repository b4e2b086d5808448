"""``calibrate``: a model (and optional calibration data) in, a :class:`~pmkvq_compile.plan.Plan` out.

Phases, each with a progress bar: calibration text (when none is given) -> key statistics with positional
interpolation and the per-layer alpha search (key reparameterization) -> sensitivity profiling with
positional interpolation (on the reparameterized keys) -> the HiGHS integer program.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import quant
from .calibration.data import generate_samples, prepare_samples
from .calibration.reparam import collect_key_statistics, fold_key_scales, search_key_scales
from .plan import LayerPlan, ModelGeometry, Plan
from .planning.allocate import (
    InfeasibleBudgetError,
    allocate,
    check_bit_choices,
    kv_options,
    min_budget,
    parse_budget,
)
from .planning.sensitivity import profile_sensitivity

__all__ = ["calibrate", "check_calibration_args"]


def check_calibration_args(
    config: Any,
    *,
    budget: int | str,
    max_len: int,
    bit_choices: Sequence[int],
    separate_kv: bool = False,
    group_size: int | None = None,
    n_sink: int = 1,
    n_window: int = 128,
    scale_dtype: str = "float32",
) -> tuple[Plan, int, tuple[int, ...]]:
    """Validate everything that needs no model weights; returns ``(prototype plan, budget bytes, bit choices)``.

    Raises ValueError for: bit choices outside {16, 8, 4, 2}; ``max_len`` above the model's
    ``max_position_embeddings``; a malformed budget; a budget below the smallest feasible one (the error,
    an :class:`InfeasibleBudgetError`, names that budget).
    """
    bits = check_bit_choices(bit_choices)
    geo = ModelGeometry.from_config(config)
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len={max_len!r} must be an int >= 2")
    if geo.max_position_embeddings is not None and max_len > geo.max_position_embeddings:
        raise ValueError(
            f"max_len={max_len} exceeds the model's max_position_embeddings={geo.max_position_embeddings}; "
            f"use max_len <= {geo.max_position_embeddings}"
        )
    proto = Plan.uniform(
        geo,
        min(bits),
        max_len,
        group_size=group_size,
        n_sink=n_sink,
        n_window=n_window,
        scale_dtype=scale_dtype,
    )
    nbytes = parse_budget(budget, proto)
    options = kv_options(bits, separate_kv)
    floor = min_budget(proto, options)
    if nbytes < floor:
        raise InfeasibleBudgetError(
            nbytes, floor, f"every layer at {min(bits)} bits with max_len={max_len}, bit_choices={list(bits)}"
        )
    return proto, nbytes, bits


def calibrate(
    model: Any,
    calibration: Any = None,
    *,
    budget: int | str,
    max_len: int,
    bit_choices: Sequence[int] = (4, 2),
    tokenizer: Any | None = None,
    separate_kv: bool = False,
    reparam: bool = True,
    fold: bool = False,
    reparam_bits: int | None = None,
    pi: bool = True,
    effective_len: int | None = None,
    n_samples: int = 4,
    seq_len: int = 256,
    group_size: int | None = None,
    n_sink: int = 1,
    n_window: int = 128,
    scale_dtype: str = "float32",
    seed: int = 0,
    progress: bool = True,
) -> Plan:
    """Calibrate a PM-KVQ plan for ``model`` (a transformers Llama/Qwen2/Mistral causal LM, eval mode).

    Args:
        calibration: None (the model writes ``n_samples`` samples of ``seq_len`` tokens from neutral prompts,
            seeded by ``seed``), int64 token ids ``[T]``/``[N, T]``/list of ``[T_i]``, or texts with ``tokenizer``.
        budget: total KV bytes for one sequence of ``max_len`` tokens, or ``"<N>bit"``: the bytes of a cache
            whose body averages N bits per element, scales, zeros, sink and window included (linear
            interpolation of the memory model, see :func:`pmkvq_compile.planning.bits_budget`).
        bit_choices: the body bit-widths the integer program may pick, from {16, 8, 4, 2}.
        separate_kv: let keys and values of a layer get different bit-widths.
        reparam: calibrate key reparameterization scales (stored as ``LayerPlan.key_scale``).
        fold: fold the scales into ``model``'s q/k projections **in place** and mark the plan
            ``key_scales_folded`` (the plan then only fits the folded weights).
        reparam_bits: bits the alpha search quantizes K and V at; default the lowest bit choice.
        pi: positional interpolation: samples stand for ``effective_len`` tokens (default ``max_len``).
        group_size, n_sink, n_window: the plan's quantizer group and regions.
        scale_dtype: ``"float16"`` stores the scales and zeros of tokens at 8 bits or fewer as float16
            (:class:`pmkvq_compile.Plan`); the memory model, and so the integer program, count them so.

    Raises:
        ValueError: bad bits, ``max_len`` above the model's positions, bad or infeasible budget (naming the
            smallest feasible budget), empty calibration data. Raised before any model pass; the model is
            modified only when ``fold`` is set and everything else succeeded.
    """
    proto, nbytes, bits = check_calibration_args(
        model.config,
        budget=budget,
        max_len=max_len,
        bit_choices=bit_choices,
        separate_kv=separate_kv,
        group_size=group_size,
        n_sink=n_sink,
        n_window=n_window,
        scale_dtype=scale_dtype,
    )
    rbits = min(bits) if reparam_bits is None else quant.check_bits(reparam_bits, what="reparam_bits")
    eff = (effective_len or max_len) if pi else None
    mpe = proto.geometry.max_position_embeddings
    if eff is not None and mpe is not None and eff > mpe:
        raise ValueError(f"effective_len={eff} exceeds the model's max_position_embeddings={mpe}")
    vocab = getattr(model.config, "vocab_size", None)
    if calibration is None:
        samples = generate_samples(
            model, tokenizer=tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed, progress=progress
        )
    else:
        samples = prepare_samples(calibration, tokenizer=tokenizer, seq_len=seq_len, vocab_size=vocab)
    was_training = model.training
    model.eval()
    try:
        scales: list[torch.Tensor | None] = [None] * proto.geometry.num_layers
        alphas: tuple[float, ...] = ()
        if reparam:
            stats = collect_key_statistics(model, samples, effective_len=eff, progress=progress)
            result = search_key_scales(stats, key_bits=rbits, group_size=proto.group_size, progress=progress)
            scales, alphas = list(result.scales), result.alphas
        sens = profile_sensitivity(
            model,
            samples,
            bit_choices=bits,
            group_size=proto.group_size,
            effective_len=eff,
            key_scales=scales if reparam else None,
            progress=progress,
        )
        layers = allocate(proto, sens, nbytes, separate_kv=separate_kv)
    finally:
        model.train(was_training)
    layers = [
        LayerPlan(lp.key_bits, lp.value_bits, lp.budget_bytes, key_scale=s) for lp, s in zip(layers, scales)
    ]
    metadata = {
        "source": "pmkvq calibrate",
        "budget_bytes": str(nbytes),
        "bit_choices": ",".join(map(str, bits)),
        "separate_kv": str(bool(separate_kv)).lower(),
        "pi_effective_len": str(eff or 0),
        "calibration_samples": str(len(samples)),
        "calibration_tokens": str(sum(int(s.numel()) for s in samples)),
        "reparam_alphas": ",".join(f"{a:g}" for a in alphas),
        "seed": str(seed),
    }
    plan = proto.with_layers(layers, metadata=metadata)
    if reparam and fold:
        fold_key_scales(model, scales)
        plan = plan.with_layers(plan.layers, key_scales_folded=True)
    return plan
