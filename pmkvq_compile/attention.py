"""The ``pmkvq`` attention implementation registered in transformers' ``AttentionInterface``.

``"pmkvq_packed"`` serves from the packed arenas of :class:`~pmkvq_compile.packed_cache.PackedKVCache` through
the fused ops (the production path, compiled or not). ``"pmkvq"`` is the eager reference path:

Attention reads the past from the quantized arena of the :class:`~pmkvq_compile.cache.ProgressiveLayer`
that just stored this step's tokens; the step's own tokens are attended in full precision (what the
prefill and decode kernels do too). When the key tensor did not come from a progressive cache (no cache,
or another cache class), the call falls through to plain SDPA on the given tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import cache as cache_mod
from .packed_cache import active_packed_cache

__all__ = ["ATTN_IMPLEMENTATION", "pmkvq_attention_forward", "register", "use_pmkvq_attention"]

ATTN_IMPLEMENTATION = "pmkvq"
PACKED_IMPLEMENTATION = "pmkvq_packed"


def _sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """SDPA with GQA by repetition and a causal fallback when the mask was skipped. Returns [B, Tq, Hq, D]."""
    hq, hkv = query.shape[1], key.shape[1]
    if hq != hkv:
        key = key.repeat_interleave(hq // hkv, dim=1)
        value = value.repeat_interleave(hq // hkv, dim=1)
    tq, tk = query.shape[2], key.shape[2]
    mask = attention_mask
    if mask is not None and mask.dim() == 4:
        mask = mask[:, :, :, :tk]
    if mask is None and tq > 1:
        # causal with the past in front: query i sees keys [0, tk - tq + i]
        i = torch.arange(tq, device=query.device)[:, None]
        j = torch.arange(tk, device=query.device)[None, :]
        mask = j <= i + (tk - tq)
    out = F.scaled_dot_product_attention(
        query, key.to(query.dtype), value.to(query.dtype), attn_mask=mask, scale=scaling
    )
    return out.transpose(1, 2).contiguous()


def _refuse_unsupported(dropout: float, kwargs: dict[str, Any]) -> None:
    if dropout:
        raise ValueError(f"pmkvq attention does not support dropout={dropout}; call model.eval()")
    if kwargs.get("softcap") is not None:
        raise ValueError("pmkvq attention does not support soft-capped attention (softcap)")


def pmkvq_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: ``query [B, Hq, T, D]``, ``key/value [B, Hkv, T, D]``.

    Returns ``(attn_output [B, T, Hq, D], None)``. Refuses dropout > 0 and soft-capping (the quantized
    cache is an inference feature).
    """
    _refuse_unsupported(dropout, kwargs)
    last = cache_mod._LAST_UPDATE.get()
    if last is None or last[1] is not key:
        return _sdpa(query, key, value, attention_mask, scaling), None
    layer = last[0]
    t = key.shape[2]
    k_all, v_all = layer.dequantized()  # [B, Hkv, n_tokens, D] float32, keys already divided by the scale
    past = k_all.shape[2] - t
    k_all = torch.cat([k_all[:, :, :past], layer.scale_keys(key).float()], dim=2)
    v_all = torch.cat([v_all[:, :, :past], value.float()], dim=2)
    q = layer.scale_queries(query)
    return _sdpa(q, k_all, v_all, attention_mask, scaling), None


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``attn_implementation="pmkvq_packed"``: fused ops over the active packed cache's arena.

    Causal and unpadded by construction (this implementation registers no mask function, so transformers builds
    no mask: nothing in a compiled step depends on the length). ``query [B, Hq, T, D]`` -> ``[B, T, Hq, D]``.
    Refuses dropout, soft-capping, and being called outside :func:`~pmkvq_compile.packed_cache.use_packed_cache`.
    """
    _refuse_unsupported(dropout, kwargs)
    packed = active_packed_cache()
    if packed is None:
        raise ValueError(
            "attn_implementation 'pmkvq_packed' needs an active PackedKVCache (use_packed_cache)"
        )
    out = packed.layers[module.layer_idx].attend(query, key, value, scaling or query.shape[-1] ** -0.5)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``attn_implementation="pmkvq"`` (attention + SDPA-style mask) and ``"pmkvq_packed"``. Idempotent."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, pmkvq_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    AttentionInterface.register(PACKED_IMPLEMENTATION, packed_attention_forward)


@contextlib.contextmanager
def use_pmkvq_attention(model: Any, implementation: str = ATTN_IMPLEMENTATION) -> Iterator[Any]:
    """Within the block, ``model`` runs attention through ``implementation`` (``"pmkvq"`` or ``"pmkvq_packed"``);
    the previous implementation is restored on exit."""
    if implementation not in (ATTN_IMPLEMENTATION, PACKED_IMPLEMENTATION):
        raise ValueError(f"implementation={implementation!r}: expected 'pmkvq' or 'pmkvq_packed'")
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
