"""Small arenas for the kernel tests: built with the reference append, plus a mixed-bits body."""

from __future__ import annotations

import torch

from pmkvq_compile.kernels import reference as ref
from pmkvq_compile.kernels.layout import ArenaLayout
from pmkvq_compile.plan import ModelGeometry, Plan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def small_layout(
    *,
    hkv: int = 2,
    d: int = 64,
    group: int = 32,
    n_window: int = 5,
    bits: int = 4,
    value_bits: int = 2,
    max_len: int = 40,
    n_sink: int = 1,
    scale_dtype: str = "float32",
) -> ArenaLayout:
    geo = ModelGeometry("llama", 1, 3 * hkv, hkv, d, 3 * hkv * d)
    plan = Plan.uniform(
        geo,
        bits,
        max_len,
        value_bits=value_bits,
        n_window=n_window,
        group_size=group,
        n_sink=n_sink,
        scale_dtype=scale_dtype,
    )
    return ArenaLayout.from_plan(plan, 0)


def empty_cache(lay: ArenaLayout, batch: int, device: str = DEVICE):
    arena = torch.zeros(batch, lay.budget_bytes, dtype=torch.uint8, device=device)
    return arena, lay.initial_state(device), lay.empty_table(device)


def filled_cache(
    lay: ArenaLayout, batch: int, steps: list[int], key_scale=None, seed: int = 0, device=DEVICE
):
    """A cache after reference appends of ``steps`` tokens each (float32 K/V)."""
    g = torch.Generator().manual_seed(seed)
    arena, state, table = empty_cache(lay, batch, device)
    for t in steps:
        k = torch.randn(batch, lay.num_kv_heads, t, lay.head_dim, generator=g).to(device)
        v = torch.randn(batch, lay.num_kv_heads, t, lay.head_dim, generator=g).to(device)
        ref.append(arena, state, table, k, v, key_scale, lay.to_list())
    return arena, state, table


def make_mixed(lay: ArenaLayout, arena, state, table, first_low: int) -> None:
    """ERS chunks ``first_low..`` of a uniform body down to (2, 2), re-packing compactly (a mixed body)."""
    nc = int(state[2])
    off = lay.body_offset
    for i, (o, kb, vb) in enumerate(table[:nc].tolist()):
        nkb, nvb = (2, 2) if i >= first_low else (kb, vb)
        codes = ref.read_region(arena, lay, o, lay.n_window, kb, vb, lay.n_window)
        kq, ks = ref.ers_to(codes[0], codes[1], kb, nkb)
        vq, vs = ref.ers_to(codes[3], codes[4], vb, nvb)
        ref.write_region(arena, lay, off, lay.n_window, nkb, nvb, 0, (kq, ks, codes[2], vq, vs, codes[5]))
        table[i] = torch.tensor([off, nkb, nvb], dtype=torch.int32)
        off += lay.chunk_bytes(nkb, nvb)
