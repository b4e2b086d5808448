"""Seeing K (after RoPE), V and Q of every layer through transformers' attention interface.

A calibration pass registers the attention implementation ``pmkvq_calibrate``: an ordinary causal SDPA that
hands ``(layer_idx, query, key, value)`` to the active :class:`Recorder` first. The recorder may return
replacements (e.g. leaves that require grad, or keys divided by a reparameterization scale); the attention is
then computed on what it returns, so gradients flow through the rest of the model as usual. No modeling code
is edited and no ``forward`` is swapped; :func:`calibration_attention` restores the previous implementation.

Only what calibration needs is supported: batch 1, no cache, no padding (the mask is causal).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = [
    "CALIBRATION_ATTENTION",
    "Recorder",
    "attention_modules",
    "calibration_attention",
    "causal_attention",
    "forward_sample",
    "pi_position_ids",
]

CALIBRATION_ATTENTION = "pmkvq_calibrate"

_RECORDER: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("pmkvq_recorder", default=None)


class Recorder:
    """Base recorder: sees every layer's tensors and may replace them. Subclasses override :meth:`record`."""

    def record(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``query [1, Hq, T, D]``, ``key/value [1, Hkv, T, D]`` (key after RoPE) -> tensors to attend with."""
        return query, key, value


def causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """Causal SDPA with GQA by repetition: ``[B, Hq, T, D]`` x ``[B, Hkv, T, D]`` -> ``[B, Hq, T, D]``."""
    rep = query.shape[1] // key.shape[1]
    if rep != 1:
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)


def _calibration_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    recorder = _RECORDER.get()
    if recorder is None:
        raise RuntimeError("the pmkvq_calibrate attention runs only inside calibration_attention()")
    if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise ValueError(
            "calibration passes take one sample at a time without a cache; got query "
            f"{tuple(query.shape)} and key {tuple(key.shape)}"
        )
    layer = getattr(module, "layer_idx", None)
    if not isinstance(layer, int):
        raise ValueError(f"{type(module).__name__} has no integer layer_idx; cannot calibrate this model")
    q, k, v = recorder.record(layer, query, key, value)
    out = causal_attention(q, k, v, scaling)
    return out.transpose(1, 2).contiguous(), None


def attention_modules(model: Any) -> list[torch.nn.Module]:
    """The decoder's self-attention modules in layer order (Llama/Qwen2/Mistral layout: ``layers[i].self_attn``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(lay, "self_attn") for lay in layers):
        raise ValueError(
            f"cannot find decoder layers with self_attn in {type(model).__name__}; expected a "
            "Llama/Qwen2/Mistral-style causal LM"
        )
    return [lay.self_attn for lay in layers]


@contextlib.contextmanager
def calibration_attention(model: Any, recorder: Recorder) -> Iterator[Recorder]:
    """Run ``model`` with the recording attention; restores the previous implementation on exit."""
    AttentionInterface.register(CALIBRATION_ATTENTION, _calibration_attention_forward)
    AttentionMaskInterface.register(CALIBRATION_ATTENTION, sdpa_mask)
    previous = model.config._attn_implementation
    token = _RECORDER.set(recorder)
    model.set_attn_implementation(CALIBRATION_ATTENTION)
    try:
        yield recorder
    finally:
        model.set_attn_implementation(previous)
        _RECORDER.reset(token)


def pi_position_ids(seq_len: int, effective_len: int | None) -> torch.Tensor:
    """Positional interpolation: ``[1, seq_len]`` int64 positions spread over ``[0, effective_len)``.

    ``position_ids[i] = floor(i * effective_len / seq_len)``: with an integer stride this is exactly
    ``arange(0, effective_len, stride)``. ``effective_len`` None (or ``<= seq_len``) gives ``arange(seq_len)``.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be positive")
    if effective_len is None or effective_len <= seq_len:
        return torch.arange(seq_len).unsqueeze(0)
    return ((torch.arange(seq_len, dtype=torch.int64) * effective_len) // seq_len).unsqueeze(0)


def forward_sample(model: Any, ids: torch.Tensor, position_ids: torch.Tensor, *, labels: bool = False) -> Any:
    """One sample ``ids [T]`` (int64) through the model with the given positions, no cache.

    An explicit all-ones mask is passed so transformers does not read stretched positions as packed sequences.
    """
    x = ids.unsqueeze(0)
    return model(
        input_ids=x,
        position_ids=position_ids.to(x.device),
        attention_mask=torch.ones_like(x),
        labels=x if labels else None,
        use_cache=False,
    )
