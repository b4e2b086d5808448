"""The PM-KVQ quantizer in pure PyTorch: the numerical reference for every kernel.

Asymmetric, per token, per group of ``group_size`` channels along the last dimension (PMKVQ.md):

* ``scale = clamp((max - min) / (2^b - 1), 1e-5, 1e5)``, ``zero = -min`` (not rounded)
* ``q = clamp(round((x + zero) / scale), 0, 2^b - 1)``, ``x_hat = q * scale - zero``

``round`` is round-half-up (``floor(v + 0.5)``) everywhere in this package, so that the Triton kernels,
the ONNX graphs and this reference produce the same codes bit for bit.

Equivalent Right Shift (ERS) requantizes codes from ``b`` to ``b // 2`` bits with integer operations only.
"""

from __future__ import annotations

import torch

__all__ = [
    "SCALE_MAX",
    "SCALE_MIN",
    "SUPPORTED_BITS",
    "check_bits",
    "dequantize",
    "ers_codes",
    "pack",
    "quantize",
    "requantize",
    "unpack",
]

SUPPORTED_BITS: tuple[int, ...] = (16, 8, 4, 2)
SCALE_MIN = 1e-5
SCALE_MAX = 1e5


def check_bits(bits: int, *, allowed: tuple[int, ...] = SUPPORTED_BITS, what: str = "bits") -> int:
    """Return ``bits`` as an int or raise ValueError naming it and the accepted values."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        raise ValueError(f"{what}={bits!r} is not supported; expected one of {list(allowed)}")
    return int(bits)


def _check_group(d: int, group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size={group_size!r} must be a positive int")
    if d % group_size != 0:
        raise ValueError(
            f"last dimension {d} is not divisible by group_size={group_size}; "
            f"use a group size that divides {d} (e.g. {d})"
        )
    return d // group_size


def quantize(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` per token and group.

    Args:
        x: ``[..., D]`` floating tensor (fp16/bf16/fp32/fp64), finite.
        bits: one of 16, 8, 4, 2.
        group_size: divides ``D``.

    Returns:
        ``q``: int32 codes in ``[0, 2^bits - 1]``, same shape as ``x``;
        ``scale``, ``zero``: float32 ``[..., D // group_size]``.

    Raises:
        ValueError: unsupported bits, ``D`` not divisible by the group, non-float ``x``, NaN/inf in ``x``.
    """
    check_bits(bits)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"quantize expects a floating tensor, got {got}; pass float16/bfloat16/float32")
    if x.dim() == 0:
        raise ValueError("quantize expects x of shape [..., D], got a 0-d tensor")
    groups = _check_group(x.shape[-1], group_size)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("quantize got NaN or inf in x; only finite values can be quantized")
    xg = x.float().reshape(*x.shape[:-1], groups, group_size)
    mx = xg.amax(dim=-1)
    mn = xg.amin(dim=-1)
    qmax = float(2**bits - 1)
    scale = ((mx - mn) / qmax).clamp(SCALE_MIN, SCALE_MAX)
    zero = -mn
    q = torch.floor((xg + zero.unsqueeze(-1)) / scale.unsqueeze(-1) + 0.5).clamp(0, qmax)
    return q.to(torch.int32).reshape(x.shape), scale.contiguous(), zero.contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``q * scale - zero`` per group, float32 ``[..., D]``."""
    groups = _check_group(q.shape[-1], group_size)
    if scale.shape[-1] != groups or zero.shape[-1] != groups:
        raise ValueError(
            f"scale/zero last dimension {scale.shape[-1]}/{zero.shape[-1]} != D // group_size = {groups}"
        )
    qg = q.to(torch.float32).reshape(*q.shape[:-1], groups, group_size)
    x = qg * scale.float().unsqueeze(-1) - zero.float().unsqueeze(-1)
    return x.reshape(q.shape)


def ers_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """ERS on integer codes only: ``bits``-bit codes to ``bits // 2``-bit codes (int32 result).

    ``q' = ((q * (2^(2c) - 2^c + 1) + 2^(3c-1) - 2^(2c-1) + 2^(c-1)) >> 3c) & (2^c - 1)`` with ``c = bits // 2``,
    which equals round-half-up(q / (2^c + 1)).
    """
    check_bits(bits, allowed=(16, 8, 4), what="bits (ERS source)")
    c = bits // 2
    mul = (1 << (2 * c)) - (1 << c) + 1
    add = (1 << (3 * c - 1)) - (1 << (2 * c - 1)) + (1 << (c - 1))
    q64 = q.to(torch.int64)
    return (((q64 * mul + add) >> (3 * c)) & ((1 << c) - 1)).to(torch.int32)


def requantize(q: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Equivalent Right Shift from ``bits`` to ``bits // 2``: integer ops on the codes, ``scale * (2^c + 1)``.

    Args:
        q: integer codes ``[..., D]`` in ``[0, 2^bits - 1]``.
        scale: float32 ``[..., G]``; the zero point is unchanged and not needed.
        bits: 16, 8 or 4 (2-bit codes cannot be shrunk further).
    """
    if q.is_floating_point():
        raise ValueError(f"requantize expects integer codes, got {q.dtype}")
    c = bits // 2
    return ers_codes(q, bits), scale * float((1 << c) + 1)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., D]`` densely into uint8 ``[..., D * bits // 8]`` (little-endian, low bits first).

    16-bit codes become two bytes (low byte first); 4-bit codes two per byte (element ``2i`` in the low
    nibble); 2-bit codes four per byte (element ``4i + j`` at bit ``2j``).
    """
    check_bits(bits)
    d = q.shape[-1]
    if (d * bits) % 8 != 0:
        raise ValueError(f"cannot pack D={d} codes of {bits} bits into whole bytes")
    qi = q.to(torch.int32)
    if bits == 16:
        lo = qi & 0xFF
        hi = (qi >> 8) & 0xFF
        return torch.stack([lo, hi], dim=-1).reshape(*q.shape[:-1], d * 2).to(torch.uint8)
    if bits == 8:
        return qi.to(torch.uint8)
    per = 8 // bits
    g = qi.reshape(*q.shape[:-1], d // per, per)
    shifts = torch.arange(per, device=q.device, dtype=torch.int32) * bits
    return (g << shifts).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[..., N]`` to int32 codes ``[..., N * 8 // bits]``."""
    check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack expects uint8 bytes, got {packed.dtype}")
    p = packed.to(torch.int32)
    n = packed.shape[-1]
    if bits == 16:
        if n % 2:
            raise ValueError(f"16-bit codes need an even number of bytes, got {n}")
        pr = p.reshape(*packed.shape[:-1], n // 2, 2)
        return pr[..., 0] | (pr[..., 1] << 8)
    if bits == 8:
        return p
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    codes = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], n * per)
