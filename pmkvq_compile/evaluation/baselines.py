"""Baseline KV caches, written from their papers' descriptions, as transformers ``Cache`` objects.

Every cache here stores integer codes plus float32 scales and zeros, and counts its bytes with the memory
model of :mod:`pmkvq_compile.plan`: ``bits / 8`` bytes per code, 4 bytes per scale and per zero, 2 bytes per
element kept in 16-bit floating point. ``nbytes`` is computed from what is held; the closed forms
(:func:`rtn_bytes`, :func:`kivi_bytes`) are what the tests compare it with.

Like the PM-KVQ attention, a step attends to the *past* as stored (dequantized) and to its *own* tokens in
full precision, so teacher-forced scoring in chunks treats every method alike.

* **RTN** (per-token round-to-nearest): every token quantized on arrival, per token and per group of
  ``group_size`` channels, with the package quantizer (asymmetric, round-half-up). No full-precision window.
* **KIVI** (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"): keys per
  *channel* over groups of ``key_group`` tokens, values per *token* over groups of ``value_group`` channels;
  the newest tokens stay in 16-bit floating point: keys in a residual of fewer than ``residual`` tokens that
  is quantized as a whole once it holds ``residual`` tokens (``residual`` a multiple of ``key_group``),
  values in a sliding residual of the latest ``residual`` tokens, the oldest quantized one by one as new
  ones arrive (the paper's reference code does both). Residual elements are stored as float16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from .. import quant
from ..plan import ModelGeometry

__all__ = [
    "BaselineCache",
    "KIVIConfig",
    "KIVILayer",
    "RTNConfig",
    "RTNLayer",
    "kivi_bytes",
    "kv_nbytes",
    "quantize_per_channel",
    "rtn_bytes",
]

BASELINE_BITS = (8, 4, 2)
FP16_BYTES = 2
META_BYTES = 4  # float32 scale or zero


def _check_pos(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an int >= 1")
    return value


@dataclass(frozen=True)
class RTNConfig:
    """Per-token RTN: ``bits`` in {8, 4, 2}, ``group_size`` channels per scale/zero (must divide head_dim)."""

    bits: int
    group_size: int

    def __post_init__(self) -> None:
        quant.check_bits(self.bits, allowed=BASELINE_BITS, what="RTN bits")
        _check_pos("group_size", self.group_size)


@dataclass(frozen=True)
class KIVIConfig:
    """KIVI: ``bits`` in {8, 4, 2}; ``key_group`` tokens per key scale; ``value_group`` channels per value
    scale; ``residual`` tokens kept in float16 (a multiple of ``key_group``)."""

    bits: int
    key_group: int
    value_group: int
    residual: int

    def __post_init__(self) -> None:
        quant.check_bits(self.bits, allowed=BASELINE_BITS, what="KIVI bits")
        for name in ("key_group", "value_group", "residual"):
            _check_pos(name, getattr(self, name))
        if self.residual % self.key_group:
            raise ValueError(
                f"KIVI residual={self.residual} must be a multiple of key_group={self.key_group} "
                f"(e.g. {self.key_group * max(self.residual // self.key_group, 1)})"
            )


def rtn_bytes(cfg: RTNConfig, geo: ModelGeometry, n: int) -> int:
    """Closed form: bytes of ``n`` tokens of one layer under per-token RTN."""
    groups = geo.head_dim // cfg.group_size
    per_head = 2 * geo.head_dim * cfg.bits // 8 + 2 * 2 * META_BYTES * groups
    return n * geo.num_kv_heads * per_head


def kivi_split(cfg: KIVIConfig, n: int) -> tuple[int, int, int, int]:
    """``(quantized keys, residual keys, quantized values, residual values)`` after ``n`` tokens."""
    kq = (n // cfg.residual) * cfg.residual
    vq = max(n - cfg.residual, 0)
    return kq, n - kq, vq, n - vq


def kivi_bytes(cfg: KIVIConfig, geo: ModelGeometry, n: int) -> int:
    """Closed form: bytes of ``n`` tokens of one layer under KIVI (codes, per-channel key and per-token value
    scales/zeros in float32, the float16 residuals)."""
    d, h = geo.head_dim, geo.num_kv_heads
    kq, kr, vq, vr = kivi_split(cfg, n)
    keys = kq * d * cfg.bits // 8 + (kq // cfg.key_group) * d * 2 * META_BYTES
    values = vq * d * cfg.bits // 8 + vq * (d // cfg.value_group) * 2 * META_BYTES
    return h * (keys + values + (kr + vr) * d * FP16_BYTES)


def quantize_per_channel(
    x: torch.Tensor, bits: int, token_group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KIVI key quantization: ``x`` ``[B, H, T, D]`` with ``T % token_group == 0``, one scale/zero per channel
    per group of ``token_group`` tokens, same formula as :func:`pmkvq_compile.quant.quantize`.

    Returns ``q`` int32 ``[B, H, T, D]`` and ``scale``, ``zero`` float32 ``[B, H, T // token_group, D]``.
    """
    b, h, t, d = x.shape
    if t % token_group:
        raise ValueError(f"{t} tokens are not a whole number of key groups of {token_group}")
    xg = x.reshape(b, h, t // token_group, token_group, d).transpose(-1, -2)  # [B, H, T/G, D, G]
    q, s, z = quant.quantize(xg, bits, token_group)  # s, z: [B, H, T/G, D, 1]
    return q.transpose(-1, -2).reshape(b, h, t, d), s[..., 0], z[..., 0]


def dequantize_per_channel(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, token_group: int
) -> torch.Tensor:
    """Inverse of :func:`quantize_per_channel`: float32 ``[B, H, T, D]``."""
    b, h, t, d = q.shape
    qg = q.reshape(b, h, t // token_group, token_group, d).float()
    return (qg * scale.unsqueeze(-2) - zero.unsqueeze(-2)).reshape(b, h, t, d)


class _BaselineLayer(CacheLayerMixin):
    """Shared bookkeeping: preallocated storage for ``capacity`` tokens, one token count for the batch."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, geo: ModelGeometry, capacity: int, layer_idx: int) -> None:
        super().__init__()
        self.geo, self.capacity, self.layer_idx = geo, _check_pos("capacity", capacity), layer_idx
        self.n_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.batch_size, self.device, self.dtype = key_states.shape[0], key_states.device, key_states.dtype
        self._allocate()
        self.is_initialized = True

    def _allocate(self) -> None:
        raise NotImplementedError

    def get_seq_length(self) -> int:
        return self.n_tokens

    def get_max_length(self) -> int:
        return self.capacity

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n_tokens + query_length, 0

    def reset(self) -> None:
        self.n_tokens = 0

    def _check(self, k: torch.Tensor, v: torch.Tensor) -> None:
        _b, h, t, d = k.shape
        if (h, d) != (self.geo.num_kv_heads, self.geo.head_dim) or v.shape != k.shape:
            raise ValueError(
                f"layer {self.layer_idx}: expected key/value states [B, {self.geo.num_kv_heads}, T, "
                f"{self.geo.head_dim}], got {tuple(k.shape)} / {tuple(v.shape)}"
            )
        if self.n_tokens + t > self.capacity:
            raise ValueError(
                f"layer {self.layer_idx}: {self.n_tokens + t} tokens exceed the cache capacity {self.capacity}; "
                "build the cache with a larger max_len"
            )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``[B, Hkv, T, D]`` tokens; return the stored past (dequantized) followed by these tokens as given."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check(key_states, value_states)
        t = key_states.shape[2]
        self._store(key_states, value_states)
        self.n_tokens += t
        k, v = self.dequantized()
        past = self.n_tokens - t
        dt = key_states.dtype
        return (
            torch.cat([k[:, :, :past].to(dt), key_states], dim=2),
            torch.cat([v[:, :, :past].to(dt), value_states], dim=2),
        )

    def _store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All held keys and values as stored, float32 ``[B, Hkv, n_tokens, D]``."""
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError


class RTNLayer(_BaselineLayer):
    """Per-token RTN storage: codes uint8 ``[B, Hkv, cap, D]``; meta float32 ``[B, 4, Hkv, cap, G]``."""

    def __init__(self, cfg: RTNConfig, geo: ModelGeometry, capacity: int, layer_idx: int = 0) -> None:
        super().__init__(geo, capacity, layer_idx)
        if geo.head_dim % cfg.group_size:
            raise ValueError(f"RTN group_size={cfg.group_size} must divide head_dim={geo.head_dim}")
        self.cfg = cfg
        self.groups = geo.head_dim // cfg.group_size

    def _allocate(self) -> None:
        b, h, c, d = self.batch_size, self.geo.num_kv_heads, self.capacity, self.geo.head_dim
        self.kq = torch.zeros(b, h, c, d, dtype=torch.uint8, device=self.device)
        self.vq = torch.zeros_like(self.kq)
        self.meta = torch.zeros(b, 4, h, c, self.groups, dtype=torch.float32, device=self.device)

    def _store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n, t, bits, gs = self.n_tokens, k.shape[2], self.cfg.bits, self.cfg.group_size
        kq, ks, kz = quant.quantize(k, bits, gs)
        vq, vs, vz = quant.quantize(v, bits, gs)
        self.kq[:, :, n : n + t] = kq.to(torch.uint8)
        self.vq[:, :, n : n + t] = vq.to(torch.uint8)
        self.meta[:, :, :, n : n + t] = torch.stack([ks, kz, vs, vz], dim=1)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        n, gs = self.n_tokens, self.cfg.group_size
        m = self.meta[:, :, :, :n]
        k = quant.dequantize(self.kq[:, :, :n], m[:, 0], m[:, 1], gs)
        v = quant.dequantize(self.vq[:, :, :n], m[:, 2], m[:, 3], gs)
        return k, v

    def nbytes(self) -> int:
        """Bytes of the held codes (``bits / 8`` each) and scales/zeros (4 each), per sequence."""
        n = self.n_tokens
        codes = 2 * self.kq[0, :, :n].numel()
        return codes * self.cfg.bits // 8 + self.meta[0, :, :, :n].numel() * META_BYTES


class KIVILayer(_BaselineLayer):
    """KIVI storage (see the module docstring).

    Keys: codes uint8 ``[B, Hkv, cap, D]``, meta float32 ``[B, 2, Hkv, cap // key_group, D]``, residual float16
    ``[B, Hkv, residual, D]``. Values: codes uint8 ``[B, Hkv, cap, D]``, meta float32
    ``[B, 2, Hkv, cap, D // value_group]``, residual float16 ``[B, Hkv, residual, D]`` (oldest first).
    """

    def __init__(self, cfg: KIVIConfig, geo: ModelGeometry, capacity: int, layer_idx: int = 0) -> None:
        super().__init__(geo, capacity, layer_idx)
        if geo.head_dim % cfg.value_group:
            raise ValueError(f"KIVI value_group={cfg.value_group} must divide head_dim={geo.head_dim}")
        self.cfg = cfg
        self.n_kq = self.n_vq = 0

    def reset(self) -> None:
        super().reset()
        self.n_kq = self.n_vq = 0

    def _allocate(self) -> None:
        b, h, c, d, cfg = self.batch_size, self.geo.num_kv_heads, self.capacity, self.geo.head_dim, self.cfg
        dev = self.device
        kgroups = -(-c // cfg.key_group)
        self.kq = torch.zeros(b, h, kgroups * cfg.key_group, d, dtype=torch.uint8, device=dev)
        self.kmeta = torch.zeros(b, 2, h, kgroups, d, dtype=torch.float32, device=dev)
        self.vq = torch.zeros(b, h, c, d, dtype=torch.uint8, device=dev)
        self.vmeta = torch.zeros(b, 2, h, c, d // cfg.value_group, dtype=torch.float32, device=dev)
        self.kres = torch.zeros(b, h, cfg.residual, d, dtype=torch.float16, device=dev)
        self.vres = torch.zeros_like(self.kres)

    def _store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        cfg, n = self.cfg, self.n_tokens
        # keys: residual + new; every complete `residual` tokens are quantized per channel
        k_stream = torch.cat([self.kres[:, :, : n - self.n_kq], k.to(torch.float16)], dim=2)
        n_full = (k_stream.shape[2] // cfg.residual) * cfg.residual
        if n_full:
            q, s, z = quantize_per_channel(k_stream[:, :, :n_full].float(), cfg.bits, cfg.key_group)
            g0 = self.n_kq // cfg.key_group
            self.kq[:, :, self.n_kq : self.n_kq + n_full] = q.to(torch.uint8)
            self.kmeta[:, :, :, g0 : g0 + n_full // cfg.key_group] = torch.stack([s, z], dim=1)
            self.n_kq += n_full
        rest = k_stream[:, :, n_full:]
        self.kres[:, :, : rest.shape[2]] = rest
        # values: a sliding residual of the latest `residual` tokens; older ones are quantized per token
        v_stream = torch.cat([self.vres[:, :, : n - self.n_vq], v.to(torch.float16)], dim=2)
        n_out = max(v_stream.shape[2] - cfg.residual, 0)
        if n_out:
            q, s, z = quant.quantize(v_stream[:, :, :n_out].float(), cfg.bits, cfg.value_group)
            self.vq[:, :, self.n_vq : self.n_vq + n_out] = q.to(torch.uint8)
            self.vmeta[:, :, :, self.n_vq : self.n_vq + n_out] = torch.stack([s, z], dim=1)
            self.n_vq += n_out
        rest = v_stream[:, :, n_out:]
        self.vres[:, :, : rest.shape[2]] = rest

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, n = self.cfg, self.n_tokens
        ng = self.n_kq // cfg.key_group
        kq = dequantize_per_channel(
            self.kq[:, :, : self.n_kq], self.kmeta[:, 0, :, :ng], self.kmeta[:, 1, :, :ng], cfg.key_group
        )
        k = torch.cat([kq, self.kres[:, :, : n - self.n_kq].float()], dim=2)
        m = self.vmeta[:, :, :, : self.n_vq]
        vq = quant.dequantize(self.vq[:, :, : self.n_vq], m[:, 0], m[:, 1], cfg.value_group)
        v = torch.cat([vq, self.vres[:, :, : n - self.n_vq].float()], dim=2)
        return k, v

    def nbytes(self) -> int:
        """Bytes held: codes at ``bits / 8``, float32 scales/zeros, float16 residual elements, per sequence."""
        cfg, n = self.cfg, self.n_tokens
        ng = self.n_kq // cfg.key_group
        codes = self.kq[0, :, : self.n_kq].numel() + self.vq[0, :, : self.n_vq].numel()
        meta = self.kmeta[0, :, :, :ng].numel() + self.vmeta[0, :, :, : self.n_vq].numel()
        res = self.kres[0, :, : n - self.n_kq].numel() + self.vres[0, :, : n - self.n_vq].numel()
        return codes * cfg.bits // 8 + meta * META_BYTES + res * FP16_BYTES


class BaselineCache(Cache):
    """A transformers ``Cache`` of :class:`RTNLayer` or :class:`KIVILayer`, one per decoder layer.

    Args:
        cfg: an :class:`RTNConfig` or a :class:`KIVIConfig`.
        config: the model's config (or a ModelGeometry).
        max_len: tokens the preallocated storage holds (longer sequences are refused with a ValueError).
    """

    def __init__(self, cfg: RTNConfig | KIVIConfig, config: Any, max_len: int) -> None:
        geo = ModelGeometry.from_config(config)
        if isinstance(cfg, RTNConfig):
            layers: list[CacheLayerMixin] = [RTNLayer(cfg, geo, max_len, i) for i in range(geo.num_layers)]
        elif isinstance(cfg, KIVIConfig):
            layers = [KIVILayer(cfg, geo, max_len, i) for i in range(geo.num_layers)]
        else:
            raise ValueError(f"cfg must be an RTNConfig or a KIVIConfig, got {type(cfg).__name__}")
        self.cfg, self.geometry = cfg, geo
        super().__init__(layers=layers)

    def nbytes(self, layer: int | None = None) -> int:
        """Bytes held in ``layer`` (or all layers), per sequence."""
        if layer is None:
            return sum(lay.nbytes() for lay in self.layers)
        return self.layers[layer].nbytes()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()


def kv_nbytes(cache: Cache) -> int:
    """Per-sequence KV bytes of any cache used in the evaluation.

    :class:`BaselineCache` and :class:`~pmkvq_compile.cache.ProgressiveKVCache` count codes and scales/zeros;
    a ``DynamicCache`` counts its tensors' elements at their storage dtype (float32 here).
    """
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    if isinstance(cache, DynamicCache):
        total = 0
        for lay in cache.layers:
            if getattr(lay, "keys", None) is not None and lay.keys.numel():
                total += (lay.keys[0].numel() + lay.values[0].numel()) * lay.keys.element_size()
        return total
    raise ValueError(
        f"cannot count the bytes of a {type(cache).__name__}; expected a cache used by pmkvq eval"
    )
