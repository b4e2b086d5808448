"""The eager path: a ``pmkvq`` attention implementation registered in transformers' ``AttentionInterface``.

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

__all__ = ["ATTN_IMPLEMENTATION", "pmkvq_attention_forward", "register", "use_pmkvq_attention"]

ATTN_IMPLEMENTATION = "pmkvq"


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
    if dropout:
        raise ValueError(f"pmkvq attention does not support dropout={dropout}; call model.eval()")
    if kwargs.get("softcap") is not None:
        raise ValueError("pmkvq attention does not support soft-capped attention (softcap)")
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


def register() -> None:
    """Register ``attn_implementation="pmkvq"`` (attention function + SDPA-style mask). Idempotent."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, pmkvq_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


@contextlib.contextmanager
def use_pmkvq_attention(model: Any) -> Iterator[Any]:
    """Within the block, ``model`` runs attention through ``pmkvq``; the previous implementation is restored."""
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
