"""Every kernel as a ``torch.library`` custom op in the ``pmkvq`` namespace, with a fake implementation.

Dispatch (one function, :func:`use_triton`): the Triton kernels on CUDA when the layout allows them
(power-of-two ``head_dim >= 64``), the pure-PyTorch references of :mod:`pmkvq_compile.kernels.reference`
everywhere else. Tests also run the Triton launchers on the CPU under ``TRITON_INTERPRET=1``.

Shared arguments (see :mod:`pmkvq_compile.kernels.layout` for the arena layout):

* ``arena``: uint8 ``[B, budget_bytes]``, the layer's packed storage.
* ``state``: int32 ``[8]`` = (n_tokens, window_len, n_chunks, body_key_bits, body_value_bits, overflow, 0, 0).
* ``table``: int32 ``[C_cap, 3]`` = (byte_offset, key_bits, value_bits) per body chunk.
* ``layout``: ``list[int]`` from :meth:`ArenaLayout.to_list` (static per layer; baked into a graph).
* ``key_scale``: optional float32 ``[Hkv, D/2]`` key reparameterization scale (keys stored as ``K / s``,
  queries multiplied by ``s``; channels ``j`` and ``j + D/2`` share ``s[:, j]``), or None.
* ``lengths``: int32 ``[B]``, past tokens each row attends (``<= state.n_tokens``; the arena is addressed
  by the state's ``n_chunks``).

Ops:

``pmkvq::append(Tensor(a!) arena, Tensor(b!) state, Tensor(c!) table, Tensor key, Tensor value,
Tensor? key_scale, int[] layout) -> ()``
    Quantize-and-append ``key``/``value`` ``[B, Hkv, T, D]`` (fp16/bf16/fp32) with the progressive ERS
    rules; on overflow sets ``state[5] = 1`` and changes nothing else. No host sync on CUDA.

``pmkvq::requantize_body(Tensor(a!) arena, Tensor(b!) state, Tensor(c!) table, int key_bits,
int value_bits, int[] layout) -> ()``
    ERS the whole body in place down to ``(key_bits, value_bits)`` (per chunk ``min`` with its bits),
    compacting chunks; bit-exact with ``quant.requantize``.

``pmkvq::decode_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor arena, Tensor state, Tensor table,
Tensor lengths, Tensor? key_scale, int[] layout, float sm_scale, int num_splits) -> Tensor``
    ``q [B, Hq, D]`` attends the past (``lengths[b]`` tokens from the arena) and the step's own new K/V
    ``[B, Hkv, T, D]`` (all of them, full precision). Returns ``[B, Hq, D]`` in q's dtype.
    ``num_splits <= 0`` picks a split count from static shapes.

``pmkvq::prefill_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor arena, Tensor state, Tensor table,
Tensor lengths, Tensor? key_scale, int[] layout, float sm_scale) -> Tensor``
    ``q [B, Hq, T, D]`` over the past plus the new K/V ``[B, Hkv, T, D]`` causally (query ``i`` sees new
    tokens ``0..i``). Returns ``[B, Hq, T, D]`` in q's dtype.
"""

from __future__ import annotations

import torch

from .kernels import reference
from .kernels.layout import ArenaLayout, check_layout_tensors
from .quant import check_bits

__all__ = ["append", "decode_attention", "prefill_attention", "requantize_body", "use_triton"]


def use_triton(device: torch.device, layout: list[int]) -> bool:
    """The one dispatch rule: Triton on CUDA for layouts the kernels support, the reference elsewhere."""
    return device.type == "cuda" and ArenaLayout.from_list(layout).triton_supported()


def _check_kv(arena: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lay: ArenaLayout) -> None:
    if key.dim() != 4 or key.shape != value.shape:
        raise ValueError(
            f"key/value must be [B, Hkv, T, D] of one shape, got {tuple(key.shape)} / {tuple(value.shape)}"
        )
    b, h, _, d = key.shape
    if (b, h, d) != (arena.shape[0], lay.num_kv_heads, lay.head_dim):
        raise ValueError(
            f"key/value {tuple(key.shape)} do not fit the layout: expected [B={arena.shape[0]}, "
            f"Hkv={lay.num_kv_heads}, T, D={lay.head_dim}]"
        )
    if not key.is_floating_point() or key.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"key/value must be float16/bfloat16/float32, got {key.dtype}")
    if key.device != arena.device or value.device != arena.device:
        raise ValueError(f"key/value are on {key.device}/{value.device} but the arena is on {arena.device}")


def _check_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    arena: torch.Tensor,
    state: torch.Tensor,
    table: torch.Tensor,
    lengths: torch.Tensor,
    key_scale: torch.Tensor | None,
    layout: list[int],
    q_dims: int,
) -> None:
    """The attention launchers' own argument checks, for the reference branch."""
    from .kernels.decode_attention import check_attention_args

    lay = ArenaLayout.from_list(layout)
    check_layout_tensors(lay, arena, state, table)
    check_attention_args(q, k_new, v_new, lengths, key_scale, lay, arena, q_dims)


@torch.library.custom_op("pmkvq::append", mutates_args=("arena", "state", "table"))
def append(
    arena: torch.Tensor,
    state: torch.Tensor,
    table: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_scale: torch.Tensor | None,
    layout: list[int],
) -> None:
    """See the module docstring."""
    lay = ArenaLayout.from_list(layout)
    check_layout_tensors(lay, arena, state, table)
    _check_kv(arena, key, value, lay)
    if use_triton(arena.device, layout):
        from .kernels import append as kernel

        kernel.append(arena, state, table, key, value, key_scale, layout)
    else:
        reference.append(arena, state, table, key, value, key_scale, layout)


@append.register_fake
def _(arena, state, table, key, value, key_scale, layout) -> None:
    return None


@torch.library.custom_op("pmkvq::requantize_body", mutates_args=("arena", "state", "table"))
def requantize_body(
    arena: torch.Tensor,
    state: torch.Tensor,
    table: torch.Tensor,
    key_bits: int,
    value_bits: int,
    layout: list[int],
) -> None:
    """See the module docstring."""
    lay = ArenaLayout.from_list(layout)
    check_layout_tensors(lay, arena, state, table)
    check_bits(key_bits, allowed=(8, 4, 2, 16), what="key_bits")
    check_bits(value_bits, allowed=(8, 4, 2, 16), what="value_bits")
    if use_triton(arena.device, layout):
        from .kernels import append as kernel

        kernel.requantize_body_launch(arena, state, table, key_bits, value_bits, layout)
    else:
        reference.requantize_body(arena, state, table, key_bits, value_bits, layout)


@requantize_body.register_fake
def _(arena, state, table, key_bits, value_bits, layout) -> None:
    return None


@torch.library.custom_op("pmkvq::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    arena: torch.Tensor,
    state: torch.Tensor,
    table: torch.Tensor,
    lengths: torch.Tensor,
    key_scale: torch.Tensor | None,
    layout: list[int],
    sm_scale: float,
    num_splits: int,
) -> torch.Tensor:
    """See the module docstring."""
    if use_triton(q.device, layout):  # the launcher validates its arguments itself
        from .kernels import decode_attention as kernel

        return kernel.decode_attention(
            q, k_new, v_new, arena, state, table, lengths, key_scale, layout, sm_scale, num_splits
        )
    _check_attention(q, k_new, v_new, arena, state, table, lengths, key_scale, layout, 3)
    return reference.decode_attention(
        q, k_new, v_new, arena, state, table, lengths, key_scale, layout, sm_scale, num_splits
    )


@decode_attention.register_fake
def _(q, k_new, v_new, arena, state, table, lengths, key_scale, layout, sm_scale, num_splits):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op("pmkvq::prefill_attention", mutates_args=())
def prefill_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    arena: torch.Tensor,
    state: torch.Tensor,
    table: torch.Tensor,
    lengths: torch.Tensor,
    key_scale: torch.Tensor | None,
    layout: list[int],
    sm_scale: float,
) -> torch.Tensor:
    """See the module docstring."""
    if use_triton(q.device, layout):  # the launcher validates its arguments itself
        from .kernels import prefill_attention as kernel

        return kernel.prefill_attention(
            q, k_new, v_new, arena, state, table, lengths, key_scale, layout, sm_scale
        )
    _check_attention(q, k_new, v_new, arena, state, table, lengths, key_scale, layout, 4)
    if k_new.shape[2] != q.shape[2]:
        raise ValueError(
            f"prefill needs as many new keys as queries, got {k_new.shape[2]} keys for {q.shape[2]} queries"
        )
    return reference.prefill_attention(
        q, k_new, v_new, arena, state, table, lengths, key_scale, layout, sm_scale
    )


@prefill_attention.register_fake
def _(q, k_new, v_new, arena, state, table, lengths, key_scale, layout, sm_scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
