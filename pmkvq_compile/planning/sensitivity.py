"""Per-layer, per-bit-width sensitivity of the LM loss to quantizing K and V (PMKVQ.md).

``s_K(l, b) = mean |(Q_b(K_l) - K_l) * dLoss/dK_l|`` and the same for V, with K after RoPE (and after the
key reparameterization when one is given), Loss the LM cross-entropy of the sample, averaged over samples.
Each sample is one forward and one backward pass; the gradients of the K and V tensors are asked for with
``torch.autograd.grad`` (they stay in the graph, so dLoss/dK_l includes every path through later layers);
nothing accumulates into the model's ``.grad``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import quant
from .capture import Recorder, calibration_attention, forward_sample, pi_position_ids

__all__ = ["Sensitivity", "profile_sensitivity"]


@dataclass(frozen=True)
class Sensitivity:
    """Sensitivities for each layer and bit choice.

    ``key`` and ``value``: float64 ``[num_layers, len(bit_choices)]``; column ``j`` is ``bit_choices[j]``.
    """

    bit_choices: tuple[int, ...]
    key: torch.Tensor
    value: torch.Tensor

    def __post_init__(self) -> None:
        n = len(self.bit_choices)
        if self.key.shape != self.value.shape or self.key.dim() != 2 or self.key.shape[1] != n:
            raise ValueError(
                f"key/value sensitivities must both be [num_layers, {n}], got "
                f"{tuple(self.key.shape)} / {tuple(self.value.shape)}"
            )

    @property
    def num_layers(self) -> int:
        return self.key.shape[0]

    def key_cost(self, layer: int, bits: int) -> float:
        return float(self.key[layer, self.bit_choices.index(bits)])

    def value_cost(self, layer: int, bits: int) -> float:
        return float(self.value[layer, self.bit_choices.index(bits)])


class _GradRecorder(Recorder):
    """Records K and V of every layer (graph nodes whose gradients we ask for), after optional key scales."""

    def __init__(self, key_scales: Sequence[torch.Tensor | None] | None) -> None:
        self.key_scales = key_scales
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def record(self, layer, query, key, value):
        s = None if self.key_scales is None else self.key_scales[layer]
        if s is not None:
            full = torch.cat([s, s], dim=-1).to(key.device)  # [Hkv, D]
            key = key / full[None, :, None, :].to(key.dtype)
            rep = query.shape[1] // key.shape[1]
            query = query * full.repeat_interleave(rep, dim=0)[None, :, None, :].to(query.dtype)
        # Keep K and V in the graph: dLoss/dK_l must include the paths through later layers' K and V.
        # A tensor that needs no grad has nothing upstream that depends on an earlier K/V (e.g. layer 0 of a
        # frozen model), so making it a leaf is exact.
        k = key if key.requires_grad else key.detach().requires_grad_(True)
        v = value if value.requires_grad else value.detach().requires_grad_(True)
        self.keys[layer], self.values[layer] = k, v
        return query, k, v


def _weighted_error(x: torch.Tensor, grad: torch.Tensor, bits: int, group_size: int) -> float:
    q, s, z = quant.quantize(x.detach(), bits, group_size)
    err = quant.dequantize(q, s, z, group_size) - x.detach().float()
    return float((err * grad.float()).abs().mean())


def profile_sensitivity(
    model: Any,
    samples: Sequence[torch.Tensor],
    *,
    bit_choices: Sequence[int],
    group_size: int,
    effective_len: int | None = None,
    key_scales: Sequence[torch.Tensor | None] | None = None,
    progress: bool = True,
) -> Sensitivity:
    """Profile ``s(l, b)`` on ``samples`` (each int64 ``[T]``), one sample at a time.

    Args:
        model: a transformers causal LM (Llama/Qwen2/Mistral layout), in eval mode.
        bit_choices: bit-widths to profile, each in {16, 8, 4, 2}.
        group_size: the quantizer's group along head_dim.
        effective_len: positional interpolation target: a sample of T tokens gets
            ``position_ids = floor(arange(T) * effective_len / T)``; None means plain positions.
        key_scales: per layer None or float32 ``[Hkv, D // 2]`` (unfolded key reparameterization): K is
            divided and Q multiplied by it before K is quantized, as the cache does.
    """
    bits = tuple(quant.check_bits(b, what="bit choice") for b in bit_choices)
    if not samples:
        raise ValueError("profile_sensitivity needs at least one calibration sample; got none")
    device = next(model.parameters()).device
    n_layers = None
    key_tot: torch.Tensor | None = None
    val_tot: torch.Tensor | None = None
    for ids in tqdm(samples, desc="sensitivity", disable=not progress, leave=False):
        rec = _GradRecorder(key_scales)
        with calibration_attention(model, rec), torch.enable_grad():
            out = forward_sample(
                model, ids.to(device), pi_position_ids(ids.numel(), effective_len), labels=True
            )
            layers = sorted(rec.keys)
            leaves = [t for i in layers for t in (rec.keys[i], rec.values[i])]
            grads = torch.autograd.grad(out.loss, leaves, allow_unused=True)
        if n_layers is None:
            n_layers = len(layers)
            key_tot = torch.zeros(n_layers, len(bits), dtype=torch.float64)
            val_tot = torch.zeros(n_layers, len(bits), dtype=torch.float64)
        assert key_tot is not None and val_tot is not None
        for li, layer in enumerate(layers):
            gk, gv = grads[2 * li], grads[2 * li + 1]
            k, v = rec.keys[layer], rec.values[layer]
            gk = torch.zeros_like(k) if gk is None else gk
            gv = torch.zeros_like(v) if gv is None else gv
            for j, b in enumerate(bits):
                key_tot[li, j] += _weighted_error(k, gk, b, group_size)
                val_tot[li, j] += _weighted_error(v, gv, b, group_size)
        del rec, out, grads, leaves
    assert key_tot is not None and val_tot is not None
    return Sensitivity(bits, key_tot / len(samples), val_tot / len(samples))
