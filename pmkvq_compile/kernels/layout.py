"""The packed arena's geometry and the device-side cache state, shared by the kernels and their references.

Nothing here imports Triton. A layer's arena is uint8 ``[B, budget_bytes]`` (see :mod:`pmkvq_compile.cache`):

    | sink: n_sink @ sink_bits | window: n_window @ window_bits | body chunk 0 | chunk 1 | ... | free |

A region of capacity ``C`` at byte ``o`` holds K codes ``u8 [Hkv, C, D*kb/8]``, then V codes
``u8 [Hkv, C, D*vb/8]``, then meta ``[4, Hkv, C, G]`` = (k_scale, k_zero, v_scale, v_zero): float32, or float16
where ``scale_bytes == 2`` and both ``kb`` and ``vb`` are at most 8 (:meth:`ArenaLayout.meta_bytes`; a plan's
``scale_dtype="float16"``). A float16 value is the float32 one clamped to +-65504 and rounded to nearest even.

Device state of one layer (so that a compiled step or a CUDA graph needs no Python ints):

* ``state``: int32 ``[STATE_SIZE]`` = (n_tokens, window_len, n_chunks, body_key_bits, body_value_bits,
  overflow, 0, 0). ``overflow`` becomes 1 when an append would exceed the budget even at 2 bits; that
  append then changes nothing (the eager cache raises BudgetExceededError before calling it).
* ``table``: int32 ``[C_cap, 3]`` = (byte_offset, key_bits, value_bits) of body chunk ``i`` for
  ``i < n_chunks``; ``C_cap`` = the chunks that fit the body at 2 bits (at least 1 row).

The op signatures carry the geometry as ``layout: list[int]`` (:meth:`ArenaLayout.to_list`).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields

import torch

from ..plan import Plan, check_half_meta_alignment, meta_bytes, meta_dtype, next_body_bits, token_bytes
from ..quant import check_bits

__all__ = [
    "BODY_KB",
    "BODY_VB",
    "N_CHUNKS",
    "N_TOKENS",
    "OVERFLOW",
    "STATE_SIZE",
    "WINDOW_LEN",
    "ArenaLayout",
    "meta_cast",
    "next_body_bits",
]

N_TOKENS, WINDOW_LEN, N_CHUNKS, BODY_KB, BODY_VB, OVERFLOW = range(6)
STATE_SIZE = 8


def meta_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scales/zeros as stored: float32 as they are; float16 clamped to +-65504 and rounded to nearest even."""
    if dtype == torch.float16:
        return x.float().clamp(-65504.0, 65504.0).to(torch.float16)
    return x.to(dtype)


@dataclass(frozen=True)
class ArenaLayout:
    """Static geometry of one layer's arena; ``key_bits``/``value_bits`` are the plan's final body bits."""

    num_kv_heads: int
    head_dim: int
    group_size: int
    n_sink: int
    n_window: int
    sink_bits: int
    window_bits: int
    init_bits: int
    key_bits: int
    value_bits: int
    budget_bytes: int
    scale_bytes: int = 4

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"ArenaLayout.{f.name}={v!r} must be an int")
        for name in ("sink_bits", "window_bits", "init_bits", "key_bits", "value_bits"):
            check_bits(getattr(self, name), what=name)
        if self.num_kv_heads < 1 or self.n_window < 1 or self.n_sink < 0:
            raise ValueError(f"invalid layout {self}")
        if self.head_dim % 16 or self.head_dim % self.group_size or self.group_size % 8:
            raise ValueError(
                f"head_dim={self.head_dim} must be a multiple of 16 and of group_size={self.group_size}, "
                "itself a multiple of 8"
            )
        if self.scale_bytes not in (4, 2):
            raise ValueError(f"ArenaLayout.scale_bytes={self.scale_bytes} must be 4 (float32) or 2 (float16)")
        if self.scale_bytes == 2:
            check_half_meta_alignment(
                self.num_kv_heads, self.groups, self.n_window, self.n_sink, self.sink_bits
            )
        if self.budget_bytes % 4:
            raise ValueError(f"budget_bytes={self.budget_bytes} must be divisible by 4")
        if self.body_capacity < 0:
            raise ValueError(
                f"budget_bytes={self.budget_bytes} is below sink + window ({self.body_offset} bytes)"
            )

    @classmethod
    def from_plan(cls, plan: Plan, layer: int) -> ArenaLayout:
        g, lp = plan.geometry, plan.layers[layer]
        return cls(
            num_kv_heads=g.num_kv_heads,
            head_dim=g.head_dim,
            group_size=plan.group_size,
            n_sink=plan.n_sink,
            n_window=plan.n_window,
            sink_bits=plan.sink_bits,
            window_bits=plan.window_bits,
            init_bits=plan.init_bits,
            key_bits=lp.key_bits,
            value_bits=lp.value_bits,
            budget_bytes=lp.budget_bytes,
            scale_bytes=2 if plan.scale_dtype == "float16" else 4,
        )

    def to_list(self) -> list[int]:
        """The ``layout: list[int]`` argument of the ``pmkvq::`` ops (field order of this dataclass)."""
        return list(astuple(self))

    @classmethod
    def from_list(cls, values: list[int] | tuple[int, ...]) -> ArenaLayout:
        n = len(fields(cls))
        if len(values) not in (n - 1, n):  # without the last field: a layout from before scale_bytes
            raise ValueError(f"layout must hold {n} ints (ArenaLayout.to_list()), got {len(values)}")
        return cls(*(int(v) for v in values))

    # ---- bytes ---------------------------------------------------------------------------------------
    @property
    def groups(self) -> int:
        return self.head_dim // self.group_size

    @property
    def scale_dtype(self) -> str:
        """The plan's ``scale_dtype`` this layout was built from: ``"float16"`` when ``scale_bytes`` is 2."""
        return "float16" if self.scale_bytes == 2 else "float32"

    def meta_bytes(self, kb: int, vb: int) -> int:
        """Bytes of one stored scale or zero of a region at ``(kb, vb)``: 2 (float16) when ``scale_bytes`` is
        2 and both are at most 8 bits, else 4 (float32)."""
        return meta_bytes(kb, vb, self.scale_dtype)

    def meta_dtype(self, kb: int, vb: int) -> torch.dtype:
        return meta_dtype(kb, vb, self.scale_dtype)

    def token_bytes(self, kb: int, vb: int) -> int:
        """Bytes of one token (all KV heads) at ``(kb, vb)``: the plan's memory model (:func:`plan.token_bytes`),
        so the budgets the planner sets and the regions the cache lays out are one formula."""
        return token_bytes(self.num_kv_heads, self.head_dim, self.group_size, kb, vb, self.scale_dtype)

    @property
    def sink_bytes(self) -> int:
        return self.n_sink * self.token_bytes(self.sink_bits, self.sink_bits)

    @property
    def window_offset(self) -> int:
        return self.sink_bytes

    @property
    def body_offset(self) -> int:
        return self.sink_bytes + self.n_window * self.token_bytes(self.window_bits, self.window_bits)

    @property
    def body_capacity(self) -> int:
        return self.budget_bytes - self.body_offset

    def chunk_bytes(self, kb: int, vb: int) -> int:
        return self.n_window * self.token_bytes(kb, vb)

    @property
    def max_chunks(self) -> int:
        """``C_cap``: body chunks that fit at 2 bits (the table's rows, at least 1)."""
        return max(self.body_capacity // self.chunk_bytes(2, 2), 1)

    def region_parts(self, offset: int, capacity: int, kb: int, vb: int) -> tuple[int, int, int, int]:
        """Byte offsets of a region's K codes, V codes, meta, and its end."""
        h, d = self.num_kv_heads, self.head_dim
        kc = h * capacity * d * kb // 8
        vc = h * capacity * d * vb // 8
        meta = 4 * self.meta_bytes(kb, vb) * h * capacity * self.groups
        return offset, offset + kc, offset + kc + vc, offset + kc + vc + meta

    # ---- state ---------------------------------------------------------------------------------------
    def initial_state(self, device: torch.device | str | None = None) -> torch.Tensor:
        s = torch.zeros(STATE_SIZE, dtype=torch.int32, device=device)
        s[BODY_KB] = self.init_bits
        s[BODY_VB] = self.init_bits
        return s

    def empty_table(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.zeros(self.max_chunks, 3, dtype=torch.int32, device=device)

    def triton_supported(self) -> bool:
        """The Triton kernels need a power-of-two head_dim >= 64 and a power-of-two group size."""
        d, gs = self.head_dim, self.group_size
        return d >= 64 and d & (d - 1) == 0 and gs & (gs - 1) == 0 and gs >= 8


def check_layout_tensors(
    layout: ArenaLayout, arena: torch.Tensor, state: torch.Tensor, table: torch.Tensor
) -> None:
    """Raise ValueError naming what is wrong with an arena/state/table triple."""
    if arena.dtype != torch.uint8 or arena.dim() != 2 or arena.shape[1] != layout.budget_bytes:
        raise ValueError(
            f"arena must be uint8 [B, {layout.budget_bytes}], got {arena.dtype} {tuple(arena.shape)}"
        )
    if not arena.is_contiguous():
        raise ValueError("arena must be contiguous")
    if state.dtype != torch.int32 or tuple(state.shape) != (STATE_SIZE,):
        raise ValueError(f"state must be int32 [{STATE_SIZE}], got {state.dtype} {tuple(state.shape)}")
    if table.dtype != torch.int32 or tuple(table.shape) != (layout.max_chunks, 3):
        raise ValueError(
            f"table must be int32 [{layout.max_chunks}, 3], got {table.dtype} {tuple(table.shape)}"
        )
    if state.device != arena.device or table.device != arena.device:
        raise ValueError(
            f"arena, state and table must share a device, got {arena.device}, {state.device}, {table.device}"
        )
