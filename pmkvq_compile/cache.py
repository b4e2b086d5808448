"""The progressive KV cache: one fixed byte arena per layer, sized to the layer's budget.

Layout of one layer's arena (uint8 ``[B, budget_bytes]``; every row is laid out the same way)::

    | sink: n_sink tokens @ sink_bits | window: n_window tokens @ window_bits | body chunk 0 | chunk 1 | ... | free |

Each region (a :class:`Segment`) stores, from its byte offset on::

    K codes  uint8 [Hkv, capacity, D * key_bits // 8]     (quant.pack layout)
    V codes  uint8 [Hkv, capacity, D * value_bits // 8]
    meta     float32 [4, Hkv, capacity, G]                 (k_scale, k_zero, v_scale, v_zero)

(meta is float16, clamped to +-65504 and rounded to nearest even, where the plan's ``scale_dtype`` is
``"float16"`` and both bit-widths are at most 8.)

Body chunks hold ``n_window`` tokens each and carry their own bit-widths, so the body can hold segments of
different bit-widths side by side. Tokens flow: sink first, then the window; when the window is full it is
moved into the body (its 16-bit codes shrunk by ERS to the body's current bits). After every update, while
sink + full window + body exceed the layer's budget, the whole body is shrunk one level by ERS; when even
2 bits cannot hold it, :class:`BudgetExceededError` is raised and the cache is left untouched.

All of this state (lengths, chunk bit-widths) is a pure function of the number of tokens held, which is
what lets the compiled path recompute it in-graph.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import quant
from .kernels import reference as ref
from .kernels.layout import ArenaLayout
from .plan import LayerPlan, ModelGeometry, Plan, next_body_bits

__all__ = ["BudgetExceededError", "ProgressiveKVCache", "ProgressiveLayer", "Segment", "next_body_bits"]


class BudgetExceededError(MemoryError):
    """Even a 2-bit body cannot hold the sequence within the layer's byte budget."""

    def __init__(self, layer: int, length: int, budget: int, needed: int) -> None:
        self.layer, self.length, self.budget, self.needed = layer, length, budget, needed
        super().__init__(
            f"layer {layer}: {length} tokens need {needed:,} bytes even with a 2-bit body, but the layer's "
            f"budget is {budget:,} bytes; use a plan with a larger max_len or budget"
        )


@dataclass(frozen=True)
class Segment:
    """A region of the arena: ``capacity`` tokens at ``(key_bits, value_bits)`` from byte ``offset``."""

    offset: int
    capacity: int
    key_bits: int
    value_bits: int


# The attention function finds the cache layer whose update produced its key tensor through this variable.
_LAST_UPDATE: contextvars.ContextVar[tuple[ProgressiveLayer, torch.Tensor] | None] = contextvars.ContextVar(
    "pmkvq_last_update", default=None
)


class ProgressiveLayer(CacheLayerMixin):
    """One layer's progressive quantized cache (see the module docstring for layout and rules)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(
        self,
        plan: Plan,
        layer_idx: int,
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.layer_idx = layer_idx
        self.lp: LayerPlan = plan.layers[layer_idx]
        g = plan.geometry
        self.hkv, self.d, self.gs = g.num_kv_heads, g.head_dim, plan.group_size
        self.groups = self.d // self.gs
        # the byte layout the kernels and the reference read: one definition of where the window, the body
        # and a region's parts sit (it refuses a budget below sink + window or not divisible by 4)
        try:
            self.layout = ArenaLayout.from_plan(plan, layer_idx)
        except ValueError as e:
            raise ValueError(f"layer {layer_idx}: {e}") from None
        self.sink = Segment(0, plan.n_sink, plan.sink_bits, plan.sink_bits)
        self.window = Segment(self.layout.window_offset, plan.n_window, plan.window_bits, plan.window_bits)
        self.body_offset = self.layout.body_offset
        self.body_capacity = self.layout.body_capacity
        self.dtype = dtype
        self.arena: torch.Tensor | None = None  # uint8 [B, budget_bytes]
        self._reset_state()
        if batch_size is not None:
            self._allocate(batch_size, torch.device(device or "cpu"), dtype or torch.float32)

    # ---- state -------------------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.n_tokens = 0
        self.window_len = 0
        self.chunk_bits: list[tuple[int, int]] = []
        self.body_bits: tuple[int, int] = (self.plan.init_bits, self.plan.init_bits)

    def _allocate(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        self.arena = torch.zeros(batch, self.lp.budget_bytes, dtype=torch.uint8, device=device)
        self.device, self.dtype, self.batch_size = device, dtype, batch
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._allocate(key_states.shape[0], key_states.device, key_states.dtype)

    def chunk_segments(self, chunk_bits: list[tuple[int, int]] | None = None) -> list[Segment]:
        """The body's chunks, compactly laid out from the body offset."""
        off, out = self.body_offset, []
        for kb, vb in self.chunk_bits if chunk_bits is None else chunk_bits:
            seg = Segment(off, self.plan.n_window, kb, vb)
            out.append(seg)
            off += self.layout.chunk_bytes(kb, vb)
        return out

    def body_bytes(self, chunk_bits: list[tuple[int, int]] | None = None) -> int:
        return sum(
            self.layout.chunk_bytes(kb, vb)
            for kb, vb in (self.chunk_bits if chunk_bits is None else chunk_bits)
        )

    def nbytes(self) -> int:
        """Bytes the held tokens need (codes + scales + zeros), per sequence."""
        lay = self.layout
        n_sink = min(self.n_tokens, lay.n_sink)
        return (
            n_sink * lay.token_bytes(lay.sink_bits, lay.sink_bits)
            + self.window_len * lay.token_bytes(lay.window_bits, lay.window_bits)
            + self.body_bytes()
        )

    def get_seq_length(self) -> int:
        return self.n_tokens

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n_tokens + query_length, 0

    def reset(self) -> None:
        if self.arena is not None:
            self.arena.zero_()
        self._reset_state()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.arena is not None:
            self.arena.copy_(self.arena.index_select(0, beam_idx.to(self.arena.device)))

    # ---- views ---------------------------------------------------------------------------------------------
    def views(self, seg: Segment) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k_codes [B,Hkv,cap,D*kb/8] u8, v_codes [B,Hkv,cap,D*vb/8] u8, meta [B,4,Hkv,cap,G])``, meta
        float32 or float16 (see the module docstring): :func:`reference.region_views` of the arena."""
        assert self.arena is not None
        return ref.region_views(
            self.arena, self.layout, seg.offset, seg.capacity, seg.key_bits, seg.value_bits
        )

    def _write(self, seg: Segment, start: int, *codes: torch.Tensor) -> None:
        """Write codes/meta ``(kq, ks, kz, vq, vs, vz)`` for tokens ``[start, start + T)`` of ``seg`` (codes
        int32 [B,Hkv,T,D]): :func:`reference.write_region`."""
        assert self.arena is not None
        ref.write_region(
            self.arena, self.layout, seg.offset, seg.capacity, seg.key_bits, seg.value_bits, start, codes
        )

    def _read(self, seg: Segment, n: int) -> ref.Codes:
        """Codes (int32 [B,Hkv,n,D]) and meta (float32 copies [B,Hkv,n,G]) of the first ``n`` tokens of
        ``seg``: :func:`reference.read_region`."""
        assert self.arena is not None
        return ref.read_region(
            self.arena, self.layout, seg.offset, seg.capacity, seg.key_bits, seg.value_bits, n
        )

    def _quantize(self, k: torch.Tensor, v: torch.Tensor, kb: int, vb: int) -> ref.Codes:
        return ref.quantize_kv(k, v, kb, vb, self.gs)

    # ---- the update ----------------------------------------------------------------------------------------
    def plan_update(self, n_new: int) -> tuple[int, int, list[tuple[int, int]], tuple[int, int]]:
        """What an update of ``n_new`` tokens leads to, without touching anything.

        Returns ``(to_sink, n_flush, chunk_bits_after, body_bits_after)``; raises BudgetExceededError.
        """
        p = self.plan
        to_sink = min(max(p.n_sink - self.n_tokens, 0), n_new)
        stream = self.window_len + n_new - to_sink
        n_flush = stream // p.n_window
        body_bits = self.body_bits
        final = (self.lp.key_bits, self.lp.value_bits)
        chunks = list(self.chunk_bits) + [body_bits] * n_flush
        while self.body_bytes(chunks) > self.body_capacity:
            nxt = next_body_bits(*body_bits, final)
            if nxt is None:
                raise BudgetExceededError(
                    self.layer_idx,
                    self.n_tokens + n_new,
                    self.lp.budget_bytes,
                    self.body_offset + self.body_bytes(chunks),
                )
            body_bits = nxt
            chunks = [(min(kb, body_bits[0]), min(vb, body_bits[1])) for kb, vb in chunks]
        return to_sink, n_flush, chunks, body_bits

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new tokens ``[B, Hkv, T, D]`` and return them unchanged (the attention reads the arena).

        Keys are divided by the plan's key scale first when it is not folded into the weights.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, t, d = key_states.shape
        if (h, d) != (self.hkv, self.d) or value_states.shape != key_states.shape:
            raise ValueError(
                f"layer {self.layer_idx}: expected key/value states [B, {self.hkv}, T, {self.d}], got "
                f"{tuple(key_states.shape)} / {tuple(value_states.shape)}"
            )
        if b != self.batch_size:
            raise ValueError(f"layer {self.layer_idx}: cache holds batch {self.batch_size}, got batch {b}")
        to_sink, n_flush, chunks_after, body_after = self.plan_update(t)  # may raise: nothing changed yet
        k = self.scale_keys(key_states)
        v = value_states
        p = self.plan
        # sink
        if to_sink:
            self._write(
                self.sink,
                self.n_tokens,
                *self._quantize(k[:, :, :to_sink], v[:, :, :to_sink], p.sink_bits, p.sink_bits),
            )
        new = self._quantize(k[:, :, to_sink:], v[:, :, to_sink:], p.window_bits, p.window_bits)
        # shrink existing chunks if the body level dropped
        old_chunks = self.chunk_bits
        if n_flush or chunks_after[: len(old_chunks)] != old_chunks:
            self._rewrite_body(old_chunks, chunks_after, new, n_flush)
        # window: the stream's tail
        if n_flush:
            used = n_flush * p.n_window - self.window_len
            tail = [x[:, :, used:] for x in new]
            self.window_len = 0
        else:
            tail = list(new)
        if tail[0].shape[2]:
            self._write(self.window, self.window_len, *tail)
        self.window_len += tail[0].shape[2]
        self.n_tokens += t
        self.chunk_bits = chunks_after
        self.body_bits = body_after
        _LAST_UPDATE.set((self, key_states))
        return key_states, value_states

    def _rewrite_body(
        self, old: list[tuple[int, int]], after: list[tuple[int, int]], new, n_flush: int
    ) -> None:
        p = self.plan
        old_segs = self.chunk_segments(old)
        new_segs = self.chunk_segments(after)
        # chunks that keep their bits and position need no work
        first_changed = next((i for i, (a, b) in enumerate(zip(old, after)) if a != b), len(old))
        pieces = []
        for i in range(first_changed, len(old)):
            kq, ks, kz, vq, vs, vz = self._read(old_segs[i], p.n_window)
            kq, ks = ref.ers_to(kq, ks, old[i][0], after[i][0])
            vq, vs = ref.ers_to(vq, vs, old[i][1], after[i][1])
            pieces.append((i, (kq, ks, kz, vq, vs, vz)))
        if n_flush:
            # the stream: current window tokens (window bits) then the new tokens
            wk = self._read(self.window, self.window_len)
            stream = [torch.cat([a, b], dim=2) for a, b in zip(wk, new)]
            for j in range(n_flush):
                sl = slice(j * p.n_window, (j + 1) * p.n_window)
                kq, ks, kz, vq, vs, vz = (x[:, :, sl] for x in stream)
                idx = len(old) + j
                kq, ks = ref.ers_to(kq, ks, p.window_bits, after[idx][0])
                vq, vs = ref.ers_to(vq, vs, p.window_bits, after[idx][1])
                pieces.append((idx, (kq, ks, kz, vq, vs, vz)))
        # all reads are done: write in order (new offsets never pass old ones, but we read first anyway)
        for idx, parts in pieces:
            self._write(new_segs[idx], 0, *parts)

    # ---- reading -------------------------------------------------------------------------------------------
    def key_scale_full(self) -> torch.Tensor | None:
        """The key reparameterization scale over all D channels, float32 [Hkv, D], or None."""
        s = self.lp.key_scale
        if s is None or self.plan.key_scales_folded:
            return None
        return torch.cat([s, s], dim=-1)

    def scale_keys(self, k: torch.Tensor) -> torch.Tensor:
        s = self.key_scale_full()
        if s is None:
            return k
        return (k.float() / s.to(k.device)[None, :, None, :]).to(k.dtype)

    def scale_queries(self, q: torch.Tensor) -> torch.Tensor:
        """Multiply queries ``[B, Hq, T, D]`` by the key scale of their KV head (GQA-aware)."""
        s = self.key_scale_full()
        if s is None:
            return q
        rep = q.shape[1] // self.hkv
        return (q.float() * s.to(q.device).repeat_interleave(rep, dim=0)[None, :, None, :]).to(q.dtype)

    def segments_in_order(self) -> list[tuple[Segment, int]]:
        """``(segment, tokens held)`` from oldest to newest."""
        p = self.plan
        out = [(self.sink, min(self.n_tokens, p.n_sink))]
        out += [(s, p.n_window) for s in self.chunk_segments()]
        out.append((self.window, self.window_len))
        return [(s, n) for s, n in out if n]

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All held K (scaled keys) and V dequantized: float32 ``[B, Hkv, n_tokens, D]`` each."""
        ks, vs = [], []
        for seg, n in self.segments_in_order():
            kq, ksc, kz, vq, vsc, vz = self._read(seg, n)
            ks.append(quant.dequantize(kq, ksc, kz, self.gs))
            vs.append(quant.dequantize(vq, vsc, vz, self.gs))
        if not ks:
            empty = torch.zeros(self.batch_size, self.hkv, 0, self.d, device=self.device)
            return empty, empty.clone()
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

    def current_bits(self) -> tuple[int, int]:
        return self.body_bits


class ProgressiveKVCache(Cache):
    """A transformers ``Cache`` with one :class:`ProgressiveLayer` per decoder layer.

    Args:
        plan: the plan (checked against ``config``).
        config: the model's config (or a ModelGeometry).
        batch_size, device, dtype: preallocate every arena now (otherwise on the first update).

    Use with ``attn_implementation="pmkvq"`` (see :func:`pmkvq_compile.attention.use_pmkvq_attention`).
    """

    def __init__(
        self,
        plan: Plan,
        config: Any,
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(plan, Plan):
            raise ValueError(f"plan must be a pmkvq_compile.Plan, got {type(plan).__name__}")
        plan.check_model(ModelGeometry.from_config(config))
        self.plan = plan
        layers = [
            ProgressiveLayer(plan, i, batch_size=batch_size, device=device, dtype=dtype)
            for i in range(plan.geometry.num_layers)
        ]
        super().__init__(layers=layers)

    def nbytes(self, layer: int | None = None) -> int:
        """Bytes the held tokens need in ``layer`` (or all layers), per sequence."""
        if layer is None:
            return sum(lay.nbytes() for lay in self.layers)
        return self.layers[layer].nbytes()

    def allocated_bytes(self) -> int:
        """Bytes of all arenas (batch included)."""
        return sum(lay.arena.numel() for lay in self.layers if lay.arena is not None)

    def body_bits(self, layer: int) -> tuple[int, int]:
        """Current (key, value) bits of the layer's body."""
        return self.layers[layer].body_bits

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()
