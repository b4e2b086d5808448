"""Decode attention over the packed arena: one query per row, GQA, split-K with a log-sum-exp merge.

``_split_kernel`` runs one program per (batch row, KV head, split). The query heads of the KV head's group
are the rows of the dot products (padded to 16), so K/V codes are loaded once per group. The past's
segments (sink, body chunks, window; each with its own bit-widths, read from ``table``) are divided evenly
over the splits; a split writes its partial output, max and sum. ``_merge_kernel`` (one program per row
and query head) attends the step's own new tokens in full precision and merges everything.

The grid depends only on static shapes (B, Hkv, ``num_splits``), never on the state, so a step can be
captured in a CUDA graph.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._common import attend_segment, segment_of
from .layout import ArenaLayout, check_layout_tensors

__all__ = ["decode_attention", "default_num_splits"]

LOG2E = 1.4426950408889634


@triton.jit
def _load_q4(q_ptr, rows, rmask, ks_ptr, kv_head, scale, D: tl.constexpr, HAS_KS: tl.constexpr):
    """Queries ``rows`` ``[M]`` (row index into a [*, D] matrix) as 4 float32 parts ``[M, D/4]`` times
    ``scale`` and, with HAS_KS, the key scale of ``kv_head``; also the unscaled-by-key-scale version."""
    i = tl.arange(0, D // 4)
    p = q_ptr + rows.to(tl.int64)[:, None] * D + 4 * i[None, :]
    m = rmask[:, None]
    q0 = tl.load(p + 0, mask=m, other=0.0).to(tl.float32) * scale
    q1 = tl.load(p + 1, mask=m, other=0.0).to(tl.float32) * scale
    q2 = tl.load(p + 2, mask=m, other=0.0).to(tl.float32) * scale
    q3 = tl.load(p + 3, mask=m, other=0.0).to(tl.float32) * scale
    if HAS_KS:
        sp = ks_ptr + kv_head * (D // 2) + (4 * i) % (D // 2)
        q0 = q0 * tl.load(sp + 0)[None, :]
        q1 = q1 * tl.load(sp + 1)[None, :]
        q2 = q2 * tl.load(sp + 2)[None, :]
        q3 = q3 * tl.load(sp + 3)[None, :]
    return q0, q1, q2, q3


@triton.jit
def _split_kernel(
    q_ptr,
    a8,
    a16,
    a32,
    af,
    table,
    state,
    lengths,
    ks_ptr,
    part_acc,
    part_ml,
    ROW_BYTES,
    qk_scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    GS: tl.constexpr,
    G: tl.constexpr,
    N_SINK: tl.constexpr,
    NW: tl.constexpr,
    SB: tl.constexpr,
    WB: tl.constexpr,
    WIN_OFF: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_KS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    GQ: tl.constexpr = HQ // HKV
    mrow = tl.arange(0, BLOCK_M)
    rmask = mrow < GQ
    heads = h * GQ + mrow
    q0, q1, q2, q3 = _load_q4(q_ptr, b * HQ + heads, rmask, ks_ptr, h, qk_scale, D, HAS_KS)
    q0 = q0.to(DT)
    q1 = q1.to(DT)
    q2 = q2.to(DT)
    q3 = q3.to(DT)
    n_chunks = tl.load(state + 2)
    length = tl.load(lengths + b)
    n_seg = n_chunks + 2
    per = (n_seg + NUM_SPLITS - 1) // NUM_SPLITS
    s_begin = split * per
    s_end = tl.minimum(s_begin + per, n_seg)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, D // 4], tl.float32)
    acc1 = tl.zeros([BLOCK_M, D // 4], tl.float32)
    acc2 = tl.zeros([BLOCK_M, D // 4], tl.float32)
    acc3 = tl.zeros([BLOCK_M, D // 4], tl.float32)
    row0 = b.to(tl.int64) * ROW_BYTES
    for s in range(s_begin, s_end):
        off, cap, kb, vb, n_valid = segment_of(s, n_chunks, length, table, N_SINK, NW, SB, WB, WIN_OFF)
        m_i, l_i, acc0, acc1, acc2, acc3 = attend_segment(
            q0, q1, q2, q3, m_i, l_i, acc0, acc1, acc2, acc3,
            a8 + row0, a16 + row0 // 2, a32 + row0 // 4, af + row0 // 4, off, cap, kb, vb, n_valid, h,
            HKV, D, GS, G, BLOCK_N, DT, PREC,
        )  # fmt: skip
    i = tl.arange(0, D // 4)
    prow = ((b * HQ + heads) * NUM_SPLITS + split).to(tl.int64)
    pa = part_acc + prow[:, None] * D + 4 * i[None, :]
    m = rmask[:, None]
    tl.store(pa + 0, acc0, mask=m)
    tl.store(pa + 1, acc1, mask=m)
    tl.store(pa + 2, acc2, mask=m)
    tl.store(pa + 3, acc3, mask=m)
    tl.store(part_ml + prow * 2, m_i, mask=rmask)
    tl.store(part_ml + prow * 2 + 1, l_i, mask=rmask)


@triton.jit
def _merge_kernel(
    q_ptr,
    k_new,
    v_new,
    part_acc,
    part_ml,
    out,
    T,
    qk_scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    h = hq // (HQ // HKV)
    d = tl.arange(0, D)
    sp = tl.arange(0, SPLIT_P2)
    smask = sp < NUM_SPLITS
    prow = (b * HQ + hq) * NUM_SPLITS + sp
    ms = tl.load(part_ml + prow * 2, mask=smask, other=float("-inf"))
    ls = tl.load(part_ml + prow * 2 + 1, mask=smask, other=0.0)
    q = tl.load(q_ptr + (b * HQ + hq) * D + d).to(tl.float32) * qk_scale
    kv_row = (b * HKV + h).to(tl.int64) * T
    # the new tokens' scores (T is small; a first pass finds their max)
    m_new = tl.full([], float("-inf"), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < T
        kn = tl.load(k_new + (kv_row + t)[:, None] * D + d[None, :], mask=tm[:, None], other=0.0).to(
            tl.float32
        )
        sc = tl.where(tm, tl.sum(kn * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_new, tl.max(sc, axis=0))
    mx = tl.maximum(tl.max(ms, axis=0), m_new)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.where(smask, tl.math.exp2(ms - mx), 0.0)
    acc = tl.load(part_acc + prow[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
    num = tl.sum(acc * w[:, None], axis=0)
    den = tl.sum(ls * w, axis=0)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < T
        kn = tl.load(k_new + (kv_row + t)[:, None] * D + d[None, :], mask=tm[:, None], other=0.0).to(
            tl.float32
        )
        vn = tl.load(v_new + (kv_row + t)[:, None] * D + d[None, :], mask=tm[:, None], other=0.0).to(
            tl.float32
        )
        sc = tl.where(tm, tl.sum(kn * q[None, :], axis=1), float("-inf"))
        p = tl.where(tm, tl.math.exp2(sc - mx), 0.0)
        num += tl.sum(vn * p[:, None], axis=0)
        den += tl.sum(p, axis=0)
    res = num / tl.where(den == 0.0, 1.0, den)
    tl.store(out + (b * HQ + hq) * D + d, res.to(out.dtype.element_ty))


_DT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def default_num_splits(batch: int, num_kv_heads: int, max_segments: int, sm_count: int = 132) -> int:
    """Splits so that about four programs run per multiprocessor, from static shapes only."""
    want = max(1, (4 * sm_count) // max(batch * num_kv_heads, 1))
    return int(max(1, min(want, max_segments, 128)))


def check_attention_args(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    lengths: torch.Tensor,
    key_scale: torch.Tensor | None,
    lay: ArenaLayout,
    arena: torch.Tensor,
    q_dims: int,
) -> None:
    """Shared validation of the attention ops' arguments (ValueError naming the bad value)."""
    if q.dim() != q_dims or q.dtype not in _DT:
        raise ValueError(
            f"q must be a {q_dims}-d float16/bfloat16/float32 tensor, got {q.dtype} {tuple(q.shape)}"
        )
    b, hq, d = q.shape[0], q.shape[1], q.shape[-1]
    if d != lay.head_dim or hq % lay.num_kv_heads or b != arena.shape[0]:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit the layout (B={arena.shape[0]}, Hq a multiple of "
            f"Hkv={lay.num_kv_heads}, D={lay.head_dim})"
        )
    if k_new.dim() != 4 or k_new.shape != v_new.shape or tuple(k_new.shape[:2]) != (b, lay.num_kv_heads):
        raise ValueError(
            f"k_new/v_new must be [B={b}, Hkv={lay.num_kv_heads}, T, D={d}], got {tuple(k_new.shape)} / "
            f"{tuple(v_new.shape)}"
        )
    if k_new.shape[3] != d:
        raise ValueError(f"k_new head_dim {k_new.shape[3]} != {d}")
    if lengths.dtype != torch.int32 or tuple(lengths.shape) != (b,):
        raise ValueError(f"lengths must be int32 [B={b}], got {lengths.dtype} {tuple(lengths.shape)}")
    if key_scale is not None and tuple(key_scale.shape) != (lay.num_kv_heads, d // 2):
        raise ValueError(
            f"key_scale must be [Hkv, D/2] = {(lay.num_kv_heads, d // 2)}, got {tuple(key_scale.shape)}"
        )
    for name, t in (("k_new", k_new), ("v_new", v_new), ("lengths", lengths), ("arena", arena)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


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
    """Triton launcher with :func:`pmkvq_compile.kernels.reference.decode_attention`'s signature."""
    lay = ArenaLayout.from_list(layout)
    check_layout_tensors(lay, arena, state, table)
    check_attention_args(q, k_new, v_new, lengths, key_scale, lay, arena, 3)
    if not lay.triton_supported():
        raise ValueError(f"the Triton kernels need a power-of-two head_dim >= 64, got {lay}")
    b, hq, d = q.shape
    hkv, t = lay.num_kv_heads, k_new.shape[2]
    if num_splits <= 0:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        num_splits = default_num_splits(b, hkv, lay.max_chunks + 2, sms)
    q, k_new, v_new = q.contiguous(), k_new.contiguous(), v_new.contiguous()
    has_ks = key_scale is not None
    ks = key_scale.to(device=q.device, dtype=torch.float32).contiguous() if has_ks else q
    part_acc = torch.empty(b, hq, num_splits, d, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(b, hq, num_splits, 2, dtype=torch.float32, device=q.device)
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    qk_scale = float(sm_scale) * LOG2E
    gq = hq // hkv
    interp = not q.is_cuda
    dt = tl.float32 if (interp or q.dtype == torch.float32) else _DT[q.dtype]
    prec = "ieee" if dt == tl.float32 else "tf32"
    a32 = arena.view(torch.int32)
    # tuning knobs (benchmarks sweep them): "BLOCK_N,num_warps,num_stages"
    cfg = os.environ.get("PMKVQ_DECODE_CFG", "")
    block_n, warps, stages = (int(x) for x in cfg.split(",")) if cfg else (64 if d <= 128 else 32, 4, 2)
    _split_kernel[(b, hkv, num_splits)](
        q, arena, arena.view(torch.int16), a32, arena.view(torch.float32), table, state, lengths, ks,
        part_acc, part_ml, arena.shape[1], qk_scale,
        HQ=hq, HKV=hkv, D=d, GS=lay.group_size, G=lay.groups, N_SINK=lay.n_sink, NW=lay.n_window,
        SB=lay.sink_bits, WB=lay.window_bits, WIN_OFF=lay.window_offset, NUM_SPLITS=num_splits,
        HAS_KS=has_ks, BLOCK_M=max(16, triton.next_power_of_2(gq)), BLOCK_N=block_n,
        DT=dt, PREC=prec, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    _merge_kernel[(b, hq)](
        q, k_new, v_new, part_acc, part_ml, out, t, qk_scale,
        HQ=hq, HKV=hkv, D=d, NUM_SPLITS=num_splits, SPLIT_P2=triton.next_power_of_2(num_splits),
        BLOCK_T=min(16, triton.next_power_of_2(max(t, 1))), num_warps=4,
    )  # fmt: skip
    return out


def sm_scale_default(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
