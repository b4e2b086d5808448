"""The whole evaluation: build the methods, calibrate plans, score every trace, write the results JSON."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..plan import Plan
from .methods import DEFAULT_KINDS, METHOD_KINDS, Method, build_methods, calibrated_bit_choices
from .score import TraceScores, bucket_stats, score_trace, summary_stats
from .workload import Trace

__all__ = ["EvalConfig", "calibrate_plans", "format_table", "run_eval"]

RESULTS_FORMAT = "pmkvq-eval-results"


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation run (all reported in the results JSON).

    ``budgets``: budget bit-widths (see :mod:`.methods`); ``window``: PM-KVQ's 16-bit window (tokens);
    ``chunk``: teacher-forcing chunk; ``free_run``: greedy tokens after each trace; ``bucket``: positions per
    reported bucket; ``calib_samples``/``calib_seq_len``: self-written calibration text for the calibrated
    plans (seeded by ``seed``).
    """

    budgets: tuple[int, ...] = (4, 2)
    kinds: tuple[str, ...] = DEFAULT_KINDS
    window: int = 32
    chunk: int = 32
    free_run: int = 128
    bucket: int = 256
    calib_samples: int = 4
    calib_seq_len: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("window", "chunk", "bucket", "calib_samples", "calib_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an int >= 1")
        if isinstance(self.free_run, bool) or not isinstance(self.free_run, int) or self.free_run < 0:
            raise ValueError(f"free_run={self.free_run!r} must be an int >= 0")
        bad = [k for k in self.kinds if k not in METHOD_KINDS]
        if bad:
            raise ValueError(f"unknown method kinds {bad}; expected some of {list(METHOD_KINDS)}")
        badb = [b for b in self.budgets if b not in (8, 4, 2)]
        if badb or not self.budgets:
            raise ValueError(
                f"budgets {badb or list(self.budgets)} are not supported; expected some of [8, 4, 2]"
            )


def calibrate_plans(
    model: Any, tokenizer: Any, cfg: EvalConfig, max_len: int, *, progress: bool = True
) -> dict[int, Plan]:
    """One calibrated plan per budget: :func:`pmkvq_compile.calibrate.calibrate` at the budget's bytes, on
    ``calib_samples`` self-written samples (generated once, shared by the budgets; not the evaluation traces)."""
    from ..calibrate import calibrate
    from ..calibration.data import generate_samples
    from .methods import budget_plan

    samples = generate_samples(
        model,
        tokenizer=tokenizer,
        n_samples=cfg.calib_samples,
        seq_len=cfg.calib_seq_len,
        seed=cfg.seed,
        progress=progress,
    )
    plans = {}
    for b in cfg.budgets:
        budget = budget_plan(model.config, b, max_len, window=cfg.window).total_budget_bytes
        plans[b] = calibrate(
            model,
            samples,
            budget=budget,
            max_len=max_len,
            bit_choices=calibrated_bit_choices(b),
            tokenizer=tokenizer,
            n_window=cfg.window,
            seq_len=cfg.calib_seq_len,
            seed=cfg.seed,
            progress=progress,
        )
    return plans


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def _chunk_curve(scores: Sequence[TraceScores], width: int) -> dict[str, list[float]]:
    """Mean KL per ``width`` positions, pooled over traces (for the KL-vs-position plot)."""
    pos = np.concatenate([s.positions for s in scores])
    kl = np.concatenate([s.kl for s in scores])
    if pos.size == 0:
        return {"start": [], "kl_mean": []}
    starts, means = [], []
    for lo in range(0, int(pos.max()) + 1, width):
        sel = (pos >= lo) & (pos < lo + width)
        if sel.any():
            starts.append(lo)
            means.append(float(kl[sel].mean()))
    return {"start": starts, "kl_mean": means}


def run_eval(
    model: Any,
    tokenizer: Any,
    traces: Sequence[Trace],
    cfg: EvalConfig,
    *,
    calibrated_plans: dict[int, Plan] | None = None,
    model_name: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the evaluation and return the results (JSON-ready dict).

    ``calibrated_plans`` (budget bits -> plan) are calibrated here when ``pmkvq-calibrated`` is among the
    kinds and they are not given (which needs ``tokenizer`` or works without it from random prompts).
    """
    if not traces:
        raise ValueError("no traces to evaluate; pass at least one Trace")
    t_start = time.perf_counter()
    max_len = max(t.ids.numel() for t in traces) + cfg.free_run
    timing: dict[str, float] = {}
    plans = dict(calibrated_plans or {})
    if "pmkvq-calibrated" in cfg.kinds and any(b not in plans for b in cfg.budgets):
        t0 = time.perf_counter()
        plans.update(calibrate_plans(model, tokenizer, cfg, max_len, progress=progress))
        timing["calibration_s"] = time.perf_counter() - t0
    methods = build_methods(
        model.config, cfg.budgets, max_len, window=cfg.window, kinds=cfg.kinds, calibrated_plans=plans
    )
    per_trace: list[dict[str, TraceScores]] = []
    t0 = time.perf_counter()
    for tr in traces:
        per_trace.append(
            score_trace(model, tr, methods, chunk=cfg.chunk, free_run=cfg.free_run, progress=progress)
        )
    timing["scoring_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - t_start
    return _results(methods, traces, per_trace, cfg, max_len, timing, model_name)


def _results(
    methods: list[Method],
    traces: Sequence[Trace],
    per_trace: list[dict[str, TraceScores]],
    cfg: EvalConfig,
    max_len: int,
    timing: dict[str, float],
    model_name: str,
) -> dict[str, Any]:
    out_methods = []
    for m in methods:
        ss = [pt[m.name] for pt in per_trace]
        kl = np.concatenate([s.kl for s in ss])
        top1 = np.concatenate([s.top1 for s in ss])
        nll = np.concatenate([s.nll for s in ss])
        out_methods.append(
            {
                "name": m.name,
                "kind": m.kind,
                "bits": m.bits,
                "budget_bytes": m.budget_bytes,
                "model_peak_bytes": m.peak_bytes,
                "over_budget": m.over_budget,
                "measured_peak_bytes": max(max(s.nbytes) for s in ss),
                "settings": m.settings,
                "overall": summary_stats(kl, top1, nll),
                "buckets": bucket_stats(ss, cfg.bucket),
                "greedy_agreement": {s.trace: s.agree_len for s in ss},
                "greedy_agreement_mean": float(np.mean([s.agree_len for s in ss])),
                "seconds": float(sum(s.seconds for s in ss)),
                "kl_curve": _chunk_curve(ss, cfg.chunk),
                "memory": {"tokens": ss[0].tokens_held, "nbytes": ss[0].nbytes},
                "body_bits": ss[0].body_bits,
            }
        )
    return {
        "format": RESULTS_FORMAT,
        "version": 1,
        "model": model_name,
        "config": asdict(cfg),
        "max_len": max_len,
        "machine": _machine(),
        "timing": timing,
        "traces": [{"name": t.name, "prompt_len": t.prompt_len, "n_new": t.n_new} for t in traces],
        "methods": out_methods,
    }


def save_results(results: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the results JSON (indented) atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, p)
    return p


def format_table(results: dict[str, Any]) -> str:
    """A fixed-width table: one row per method."""
    head = (
        f"{'method':<22} {'peak KV MiB':>11} {'/ budget':>8} {'mean KL':>9} {'p95 KL':>9} {'top-1':>6} "
        f"{'ppl':>7} {'greedy':>7}"
    )
    rows = [head, "-" * len(head)]
    for m in results["methods"]:
        o = m["overall"]
        ratio = f"{m['measured_peak_bytes'] / m['budget_bytes']:.3f}" if m["budget_bytes"] else "-"
        rows.append(
            f"{m['name']:<22} {m['measured_peak_bytes'] / 2**20:>11.3f} {ratio:>8} {o['kl_mean']:>9.2e} "
            f"{o['kl_p95']:>9.2e} {o['top1']:>6.3f} {o['ppl']:>7.3f} {m['greedy_agreement_mean']:>7.1f}"
        )
    n = sum(t["n_new"] for t in results["traces"])
    rows.append(
        f"{len(results['traces'])} traces, {n} generated tokens scored teacher-forced in chunks of "
        f"{results['config']['chunk']}; greedy = mean leading tokens equal to the unquantized greedy "
        f"continuation (of {results['config']['free_run']})"
    )
    return "\n".join(rows)


def format_buckets(results: dict[str, Any], metric: str = "kl_mean") -> str:
    """``metric`` per position bucket (columns) and method (rows)."""
    methods = results["methods"]
    buckets = methods[0]["buckets"]
    head = f"{metric + ' by position':<22} " + " ".join(f"{b['start']:>5}-{b['end'] - 1:<5}" for b in buckets)
    rows = [head]
    for m in methods:
        rows.append(f"{m['name']:<22} " + " ".join(f"{b[metric]:>11.3e}" for b in m["buckets"]))
    return "\n".join(rows)
