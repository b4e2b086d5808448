"""Triton decode attention against the reference: dtypes, GQA, splits, per-row lengths, a mixed body."""

from __future__ import annotations

import pytest
import torch

from pmkvq_compile.kernels import decode_attention as kernel
from pmkvq_compile.kernels import reference as ref

from .helpers import DEVICE, empty_cache, filled_cache, make_mixed, small_layout

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _step_inputs(lay, batch: int, dtype: torch.dtype, g: torch.Generator):
    """A decode step's q ``[B, 3 Hkv, D]`` and new K/V ``[B, Hkv, 1, D]``, drawn from ``g`` in that order."""
    q = torch.randn(batch, 3 * lay.num_kv_heads, lay.head_dim, generator=g).to(DEVICE, dtype)
    kn = torch.randn(batch, lay.num_kv_heads, 1, lay.head_dim, generator=g).to(DEVICE, dtype)
    vn = torch.randn(batch, lay.num_kv_heads, 1, lay.head_dim, generator=g).to(DEVICE, dtype)
    return q, kn, vn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "mixed,splits,with_scale,group", [(False, 3, True, 32), (True, 1, False, 64), (True, 0, False, 32)]
)
def test_decode_matches_reference(dtype, mixed, splits, with_scale, group) -> None:
    lay = small_layout(bits=4, value_bits=4, max_len=60, group=group)
    g = torch.Generator().manual_seed(5)
    ks = (
        (torch.rand(lay.num_kv_heads, lay.head_dim // 2, generator=g) + 0.5).to(DEVICE)
        if with_scale
        else None
    )
    arena, state, table = filled_cache(lay, 3, [17, 12, 12, 6], key_scale=ks)  # 47 tokens
    if mixed:
        make_mixed(lay, arena, state, table, first_low=int(state[2]) // 2)
        bits = {tuple(r[1:]) for r in table[: int(state[2])].tolist()}
        assert len(bits) == 2
    n = int(state[0])
    lengths = torch.tensor([n, n - 9, 1], dtype=torch.int32, device=DEVICE)
    q, kn, vn = _step_inputs(lay, 3, dtype, g)
    args = (q, kn, vn, arena, state, table, lengths, ks, lay.to_list(), 0.125)
    want = ref.decode_attention(*args, splits)
    got = kernel.decode_attention(*args, splits)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_decode_rejects_bad_lengths() -> None:
    lay = small_layout()
    arena, state, table = filled_cache(lay, 1, [3])
    q = torch.randn(1, 6, lay.head_dim, device=DEVICE)
    kn = torch.randn(1, 2, 1, lay.head_dim, device=DEVICE)
    with pytest.raises(ValueError, match="lengths"):
        kernel.decode_attention(
            q, kn, kn, arena, state, table, torch.tensor([3], device=DEVICE), None, lay.to_list(), 0.1, 1
        )


@pytest.mark.parametrize(
    "bits,value_bits,max_len,dtype,pairs,splits",
    [
        (8, 8, 60, torch.float16, None, 4),
        (4, 2, 60, torch.bfloat16, None, 1),
        (8, 4, 50, torch.float16, None, 3),
        (2, 2, 60, torch.float32, None, 4),
        (8, 8, 120, torch.float16, None, 2),
        (4, 4, 60, torch.float16, [], 4),
        (8, 4, 50, torch.float32, [], 1),
        (16, 16, 400, torch.float16, None, 3),
        (2, 4, 60, torch.bfloat16, [(2, 4), (4, 4)], 2),
    ],
)
def test_decode_one_group_per_head(bits, value_bits, max_len, dtype, pairs, splits) -> None:
    """group == head_dim: the body launches per bit pair (affine, <= 8 bits) beside the edge kernel (sink,
    window, 16-bit chunks), and the edge kernel alone (``pairs=[]``), with rows that end inside the body,
    in the sink, and with no past at all."""
    lay = small_layout(bits=bits, value_bits=value_bits, max_len=max_len, group=64)
    arena, state, table = filled_cache(lay, 4, [17, 12, 12, 6], seed=3)
    nc = int(state[2])
    body = {tuple(r[1:]) for r in table[:nc].tolist()}
    n = int(state[0])
    lengths = torch.tensor([n, n - 17, 1, 0], dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(7)
    q, kn, vn = _step_inputs(lay, 4, dtype, g)
    args = (q, kn, vn, arena, state, table, lengths, None, lay.to_list(), 0.125)
    want = ref.decode_attention(*args, splits)
    got = kernel.decode_attention(*args, splits, pairs=pairs)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    if pairs is None:  # every <= 8-bit chunk went through a body launch, 16-bit ones through the edge kernel
        assert {p for p in body if max(p) <= 8} <= set(kernel.fast_pairs(lay)), body
    assert body, "the cache should hold body chunks"


@pytest.mark.skipif(DEVICE != "cpu", reason="the GPU runs float16 tiles in every test above")
@pytest.mark.parametrize(
    "bits,value_bits,max_len", [(8, 8, 50), (4, 2, 60), (2, 4, 60), (8, 4, 50), (8, 4, 40)]
)
def test_decode_float16_tiles_in_the_interpreter(bits, value_bits, max_len, monkeypatch) -> None:
    """The GPU's float16 code path (codes as ``0x6400 | c`` halves, the 1024 offset folded into the zero
    points) under the interpreter, against the reference; the default CPU path computes in float32."""
    monkeypatch.setenv("PMKVQ_INTERPRET_NATIVE_DT", "1")
    lay = small_layout(bits=bits, value_bits=value_bits, max_len=max_len, group=64)
    arena, state, table = filled_cache(lay, 2, [17, 12, 12, 6], seed=5)
    assert any(max(r[1:]) <= 8 for r in table[: int(state[2])].tolist()), "no body chunk for the pairs"
    n = int(state[0])
    lengths = torch.tensor([n, n - 9], dtype=torch.int32, device=DEVICE)  # one row ends in the body
    g = torch.Generator().manual_seed(11)
    q, kn, vn = _step_inputs(lay, 2, torch.float16, g)
    args = (q, kn, vn, arena, state, table, lengths, None, lay.to_list(), 0.125)
    want = ref.decode_attention(*args, 2)
    got = kernel.decode_attention(*args, 2)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.skipif(DEVICE != "cpu", reason="the GPU takes this path in every float32 test above")
@pytest.mark.parametrize("bits,value_bits,d", [(8, 8, 64), (4, 2, 64), (2, 4, 64), (2, 2, 128), (4, 4, 128)])
def test_decode_float32_queries_on_float16_tiles(bits, value_bits, d, monkeypatch) -> None:
    """Float32 queries on the GPU's float16 tiles: each product taken with a float16 high part and the
    scaled rest, the codes without their +1024. Within the float32 tolerance of the reference, where
    queries rounded to float16 (the high part alone) are 10x outside it."""
    monkeypatch.setenv("PMKVQ_INTERPRET_NATIVE_DT", "1")
    lay = small_layout(hkv=1 if d == 128 else 2, d=d, group=d, bits=bits, value_bits=value_bits, max_len=50)
    arena, state, table = filled_cache(lay, 2, [17, 12, 12, 6], seed=5)
    assert any(max(r[1:]) <= 8 for r in table[: int(state[2])].tolist()), "no body chunk for the pairs"
    n = int(state[0])
    lengths = torch.tensor([n, n - 9], dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(11)
    q, kn, vn = _step_inputs(lay, 2, torch.float32, g)
    q = q * 3
    args = (q, kn, vn, arena, state, table, lengths, None, lay.to_list(), d**-0.5)
    want = ref.decode_attention(*args, 2)
    got = kernel.decode_attention(*args, 2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=TOL[torch.float32], rtol=TOL[torch.float32])
    half = ref.decode_attention(q.half().float(), *args[1:], 2)
    assert (half - want).abs().max().item() > 10 * TOL[torch.float32]


@pytest.mark.parametrize("case", ["float16-exact", "inf-head"])
def test_decode_float32_queries_on_float16_tiles_edge_values(case, monkeypatch) -> None:
    """The split products' scales per query head: queries whose scaled values are exact in float16 (the rest
    is 0, whose scale must not blow up the high part's scores: NaN before the floor), and one head of a GQA
    group with an infinite element (the group's other heads keep their results)."""
    monkeypatch.setenv("PMKVQ_INTERPRET_NATIVE_DT", "1")
    lay = small_layout(hkv=2, d=64, group=64, bits=8, value_bits=8, max_len=50)
    arena, state, table = filled_cache(lay, 2, [17, 12, 12, 6], seed=5)
    n = int(state[0])
    lengths = torch.tensor([n, n - 9], dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(11)
    q, kn, vn = _step_inputs(lay, 2, torch.float32, g)
    sm_scale = 0.125
    if case == "float16-exact":
        q = (q * 16).half().float()
        sm_scale = 1 / kernel.LOG2E  # the kernel's q * sm_scale * log2(e) stays exact
    else:
        q[0, 0, 0] = float("inf")
    args = (q, kn, vn, arena, state, table, lengths, None, lay.to_list(), sm_scale)
    want = ref.decode_attention(*args, 2)
    got = kernel.decode_attention(*args, 2)
    keep = torch.ones(q.shape[:2], dtype=torch.bool, device=got.device)
    if case == "inf-head":
        keep[0, 0] = False
        assert keep[0, 1:3].all()  # heads 1 and 2 share KV head 0 with head 0
    torch.testing.assert_close(got[keep], want[keep], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("native", [False, True] if DEVICE == "cpu" else [False])
@pytest.mark.parametrize("bits,value_bits", [(4, 4), (4, 2), (2, 2), (8, 8)])
def test_decode_head_dim_128(bits, value_bits, native, monkeypatch) -> None:
    """Head dim 128 (the benchmark's geometry): the value codes' row order (_vperm_dims) differs from head
    dim 64's in where the code bits sit; both the float32 and the GPU's float16 path against the reference."""
    if native:
        monkeypatch.setenv("PMKVQ_INTERPRET_NATIVE_DT", "1")
    lay = small_layout(hkv=1, d=128, group=128, bits=bits, value_bits=value_bits, max_len=40)
    arena, state, table = filled_cache(lay, 2, [17, 12, 12], seed=13)
    assert any(max(r[1:]) <= 8 for r in table[: int(state[2])].tolist()), "no body chunk for the pairs"
    n = int(state[0])
    lengths = torch.tensor([n, n - 7], dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(17)
    q, kn, vn = _step_inputs(lay, 2, torch.float16, g)
    args = (q, kn, vn, arena, state, table, lengths, None, lay.to_list(), 128**-0.5)
    want = ref.decode_attention(*args, 2)
    got = kernel.decode_attention(*args, 2)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)


def _two_rows_4_2(seed: int, cut: int, q_seed: int) -> tuple:
    """decode_attention's arguments (3 splits) for two rows of a 4/2-bit cache, the second ``cut`` tokens
    shorter, with float32 queries."""
    lay = small_layout(bits=4, value_bits=2, max_len=60, group=64)
    arena, state, table = filled_cache(lay, 2, [17, 12, 12, 6], seed=seed)
    n = int(state[0])
    lengths = torch.tensor([n, n - cut], dtype=torch.int32, device=DEVICE)
    q, kn, vn = _step_inputs(lay, 2, torch.float32, torch.Generator().manual_seed(q_seed))
    return (q, kn, vn, arena, state, table, lengths, None, lay.to_list(), 0.125, 3)


def test_decode_edge_programs_first_or_last(monkeypatch) -> None:
    """The launch order of the edge programs (``PMKVQ_DECODE_CFG``'s fifth knob) changes which program takes
    which partial, not the partials: both orders give the same bits, and match the reference."""
    args = _two_rows_4_2(seed=19, cut=11, q_seed=23)
    outs = []
    for first in (1, 0):
        monkeypatch.setenv("PMKVQ_DECODE_CFG", f"64,4,3,0,{first}")
        outs.append(kernel.decode_attention(*args))
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], ref.decode_attention(*args), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("cfg", ["64,4,0", "64,4,0,0"])
def test_decode_cfg_stages_zero_keeps_each_loops_depth(cfg, monkeypatch) -> None:
    """``PMKVQ_DECODE_CFG`` with 0 stages sets the other knobs and keeps each body loop's own pipeline depth
    (3 at 2-bit pairs, else 2) and 3 for the launch: the same result as the reference."""
    args = _two_rows_4_2(seed=29, cut=9, q_seed=31)
    monkeypatch.setenv("PMKVQ_DECODE_CFG", cfg)
    torch.testing.assert_close(
        kernel.decode_attention(*args), ref.decode_attention(*args), atol=2e-5, rtol=2e-5
    )


def test_decode_refuses_small_tiles(monkeypatch) -> None:
    """``PMKVQ_DECODE_CFG`` with a tile below 64 tokens is refused by name, before anything is launched."""
    monkeypatch.setenv("PMKVQ_DECODE_CFG", "32,4,3")
    lay = small_layout(group=64)
    arena, state, table = filled_cache(lay, 1, [9], seed=1)
    before = arena.clone()
    q = torch.zeros(1, 3 * lay.num_kv_heads, lay.head_dim, device=DEVICE)
    kn = torch.zeros(1, lay.num_kv_heads, 1, lay.head_dim, device=DEVICE)
    lengths = torch.tensor([int(state[0])], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two >= 64, got 32"):
        kernel.decode_attention(q, kn, kn, arena, state, table, lengths, None, lay.to_list(), 0.125, 1)
    assert torch.equal(arena, before)


@pytest.mark.parametrize("native", [False, True] if DEVICE == "cpu" else [False])
def test_decode_whole_tiles_ignore_bytes_past_a_rows_length(native, monkeypatch) -> None:
    """With whole tiles per region (a 64-token window gives 64-token tiles) the body's loads are unmasked:
    the tokens of a chunk past a row's length are read but must not count, whatever their bytes. Here they
    are random codes and NaN scales, and the result matches the reference on the clean arena."""
    if native:
        monkeypatch.setenv("PMKVQ_INTERPRET_NATIVE_DT", "1")
    lay = small_layout(hkv=1, d=64, group=64, n_window=64, bits=4, value_bits=4, max_len=200)
    arena, state, table = filled_cache(lay, 2, [150, 20], seed=29)
    nc = int(state[2])
    rows = table[:nc].tolist()
    assert nc >= 2 and all(max(r[1:]) <= 8 for r in rows), rows  # every chunk takes the unmasked body loop
    n = int(state[0])
    short = lay.n_sink + lay.n_window + 10  # row 1 ends 10 tokens into chunk 1
    lengths = torch.tensor([n, short], dtype=torch.int32, device=DEVICE)
    q, kn, vn = _step_inputs(lay, 2, torch.float16, torch.Generator().manual_seed(31))
    args = (q, kn, vn, arena, state, table, lengths, None, lay.to_list(), 0.125)
    want = ref.decode_attention(*args, 2)
    g = torch.Generator().manual_seed(37)
    cap = lay.n_window
    for c, (o, kb, vb) in enumerate(rows):
        past = max(0, short - (lay.n_sink + c * cap))  # row 1's tokens in chunk c end here
        if past >= cap:
            continue
        k0, v0, m0, _ = lay.region_parts(o, cap, kb, vb)
        for lo, hi in ((k0 + past * lay.head_dim * kb // 8, v0), (v0 + past * lay.head_dim * vb // 8, m0)):
            arena[1, lo:hi] = torch.randint(0, 256, (hi - lo,), generator=g, dtype=torch.uint8).to(DEVICE)
        meta = arena[1].view(torch.float32)[m0 // 4 : m0 // 4 + 4 * cap].view(4, cap)
        meta[:, past:] = float("nan")
    got = kernel.decode_attention(*args, 2)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("edge", [1, 2])
def test_decode_edge_program_count(edge, monkeypatch) -> None:
    """``PMKVQ_DECODE_EDGE`` (a sweep knob) sets how many programs per (row, KV head) take the sink, the
    window slices and the chunks no pair takes; any count gives the reference's result, and counts outside
    1..num_splits are refused by name."""
    args = _two_rows_4_2(seed=41, cut=13, q_seed=43)
    monkeypatch.setenv("PMKVQ_DECODE_EDGE", str(edge))
    torch.testing.assert_close(
        kernel.decode_attention(*args), ref.decode_attention(*args), atol=2e-5, rtol=2e-5
    )
    monkeypatch.setenv("PMKVQ_DECODE_EDGE", "4")
    with pytest.raises(ValueError, match=r"PMKVQ_DECODE_EDGE must be in 1\.\.num_splits=3, got 4"):
        kernel.decode_attention(*args)


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_interleaved_table(splits) -> None:
    """A hand-made table whose chunks alternate bit pairs (the cache writes each pair's chunks back to back)
    goes chunk by chunk, several chunks into one accumulator, and still gives the reference's result."""
    lay = small_layout(bits=4, value_bits=4, max_len=60, group=64)
    arena, state, table = filled_cache(lay, 2, [17, 12], seed=61)
    nc = int(state[2])
    make_mixed(lay, arena, state, table, first_low=nc // 2)
    half = nc // 2
    perm = [i for pair in zip(range(half), range(half, 2 * half)) for i in pair] + list(range(2 * half, nc))
    table[:nc] = table[:nc][perm].clone()
    assert len({tuple(r) for r in table[:2, 1:].tolist()}) == 2  # the first two chunks: different pairs
    n = int(state[0])
    lengths = torch.tensor([n, n - 7], dtype=torch.int32, device=DEVICE)
    q, kn, vn = _step_inputs(lay, 2, torch.float32, torch.Generator().manual_seed(63))
    args = (q, kn, vn, arena, state, table, lengths, None, lay.to_list(), 0.125, splits)
    torch.testing.assert_close(
        kernel.decode_attention(*args), ref.decode_attention(*args), atol=2e-5, rtol=2e-5
    )


@pytest.mark.parametrize("cfg", ["16,1", "64,2"])
def test_decode_merge_cfg(cfg, monkeypatch) -> None:
    """``PMKVQ_MERGE_CFG`` (a sweep knob: output dims per merge program and its warps) changes how the merge
    is cut, not its result; a malformed value is refused by name before anything runs."""
    args = _two_rows_4_2(seed=81, cut=3, q_seed=83)
    monkeypatch.setenv("PMKVQ_MERGE_CFG", cfg)
    torch.testing.assert_close(
        kernel.decode_attention(*args), ref.decode_attention(*args), atol=2e-5, rtol=2e-5
    )
    monkeypatch.setenv("PMKVQ_MERGE_CFG", "48,4")
    with pytest.raises(ValueError, match=r"PMKVQ_MERGE_CFG must be .* got '48,4'"):
        kernel.decode_attention(*args)


@pytest.mark.parametrize("native", [False, True] if DEVICE == "cpu" else [False])
@pytest.mark.parametrize(
    "kw,mixed",
    [
        (dict(group=32, bits=4, value_bits=4), True),  # two groups per head: every chunk in the edge part
        (dict(group=64, bits=4, value_bits=2), False),  # body pairs (the tile loop), 16-bit sink and window
        (dict(hkv=1, d=128, group=128, n_window=6, bits=2, value_bits=2, max_len=50), True),
    ],
)
def test_decode_float16_scales(kw, mixed, native, monkeypatch) -> None:
    """A plan with ``scale_dtype="float16"``: body chunks at <= 8 bits keep float16 scales and zeros (the
    16-bit sink and window float32); both read paths against the reference, whose dequantization reads the
    same stored values, and the stored bytes are fewer than with float32 scales."""
    if native:
        monkeypatch.setenv("PMKVQ_INTERPRET_NATIVE_DT", "1")
    kw = dict(kw)
    kw.setdefault("max_len", 60)
    lay = small_layout(scale_dtype="float16", **kw)
    assert lay.chunk_bytes(4, 4) < small_layout(**kw).chunk_bytes(4, 4)
    arena, state, table = filled_cache(lay, 2, [17, 12, 12, 6], seed=19)
    if mixed:
        make_mixed(lay, arena, state, table, first_low=int(state[2]) // 2)
    rows = table[: int(state[2])].tolist()
    assert rows and all(lay.meta_bytes(kb, vb) == 2 for _, kb, vb in rows)
    n = int(state[0])
    lengths = torch.tensor([n, n - 9], dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(23)
    q, kn, vn = _step_inputs(lay, 2, torch.float16, g)
    args = (q, kn, vn, arena, state, table, lengths, None, lay.to_list(), lay.head_dim**-0.5)
    want = ref.decode_attention(*args, 2)
    got = kernel.decode_attention(*args, 2)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")  # the interpreter's
@pytest.mark.parametrize(
    "dtype,boost,value_bits,scale_dtype",
    [
        (torch.float32, 24.0, 4, "float32"),
        (torch.float32, 9.0, 4, "float32"),
        (torch.float16, 4.0, 4, "float32"),
        (torch.float16, 4.0, 2, "float16"),  # p meets the float16 value scale in a half multiply
    ],
)
@pytest.mark.parametrize("splits", [1, 2])
def test_decode_score_far_above_the_first_tile(
    dtype, boost, value_bits, scale_dtype, splits, monkeypatch
) -> None:
    """The body loop softmaxes against the max of its span's first tile and rescales nowhere else: a later
    token whose score is far above it overflows ``p`` (float32 tiles, float32 queries: 2^128) or ``p * s_v``
    (float16 tiles: 65504), and the span is taken again with the exact running max. Here one body token's
    key is ``boost`` times the shared query of its head, a score about ``11.5 boost`` (log2 units) above the
    others; float16 queries run float16 tiles (under the interpreter too, here)."""
    monkeypatch.setenv("PMKVQ_INTERPRET_NATIVE_DT", "1")
    lay = small_layout(bits=4, value_bits=value_bits, max_len=60, group=64, scale_dtype=scale_dtype)
    g = torch.Generator().manual_seed(71)
    b, hkv, d = 2, lay.num_kv_heads, lay.head_dim
    u = torch.randn(b, hkv, d, generator=g)
    q = u.repeat_interleave(3, dim=1).to(DEVICE, dtype)  # the three query heads of a KV head share it
    k = torch.randn(b, hkv, 40, d, generator=g)
    v = torch.randn(b, hkv, 40, d, generator=g)
    far = lay.n_sink + 3 * lay.n_window + 2  # in the fourth body chunk (chunks hold n_window tokens)
    k[:, :, far] = boost * u
    arena, state, table = empty_cache(lay, b)
    ref.append(arena, state, table, k.to(DEVICE), v.to(DEVICE), None, lay.to_list())
    nc = int(state[2])
    assert nc > 4 and all(max(r[1:]) <= 8 for r in table[:nc].tolist()), table[:nc].tolist()
    n = int(state[0])
    lengths = torch.tensor([n, n - 3], dtype=torch.int32, device=DEVICE)
    kn = torch.randn(b, hkv, 1, d, generator=g).to(DEVICE)
    vn = torch.randn(b, hkv, 1, d, generator=g).to(DEVICE)
    args = (q, kn, vn, arena, state, table, lengths, None, lay.to_list(), 0.125)
    want = ref.decode_attention(*args, splits)
    dominated = (want - v[:, :, far].to(DEVICE).repeat_interleave(3, dim=1)).abs().max()
    assert dominated < (0.3 if value_bits == 4 else 1.2)  # the far token's value, up to its quantization
    got = kernel.decode_attention(*args, splits)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_nan_query_terminates(dtype, monkeypatch) -> None:
    """A non-finite query makes every pass of a span non-finite, the exact one too: it is taken once more at
    most (NaN out for that head, as before the reference max), never again and again."""
    monkeypatch.setenv("PMKVQ_INTERPRET_NATIVE_DT", "1")
    lay = small_layout(bits=4, value_bits=4, max_len=60, group=64)
    arena, state, table = filled_cache(lay, 1, [40])
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 3 * lay.num_kv_heads, lay.head_dim, generator=g)
    q[0, 0, 0] = float("nan")
    kn = torch.randn(1, lay.num_kv_heads, 1, lay.head_dim, generator=g).to(DEVICE)
    lengths = torch.tensor([int(state[0])], dtype=torch.int32, device=DEVICE)
    args = (q.to(DEVICE, dtype), kn, kn.clone(), arena, state, table, lengths, None, lay.to_list(), 0.125)
    got = kernel.decode_attention(*args, 1)
    assert torch.isnan(got[0, 0]).all() and torch.isfinite(got[0, 1:]).all()
