"""Teacher-forced scoring of every method against the unquantized reference, in lockstep, plus free-running
greedy agreement.

The trace is fed in chunks of ``chunk`` tokens to the reference and to each method's cache, one chunk at a
time: inside a chunk the tokens attend to each other in full precision (like a prefill), the past comes
from each method's cache as stored. For every position that predicts a generated token we record, per
method: ``KL(p_ref || p_method)`` of the next-token distributions (nats), whether the top-1 tokens agree,
and the negative log-likelihood of the trace's token. After each chunk each cache's bytes (and PM-KVQ's
per-layer body bits) are recorded.

After the trace, every cache goes on *free-running*: greedy decoding, one token per step, from the end of
the trace, where the caches are fullest. The agreement length is the number of leading tokens identical to
the reference's own greedy continuation (at most ``free_run``; decoding stops at the first difference).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import use_pmkvq_attention
from ..models import cache_kwarg
from .baselines import kv_nbytes
from .methods import Method
from .workload import Trace

__all__ = ["TraceScores", "bucket_stats", "score_trace", "summary_stats"]


@dataclass
class TraceScores:
    """Per-position arrays (float64/bool numpy ``[n_scored]``) and per-chunk memory for one trace and method."""

    method: str
    trace: str
    positions: np.ndarray  # index in the generated part of the token being predicted (0 = first generated)
    kl: np.ndarray
    top1: np.ndarray
    nll: np.ndarray
    tokens_held: list[int] = field(default_factory=list)  # after each chunk
    nbytes: list[int] = field(default_factory=list)
    body_bits: list[list[int]] = field(default_factory=list)  # per chunk, per layer: max(key, value) bits
    agree_len: int = 0
    free_run: int = 0
    seconds: float = 0.0


def _forward(model: Any, ids: torch.Tensor, cache: Any, key: str, pmkvq: bool) -> torch.Tensor:
    """Logits float32 ``[T, V]`` for ``ids`` ``[T]`` appended to ``cache``."""
    ctx = use_pmkvq_attention(model) if pmkvq else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=ids.unsqueeze(0), use_cache=True, **{key: cache})
    return out.logits[0].float()


def _record_memory(s: TraceScores, cache: Any, method: Method) -> None:
    s.tokens_held.append(int(cache.get_seq_length()))
    s.nbytes.append(kv_nbytes(cache))
    if method.pmkvq:
        s.body_bits.append([max(cache.body_bits(i)) for i in range(len(cache.layers))])


def score_trace(
    model: Any,
    trace: Trace,
    methods: Sequence[Method],
    *,
    chunk: int = 32,
    free_run: int = 128,
    progress: bool = True,
) -> dict[str, TraceScores]:
    """Score ``methods`` (the first must be the reference ``unquantized``) on ``trace``.

    Args:
        model: a transformers causal LM in eval mode (batch 1).
        chunk: tokens fed per forward call (>= 1).
        free_run: greedy tokens decoded after the trace (>= 0).

    Returns:
        ``{method name: TraceScores}``, the reference included (its KL is 0 and top-1 agreement 1).

    Raises:
        ValueError: bad ``chunk``/``free_run``, no reference method first, duplicate names.
    """
    from tqdm.auto import tqdm

    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be an int >= 1")
    if isinstance(free_run, bool) or not isinstance(free_run, int) or free_run < 0:
        raise ValueError(f"free_run={free_run!r} must be an int >= 0")
    if not methods or methods[0].kind != "unquantized":
        raise ValueError("the first method must be the unquantized reference (see build_methods)")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    key = cache_kwarg(model)
    ids = trace.ids
    n, p0 = ids.numel(), trace.prompt_len
    caches = {m.name: m.make_cache() for m in methods}
    parts: dict[str, dict[str, list]] = {
        m.name: {"kl": [], "top1": [], "nll": [], "pos": []} for m in methods
    }
    scores = {
        m.name: TraceScores(m.name, trace.name, np.zeros(0), np.zeros(0), np.zeros(0, bool), np.zeros(0))
        for m in methods
    }
    seconds = dict.fromkeys(names, 0.0)
    last_logits: dict[str, torch.Tensor] = {}
    starts = range(0, n, chunk)
    with torch.no_grad():
        for start in tqdm(starts, desc=f"scoring {trace.name}", disable=not progress, leave=False):
            x = ids[start : start + chunk]
            # positions start..start+T-1 predict tokens start+1..start+T; keep predictions of generated tokens
            tgt = torch.arange(start + 1, start + 1 + x.numel())
            keep = (tgt >= p0) & (tgt < n)
            ref_logp = None
            for m in methods:
                t0 = time.perf_counter()
                logits = _forward(model, x, caches[m.name], key, m.pmkvq)
                seconds[m.name] += time.perf_counter() - t0
                last_logits[m.name] = logits[-1]
                logp = F.log_softmax(logits, dim=-1)
                if ref_logp is None:
                    ref_logp = logp
                if keep.any():
                    lp, rp = logp[keep], ref_logp[keep]
                    kl = (rp.exp() * (rp - lp)).sum(-1).clamp_min(0.0)
                    d = parts[m.name]
                    d["kl"].append(kl.double().numpy())
                    d["top1"].append((lp.argmax(-1) == rp.argmax(-1)).numpy())
                    d["nll"].append((-lp.gather(-1, ids[tgt[keep]].unsqueeze(-1))[:, 0]).double().numpy())
                    d["pos"].append((tgt[keep] - p0).numpy())
                _record_memory(scores[m.name], caches[m.name], m)
        # free-running greedy continuation: the reference first, then each method until it differs
        ref_name = methods[0].name
        ref_tokens: list[int] = []
        if free_run:
            tok = int(last_logits[ref_name].argmax())
            for _ in range(free_run):
                ref_tokens.append(tok)
                if len(ref_tokens) == free_run:
                    break
                logits = _forward(model, torch.tensor([tok]), caches[ref_name], key, False)
                tok = int(logits[-1].argmax())
        for m in methods:
            s = scores[m.name]
            s.free_run = free_run
            if m.name == ref_name:
                s.agree_len = len(ref_tokens)
                continue
            agree = 0
            tok = int(last_logits[m.name].argmax())
            t0 = time.perf_counter()
            while agree < len(ref_tokens) and tok == ref_tokens[agree]:
                agree += 1
                if agree == len(ref_tokens):
                    break
                tok = int(_forward(model, torch.tensor([tok]), caches[m.name], key, m.pmkvq)[-1].argmax())
            seconds[m.name] += time.perf_counter() - t0
            s.agree_len = agree
    for m in methods:
        s, d = scores[m.name], parts[m.name]
        s.kl = np.concatenate(d["kl"]) if d["kl"] else np.zeros(0)
        s.top1 = np.concatenate(d["top1"]) if d["top1"] else np.zeros(0, bool)
        s.nll = np.concatenate(d["nll"]) if d["nll"] else np.zeros(0)
        s.positions = np.concatenate(d["pos"]) if d["pos"] else np.zeros(0, np.int64)
        s.seconds = seconds[m.name]
    return scores


def summary_stats(kl: np.ndarray, top1: np.ndarray, nll: np.ndarray) -> dict[str, float]:
    """Mean and 95th-percentile KL (nats), top-1 agreement, perplexity ``exp(mean NLL)``, count."""
    if kl.size == 0:
        return {
            "kl_mean": float("nan"),
            "kl_p95": float("nan"),
            "top1": float("nan"),
            "ppl": float("nan"),
            "n": 0,
        }
    return {
        "kl_mean": float(kl.mean()),
        "kl_p95": float(np.percentile(kl, 95)),
        "top1": float(top1.mean()),
        "ppl": float(np.exp(nll.mean())),
        "n": int(kl.size),
    }


def bucket_stats(scores: Sequence[TraceScores], bucket: int) -> list[dict[str, float]]:
    """:func:`summary_stats` per bucket of ``bucket`` generated positions, pooled over traces."""
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
        raise ValueError(f"bucket={bucket!r} must be an int >= 1")
    pos = np.concatenate([s.positions for s in scores])
    kl = np.concatenate([s.kl for s in scores])
    top1 = np.concatenate([s.top1 for s in scores])
    nll = np.concatenate([s.nll for s in scores])
    out = []
    if pos.size == 0:
        return out
    for lo in range(0, int(pos.max()) + 1, bucket):
        sel = (pos >= lo) & (pos < lo + bucket)
        out.append({"start": lo, "end": lo + bucket, **summary_stats(kl[sel], top1[sel], nll[sel])})
    return out
