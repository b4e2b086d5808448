"""Ops that reach a layer's packed state through a registered handle, for graphs that cannot take new inputs.

Inductor's post-grad custom pass runs on a graph whose inputs are fixed and whose constants must be fake
during lowering, so there the rewrite cannot wire the arena in as a tensor. Instead the pass registers each
layer's :class:`~pmkvq_compile.passes.context.LayerState` here and emits:

``pmkvq::append_registered(Tensor key, Tensor value, Tensor? positions, int handle, int restart) -> Tensor``
    ``restart``: 0 never, 1 when ``positions[0] == 0``, 2 always; then ``pmkvq::append``. Returns ``lengths``
    int32 ``[B]`` (the past tokens), which the attention op takes, so the two stay ordered.

``pmkvq::attention_registered(Tensor q, Tensor k, Tensor v, Tensor lengths, int handle, float scale) -> Tensor``
    ``pmkvq::decode_attention`` (one query) or ``pmkvq::prefill_attention`` over the registered state.

The state tensors keep fixed addresses, so CUDA graphs replay them; no op here syncs with the host.
"""

from __future__ import annotations

import itertools

import torch

from .. import ops as _ops  # noqa: F401  (registers the pmkvq:: ops)
from .context import LayerState

__all__ = ["register_state"]

_REGISTRY: dict[int, LayerState] = {}
_NEXT = itertools.count(1)


def register_state(state: LayerState) -> int:
    """Register ``state`` and return its handle (kept for the life of the process)."""
    h = next(_NEXT)
    _REGISTRY[h] = state
    return h


def _get(handle: int) -> LayerState:
    st = _REGISTRY.get(handle)
    if st is None:
        raise ValueError(f"no pmkvq layer state is registered under handle {handle}")
    return st


@torch.library.custom_op("pmkvq::append_registered", mutates_args=())
def append_registered(
    key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor | None, handle: int, restart: int
) -> torch.Tensor:
    """See the module docstring."""
    st = _get(handle)
    if restart == 2:
        torch.ops.pmkvq.restart_always(st.state, st.layout.init_bits)
    elif restart == 1 and positions is not None:
        torch.ops.pmkvq.restart(st.state, positions, st.layout.init_bits)
    torch.ops.pmkvq.append(st.arena, st.state, st.table, key, value, st.key_scale, st.layout.to_list())
    return (st.state[:1] - key.shape[2]).expand(key.shape[0]).contiguous()


@append_registered.register_fake
def _(key, value, positions, handle, restart):
    return torch.empty(key.shape[0], dtype=torch.int32, device=key.device)


@torch.library.custom_op("pmkvq::attention_registered", mutates_args=())
def attention_registered(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, handle: int, scale: float
) -> torch.Tensor:
    """See the module docstring. ``q [B, Hq, T, D]`` -> ``[B, Hq, T, D]``."""
    st = _get(handle)
    args = (st.arena, st.state, st.table, lengths, st.key_scale, st.layout.to_list(), scale)
    if q.shape[2] == 1:
        out = torch.ops.pmkvq.decode_attention(q[:, :, 0].contiguous(), k, v, *args, 0)
        return out.unsqueeze(2).contiguous()
    return torch.ops.pmkvq.prefill_attention(q.contiguous(), k, v, *args)


@attention_registered.register_fake
def _(q, k, v, lengths, handle, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
