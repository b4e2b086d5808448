"""The production cache: transformers ``Cache`` layers whose state lives in device tensors, served by the ops.

:class:`PackedKVCache` holds, per layer, the arena / state / table of :class:`~pmkvq_compile.passes.LayerState`
(fixed addresses, marked static for CUDA graphs). ``update`` is one ``pmkvq::append``; the ``pmkvq`` attention
implementation reads the arena with ``pmkvq::decode_attention`` / ``pmkvq::prefill_attention`` while the cache
is active (:func:`active_packed_cache`). Nothing in a step depends on a Python int that changes with the step,
so a compiled decode step is traced once and replays while the body's bit-width drops.

The host keeps a mirror of the token count (``n_tokens``), advanced outside compiled regions by whoever drives
the steps (eager ``update`` or :class:`~pmkvq_compile.compiler.PmkvqCompiledModel`), to refuse an update that
even a 2-bit body cannot hold before anything changes (:class:`~pmkvq_compile.cache.BudgetExceededError`).
Rows of a batch share one length: padded batches are refused by the driver.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from . import ops as _ops  # noqa: F401  (registers the pmkvq:: ops)
from .cache import BudgetExceededError
from .passes.context import LayerState
from .plan import ModelGeometry, Plan

__all__ = ["PackedKVCache", "PackedLayer", "active_packed_cache", "use_packed_cache"]


class PackedLayer(CacheLayerMixin):
    """One layer of :class:`PackedKVCache`."""

    is_compileable = True
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, plan: Plan, layer_idx: int, batch_size: int, device: torch.device) -> None:
        super().__init__()
        self.plan, self.layer_idx = plan, layer_idx
        self.st = LayerState.allocate(plan, layer_idx, batch_size, device)
        self.layout = self.st.layout.to_list()
        self.n_tokens = 0
        lay = self.st.layout
        # the most tokens the layer can hold: every body chunk at 2 bits, and a window one token short of a flush
        self.capacity = (
            lay.n_sink + lay.body_capacity // lay.chunk_bytes(2, 2) * lay.n_window + lay.n_window - 1
        )
        self.device = device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def check_room(self, n_new: int) -> None:
        """Raise BudgetExceededError (changing nothing) when ``n_new`` more tokens cannot be held."""
        n = self.n_tokens + n_new
        if n > self.capacity:
            lay = self.st.layout
            chunks = max(n - lay.n_sink, 0) // lay.n_window  # what the body would hold, all at 2 bits
            needed = lay.body_offset + chunks * lay.chunk_bytes(2, 2)
            raise BudgetExceededError(self.layer_idx, n, lay.budget_bytes, needed)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append ``[B, Hkv, T, D]`` keys/values; returns them unchanged (the attention reads the arena)."""
        compiling = torch.compiler.is_compiling()
        if not compiling:
            self.check_room(key_states.shape[2])
        st = self.st
        torch.ops.pmkvq.append(
            st.arena, st.state, st.table, key_states.contiguous(), value_states.contiguous(), st.key_scale,
            self.layout,
        )  # fmt: skip
        if not compiling:
            self.n_tokens += key_states.shape[2]
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.n_tokens

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the pmkvq attention ignores the mask (causal, unpadded): keep its size static inside compiled steps
        if torch.compiler.is_compiling():
            return self.plan.max_len, 0
        return self.n_tokens + query_length, 0

    def reset(self) -> None:
        self.st.reset()
        self.n_tokens = 0

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """``query [B, Hq, T, D]`` over the arena's past and this step's ``key/value [B, Hkv, T, D]``."""
        st = self.st
        b, _, t, _ = key.shape
        if t > 1 and not torch.compiler.is_compiling() and self.n_tokens == t:
            # a prompt with no past: plain causal attention over its own (full-precision) tokens, flash kernels
            return F.scaled_dot_product_attention(
                query, key.to(query.dtype), value.to(query.dtype), is_causal=True, scale=scaling,
                enable_gqa=query.shape[1] != key.shape[1],
            )  # fmt: skip
        lengths = (st.state[:1] - t).expand(b).contiguous()
        k, v = key.contiguous(), value.contiguous()
        args = (st.arena, st.state, st.table, lengths, st.key_scale, self.layout, float(scaling))
        if query.shape[2] == 1:
            out = torch.ops.pmkvq.decode_attention(query[:, :, 0].contiguous(), k, v, *args, 0)
            return out.unsqueeze(2)
        return torch.ops.pmkvq.prefill_attention(query.contiguous(), k, v, *args)


class PackedKVCache(Cache):
    """Args: plan; config (or ModelGeometry), checked against the plan; batch_size; device."""

    def __init__(
        self, plan: Plan, config: Any, *, batch_size: int = 1, device: torch.device | str = "cpu"
    ) -> None:
        if not isinstance(plan, Plan):
            raise ValueError(f"plan must be a pmkvq_compile.Plan, got {type(plan).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
        plan.check_model(ModelGeometry.from_config(config))
        self.plan = plan
        dev = torch.device(device)
        super().__init__(
            layers=[PackedLayer(plan, i, batch_size, dev) for i in range(plan.geometry.num_layers)]
        )

    def check_room(self, n_new: int) -> None:
        for layer in self.layers:
            layer.check_room(n_new)

    def advance(self, n_new: int) -> None:
        """Advance the host mirrors after a compiled step appended ``n_new`` tokens to every layer."""
        for layer in self.layers:
            layer.n_tokens += n_new

    def nbytes(self, layer: int | None = None) -> int:
        """Bytes the held tokens need, per sequence (reads device state)."""
        if layer is not None:
            return self.layers[layer].st.nbytes()
        return sum(lay.st.nbytes() for lay in self.layers)

    def body_bits(self, layer: int) -> tuple[int, int]:
        """Current (key, value) body bits of ``layer`` (reads device state)."""
        return self.layers[layer].st.body_bits()

    def allocated_bytes(self) -> int:
        return sum(lay.st.arena.numel() for lay in self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].n_tokens if layer_idx < len(self.layers) else 0


_ACTIVE: list[PackedKVCache] = []


def active_packed_cache() -> PackedKVCache | None:
    """The packed cache the ``pmkvq`` attention serves from, inside :func:`use_packed_cache`."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def use_packed_cache(cache: PackedKVCache) -> Iterator[PackedKVCache]:
    """Within the block the ``pmkvq`` attention reads ``cache``'s arenas through the ops."""
    _ACTIVE.append(cache)
    try:
        yield cache
    finally:
        _ACTIVE.pop()
