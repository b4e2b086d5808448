"""The decoder step that is exported: a transformers decoder whose attention reads and writes named cache state.

:class:`DecoderStep` wraps a Llama-family ``*ForCausalLM`` and takes, besides ``input_ids [B, T]``,
``attention_mask [B, P + T]`` and ``position_ids [B, T]``, every layer's cache state as flat tensors; it
returns ``logits [B, T, V]`` and every layer's updated state. Attention of layer ``i`` goes through an
export-only attention function (registered in transformers' ``AttentionInterface`` under
``"pmkvq_export"``, selected only inside :func:`export_patches`, which restores the previous implementation
on exit) that calls one torch.library op per layer:

* ``pmkvq_onnx::custom_layer`` (flavor ``"custom"``): translated to ``pmkvq.Append`` + ``pmkvq.Attention``;
* ``pmkvq_onnx::standard_layer`` (flavor ``"standard"``): translated to standard ONNX ops
  (:mod:`pmkvq_compile.export.standard`).

Both ops are functional (state in, updated state out) so the exported graph has ``past_key_values.{i}.*``
inputs and ``present.{i}.*`` outputs, as optimum-onnx names a decoder's past. The model's weights and modeling
code are not modified.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..kernels import reference
from ..kernels.layout import ArenaLayout
from ..plan import Plan
from . import standard_ref

__all__ = [
    "EXPORT_ATTN",
    "FLAVORS",
    "DecoderStep",
    "StateSpec",
    "attend",
    "export_patches",
    "state_specs",
]

EXPORT_ATTN = "pmkvq_export"
FLAVORS = ("custom", "standard")


@dataclass(frozen=True)
class StateSpec:
    """One per-layer state tensor: graph name suffix (``past_key_values.{i}.<name>``), dtype, shape.

    A dimension given as a string is symbolic (``"batch"`` or a per-layer capacity name).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int | str, ...]
    dynamic: dict[int, str]

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == "batch" else int(d) for d in self.shape)


def state_specs(plan: Plan, layer: int, flavor: str) -> list[StateSpec]:
    """The state tensors of ``layer`` in graph order (see the README's ONNX section for their meaning)."""
    lay = ArenaLayout.from_plan(plan, layer)
    if flavor == "custom":
        return [
            StateSpec("arena", torch.uint8, ("batch", lay.budget_bytes), {0: "batch"}),
            StateSpec("state", torch.int32, (8,), {}),
            StateSpec("table", torch.int32, (lay.max_chunks, 3), {}),
        ]
    if flavor == "standard":
        return standard_ref.specs(lay)
    raise ValueError(f"flavor={flavor!r} is not supported; expected one of {list(FLAVORS)}")


def attend(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_past: torch.Tensor,
    v_past: torch.Tensor,
    key_scale: torch.Tensor,
    attention_mask: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """The eager path's attention (:func:`pmkvq_compile.attention.pmkvq_attention_forward`) with a 2-D mask.

    ``q [B, Hq, T, D]``, ``k_new/v_new [B, Hkv, T, D]`` (keys not yet divided by ``key_scale [Hkv, D/2]``),
    ``k_past/v_past`` float32 ``[B, Hkv, P, D]`` as stored, ``attention_mask [B, P + T]`` (nonzero = attend).
    Returns float32 ``[B, Hq, T, D]``.
    """
    hq, t = q.shape[1], q.shape[2]
    hkv = k_new.shape[1]
    rep = hq // hkv
    s = torch.cat([key_scale, key_scale], dim=-1).float()  # [Hkv, D]
    k = torch.cat([k_past, (k_new.float() / s[None, :, None, :])], dim=2).repeat_interleave(rep, dim=1)
    v = torch.cat([v_past, v_new.float()], dim=2).repeat_interleave(rep, dim=1)
    qs = q.float() * s.repeat_interleave(rep, dim=0)[None, :, None, :]
    p = k_past.shape[2]
    i = torch.arange(t, device=q.device)[:, None]
    j = torch.arange(p + t, device=q.device)[None, :]
    allowed = (j <= i + p)[None, None] & (attention_mask[:, None, None, :] != 0)  # [B, 1, T, P + T]
    return F.scaled_dot_product_attention(qs, k, v, attn_mask=allowed, scale=sm_scale)


# ---- the export-only ops ---------------------------------------------------------------------------------
@torch.library.custom_op("pmkvq_onnx::custom_layer", mutates_args=())
def custom_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    arena: torch.Tensor,
    state: torch.Tensor,
    table: torch.Tensor,
    key_scale: torch.Tensor,
    attention_mask: torch.Tensor,
    layout: list[int],
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer of the custom flavor: ``pmkvq.Append`` then ``pmkvq.Attention`` (see ``schema.json``).

    Returns ``(out [B, Hq, T, D], arena, state, table)`` (updated copies).
    """
    arena, state, table = arena.clone(), state.clone(), table.clone()
    past = int(state[0])
    reference.append(arena, state, table, k, v, key_scale, layout)
    kp, vp = reference.dequantize_past(arena, state, table, layout, past)
    out = attend(q, k, v, kp, vp, key_scale, attention_mask, sm_scale)
    return out.to(q.dtype), arena, state, table


@custom_layer.register_fake
def _(q, k, v, arena, state, table, key_scale, attention_mask, layout, sm_scale):
    return torch.empty_like(q), torch.empty_like(arena), torch.empty_like(state), torch.empty_like(table)


@torch.library.custom_op("pmkvq_onnx::standard_layer", mutates_args=())
def standard_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state_tensors: list[torch.Tensor],
    key_scale: torch.Tensor,
    attention_mask: torch.Tensor,
    layout: list[int],
    sm_scale: float,
) -> list[torch.Tensor]:
    """One layer of the standard flavor (:func:`standard_ref.step`): ``[out [B, Hq, T, D], *state]``."""
    lay = ArenaLayout.from_list(layout)
    out, new_state = standard_ref.step(lay, q, k, v, list(state_tensors), key_scale, attention_mask, sm_scale)
    return [out.to(q.dtype), *new_state]


@standard_layer.register_fake
def _(q, k, v, state_tensors, key_scale, attention_mask, layout, sm_scale):
    return [torch.empty_like(q), *(torch.empty_like(t) for t in state_tensors)]


# ---- the decoder step ------------------------------------------------------------------------------------
@dataclass
class _StepContext:
    flavor: str
    layouts: list[list[int]]
    key_scales: list[torch.Tensor]
    states: list[list[torch.Tensor]]
    attention_mask: torch.Tensor
    present: dict[int, list[torch.Tensor]]


_STEP: contextvars.ContextVar[_StepContext | None] = contextvars.ContextVar("pmkvq_export_step", default=None)


def _export_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface function used during export: ``query [B, Hq, T, D]`` -> ``[B, T, Hq, D]``."""
    ctx = _STEP.get()
    if ctx is None:
        raise ValueError("attn_implementation='pmkvq_export' is only usable inside DecoderStep.forward")
    i = int(module.layer_idx)
    sm = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    if ctx.flavor == "custom":
        out, *new = torch.ops.pmkvq_onnx.custom_layer(
            query, key, value, *ctx.states[i], ctx.key_scales[i], ctx.attention_mask, ctx.layouts[i], sm
        )
    else:
        out, *new = torch.ops.pmkvq_onnx.standard_layer(
            query, key, value, ctx.states[i], ctx.key_scales[i], ctx.attention_mask, ctx.layouts[i], sm
        )
    ctx.present[i] = list(new)
    return out.transpose(1, 2), None


@contextlib.contextmanager
def export_patches(model: Any) -> Iterator[Any]:
    """Select the export attention on ``model`` for the block; the previous implementation is restored."""
    AttentionInterface.register(EXPORT_ATTN, _export_attention)
    AttentionMaskInterface.register(EXPORT_ATTN, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(EXPORT_ATTN)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


class DecoderStep(torch.nn.Module):
    """``forward(input_ids [B, T] int64, attention_mask [B, P + T] int64, position_ids [B, T] int64, *state)``
    -> ``(logits [B, T, V] float32, *present_state)``; state per layer in :func:`state_specs` order.

    Use inside :func:`export_patches` (or for eager checks of the export ops).
    """

    def __init__(self, model: Any, plan: Plan, flavor: str) -> None:
        super().__init__()
        if flavor not in FLAVORS:
            raise ValueError(f"flavor={flavor!r} is not supported; expected one of {list(FLAVORS)}")
        self.model = model
        self.plan = plan
        self.flavor = flavor
        g = plan.geometry
        self.layouts = [ArenaLayout.from_plan(plan, i).to_list() for i in range(g.num_layers)]
        self.n_state = len(state_specs(plan, 0, flavor))
        for i, lp in enumerate(plan.layers):
            s = lp.key_scale
            if s is None or plan.key_scales_folded:
                s = torch.ones(g.num_kv_heads, g.head_dim // 2)
            self.register_buffer(f"key_scale_{i}", s.float().contiguous(), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *state: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        n = self.n_state
        layers = len(self.layouts)
        ctx = _StepContext(
            flavor=self.flavor,
            layouts=self.layouts,
            key_scales=[getattr(self, f"key_scale_{i}") for i in range(layers)],
            states=[list(state[i * n : (i + 1) * n]) for i in range(layers)],
            attention_mask=attention_mask,
            present={},
        )
        token = _STEP.set(ctx)
        try:
            logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        finally:
            _STEP.reset(token)
        flat = [t for i in range(layers) for t in ctx.present[i]]
        return (logits.float(), *flat)
