"""The host's mirror of the progressive schedule: what an update of ``T`` tokens does to one layer.

The cache's state is a pure function of the token count and the plan (:mod:`pmkvq_compile.cache`), so the
runner knows, without reading the device, when a window flush and a body shrink happen, and can refuse a
step the budget cannot hold before running it (as the eager cache raises before touching anything).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..cache import BudgetExceededError
from ..kernels.layout import ArenaLayout, next_body_bits

__all__ = ["LayerMirror", "StepPlan", "plan_step"]


@dataclass(frozen=True)
class LayerMirror:
    """Host copy of one layer's counters: tokens held, window tokens, body chunks, body bits."""

    n_tokens: int
    window_len: int
    n_chunks: int
    key_bits: int
    value_bits: int

    @classmethod
    def empty(cls, lay: ArenaLayout) -> LayerMirror:
        return cls(0, 0, 0, lay.init_bits, lay.init_bits)


@dataclass(frozen=True)
class StepPlan:
    """What storing ``T`` tokens does: tokens to the sink, window flushes, body bits after, counters after."""

    to_sink: int
    n_flush: int
    key_bits: int
    value_bits: int
    after: LayerMirror


def plan_step(lay: ArenaLayout, m: LayerMirror, t: int, layer: int = 0) -> StepPlan:
    """Mirror of :meth:`pmkvq_compile.cache.ProgressiveLayer.plan_update` for ``t >= 1`` new tokens.

    Raises:
        BudgetExceededError: even a 2-bit body cannot hold the chunks (nothing should be run).
    """
    if t < 1:
        raise ValueError(f"a step stores t >= 1 tokens, got t={t}")
    to_sink = min(max(lay.n_sink - m.n_tokens, 0), t)
    n_flush = (m.window_len + t - to_sink) // lay.n_window
    chunks = m.n_chunks + n_flush
    kb, vb = m.key_bits, m.value_bits
    while chunks * lay.chunk_bytes(kb, vb) > lay.body_capacity:
        nxt = next_body_bits(kb, vb, (lay.key_bits, lay.value_bits))
        if nxt is None:
            raise BudgetExceededError(
                layer, m.n_tokens + t, lay.budget_bytes, lay.body_offset + chunks * lay.chunk_bytes(kb, vb)
            )
        kb, vb = nxt
    wl = (m.window_len + t - to_sink) % lay.n_window if n_flush else m.window_len + t - to_sink
    after = replace(m, n_tokens=m.n_tokens + t, window_len=wl, n_chunks=chunks, key_bits=kb, value_bits=vb)
    return StepPlan(to_sink, n_flush, kb, vb, after)
