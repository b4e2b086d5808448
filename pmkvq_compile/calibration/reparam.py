"""Key reparameterization (SmoothAttention-style), calibrated with positional interpolation (PMKVQ.md).

Per layer, KV head and rotary pair ``j`` (channels ``j`` and ``j + D/2``, the ``rotate_half`` layout of
Llama/Qwen2/Mistral): ``m_j = max |K|`` over calibration tokens and both channels of the pair, with K after
RoPE; ``s = clamp(m ** alpha, 1e-4, 1e4)``. Attention uses ``K / s`` and ``Q * s``, so ``q . k`` is unchanged
while K loses its outlier channels; the same scale on both channels of a pair commutes with RoPE.

``alpha`` is searched per layer on the grid ``1 - n/20``, ``n = 0..19``, minimising the MSE of the layer's
attention output with K and V quantized at the target bits; ``alpha = 0`` (no reparameterization, ``s = 1``)
is kept as the fallback when no grid point beats it, so the search never makes a layer worse on its data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import quant
from ..planning.capture import (
    Recorder,
    attention_modules,
    calibration_attention,
    causal_attention,
    forward_sample,
    pi_position_ids,
)

__all__ = [
    "ALPHA_GRID",
    "KeyStatistics",
    "ReparamResult",
    "collect_key_statistics",
    "fold_key_scales",
    "key_scales_from_max",
    "search_key_scales",
]

ALPHA_GRID: tuple[float, ...] = tuple(1 - n / 20 for n in range(20))
SCALE_CLAMP = (1e-4, 1e4)


@dataclass
class KeyStatistics:
    """Per layer: ``key_max`` float32 ``[Hkv, D // 2]`` (pair maxima of |K|) and captured
    ``(query [Hq, T, D], key [Hkv, T, D], value [Hkv, T, D])`` float32 of the first samples for the search."""

    key_max: list[torch.Tensor]
    captured: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
    scaling: list[float | None]


@dataclass(frozen=True)
class ReparamResult:
    """Chosen per-layer ``alpha`` (0.0 = none), scales float32 ``[Hkv, D // 2]``, and the MSEs
    (``mse_none``: without reparameterization, ``mse_best``: with the chosen alpha)."""

    alphas: tuple[float, ...]
    scales: tuple[torch.Tensor, ...]
    mse_none: tuple[float, ...]
    mse_best: tuple[float, ...]


class _StatsRecorder(Recorder):
    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.key_max: dict[int, torch.Tensor] = {}
        self.captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def record(self, layer, query, key, value):
        d = key.shape[-1]
        a = key.detach().float().abs()[0]  # [Hkv, T, D]
        pair = torch.maximum(a[..., : d // 2], a[..., d // 2 :]).amax(dim=1)  # [Hkv, D/2]
        self.key_max[layer] = pair
        if self.keep:
            self.captured[layer] = tuple(t.detach().float()[0].clone() for t in (query, key, value))
        return query, key, value


def collect_key_statistics(
    model: Any,
    samples: Sequence[torch.Tensor],
    *,
    effective_len: int | None = None,
    n_search_samples: int = 2,
    progress: bool = True,
) -> KeyStatistics:
    """Pair maxima of |K| (after RoPE) over all ``samples`` with positional interpolation to ``effective_len``,
    plus Q/K/V of the first ``n_search_samples`` samples for the alpha search. One sample at a time, no grad."""
    if not samples:
        raise ValueError("collect_key_statistics needs at least one calibration sample; got none")
    modules = attention_modules(model)
    device = next(model.parameters()).device
    key_max: dict[int, torch.Tensor] = {}
    captured: dict[int, list] = {i: [] for i in range(len(modules))}
    for n, ids in enumerate(tqdm(samples, desc="key statistics", disable=not progress, leave=False)):
        rec = _StatsRecorder(keep=n < n_search_samples)
        with calibration_attention(model, rec), torch.no_grad():
            forward_sample(model, ids.to(device), pi_position_ids(ids.numel(), effective_len))
        for layer, m in rec.key_max.items():
            key_max[layer] = m if layer not in key_max else torch.maximum(key_max[layer], m)
        for layer, qkv in rec.captured.items():
            captured[layer].append(qkv)
    return KeyStatistics(
        key_max=[key_max[i].cpu() for i in range(len(modules))],
        captured=[captured[i] for i in range(len(modules))],
        scaling=[getattr(m, "scaling", None) for m in modules],
    )


def key_scales_from_max(key_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``clamp(key_max ** alpha, 1e-4, 1e4)`` as float32 ``[Hkv, D // 2]``; alpha 0 gives ones."""
    if alpha == 0:
        return torch.ones_like(key_max, dtype=torch.float32)
    return key_max.float().clamp_min(0).pow(alpha).clamp(*SCALE_CLAMP).to(torch.float32)


def _fake_quant(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    q, s, z = quant.quantize(x, bits, group_size)
    return quant.dequantize(q, s, z, group_size)


def _layer_mse(
    qkv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    scale: torch.Tensor | None,
    key_bits: int,
    value_bits: int,
    group_size: int,
    scaling: float | None,
) -> float:
    err, count = 0.0, 0
    for q, k, v in qkv:
        ref = causal_attention(q[None], k[None], v[None], scaling)
        if scale is not None:
            full = torch.cat([scale, scale], dim=-1)  # [Hkv, D]
            k = k / full[:, None, :]
            q = q * full.repeat_interleave(q.shape[0] // k.shape[0], dim=0)[:, None, :]
        out = causal_attention(
            q[None],
            _fake_quant(k, key_bits, group_size)[None],
            _fake_quant(v, value_bits, group_size)[None],
            scaling,
        )
        err += float(((out - ref) ** 2).sum())
        count += ref.numel()
    return err / max(count, 1)


def search_key_scales(
    stats: KeyStatistics,
    *,
    key_bits: int | Sequence[int],
    value_bits: int | Sequence[int] | None = None,
    group_size: int,
    alphas: Sequence[float] = ALPHA_GRID,
    progress: bool = True,
) -> ReparamResult:
    """Choose ``alpha`` per layer minimising the attention-output MSE at the target bits (per layer or one for all)."""
    n_layers = len(stats.key_max)
    kbits = [key_bits] * n_layers if isinstance(key_bits, int) else list(key_bits)
    vsrc = key_bits if value_bits is None else value_bits
    vbits = [vsrc] * n_layers if isinstance(vsrc, int) else list(vsrc)
    if len(kbits) != n_layers or len(vbits) != n_layers:
        raise ValueError(f"need target bits for {n_layers} layers, got {len(kbits)} / {len(vbits)}")
    for b in (*kbits, *vbits):
        quant.check_bits(b, what="target bits")
    if not all(stats.captured):
        raise ValueError("the key statistics hold no captured samples to search alpha on")
    chosen, scales, none_mse, best_mse = [], [], [], []
    for layer in tqdm(range(n_layers), desc="alpha search", disable=not progress, leave=False):
        qkv, m, sc = stats.captured[layer], stats.key_max[layer], stats.scaling[layer]
        base = _layer_mse(qkv, None, kbits[layer], vbits[layer], group_size, sc)
        best = (base, 0.0)
        for a in alphas:
            mse = _layer_mse(qkv, key_scales_from_max(m, a), kbits[layer], vbits[layer], group_size, sc)
            if mse < best[0]:
                best = (mse, float(a))
        chosen.append(best[1])
        scales.append(key_scales_from_max(m, best[1]))
        none_mse.append(base)
        best_mse.append(best[0])
    return ReparamResult(tuple(chosen), tuple(scales), tuple(none_mse), tuple(best_mse))


@torch.no_grad()
def fold_key_scales(model: Any, scales: Sequence[torch.Tensor | None]) -> None:
    """Fold key scales into the weights, in place: ``k_proj`` rows and bias divided by ``s``, ``q_proj`` rows
    and bias multiplied by ``s`` of their KV head (GQA: query head ``i`` uses KV head ``i // (Hq / Hkv)``).

    ``scales``: per layer None or float32 ``[Hkv, D // 2]``. Computed in float32, cast back to the weight dtype.
    Refused for attention with ``q_norm``/``k_norm`` (the norm sits between projection and RoPE) or without
    ``q_proj``/``k_proj`` linears.
    """
    modules = attention_modules(model)
    if len(scales) != len(modules):
        raise ValueError(f"got key scales for {len(scales)} layers, the model has {len(modules)}")
    for i, (attn, s) in enumerate(zip(modules, scales)):
        if s is None:
            continue
        if hasattr(attn, "k_norm") or hasattr(attn, "q_norm"):
            raise ValueError(
                f"layer {i}: {type(attn).__name__} normalizes q/k after projection, so scales cannot be folded; "
                "keep them in the plan (fold=False)"
            )
        qp, kp = getattr(attn, "q_proj", None), getattr(attn, "k_proj", None)
        if not isinstance(qp, torch.nn.Linear) or not isinstance(kp, torch.nn.Linear):
            raise ValueError(f"layer {i}: {type(attn).__name__} lacks q_proj/k_proj linears; cannot fold")
        hkv, half = s.shape
        d = 2 * half
        hq = qp.out_features // d
        if kp.out_features != hkv * d or qp.out_features != hq * d or hq % hkv:
            raise ValueError(
                f"layer {i}: key scale {tuple(s.shape)} does not fit k_proj {kp.out_features} / q_proj "
                f"{qp.out_features} outputs"
            )
        full = torch.cat([s, s], dim=-1).float().to(kp.weight.device)  # [Hkv, D]
        fq = full.repeat_interleave(hq // hkv, dim=0)  # [Hq, D]
        kp.weight.copy_((kp.weight.float().view(hkv, d, -1) / full[..., None]).view_as(kp.weight))
        qp.weight.copy_((qp.weight.float().view(hq, d, -1) * fq[..., None]).view_as(qp.weight))
        if kp.bias is not None:
            kp.bias.copy_((kp.bias.float().view(hkv, d) / full).view_as(kp.bias))
        if qp.bias is not None:
            qp.bias.copy_((qp.bias.float().view(hq, d) * fq).view_as(qp.bias))
