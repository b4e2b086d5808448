"""Instructions per tile of the decode kernel's body loop, from an offline compile (no GPU needed).

Compiles ``_attn_kernel`` for sm_90a at the benchmark's geometry by default (Hq=28, Hkv=4, D=128, 1 sink
token, a 128-token window) with the given bit pairs and launch knobs, assembles it with Triton's bundled ``ptxas``,
disassembles it with ``cuobjdump`` and prints, for the innermost loop that holds the tile's mma
instructions, its length (instructions per warp and tile) and an opcode histogram, plus registers and
spills. RESULTS.md's per-tile counts come from this program run with triton 3.6 (the GPU's version), e.g.::

    pip install --target /tmp/t36 --no-deps triton==3.6.0
    PYTHONPATH=/tmp/t36 python benchmarks/sass_tile_count.py --pairs 4,4 --maxnreg 168
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pmkvq_compile.kernels import decode_attention as dk


def compile_attn(
    pairs,
    block_n,
    warps,
    stages,
    maxnreg,
    block_m,
    d=128,
    hq=28,
    hkv=4,
    half_scales=False,
    q32=False,
    ct32=False,
):
    code = sum(
        ((kb.bit_length() - 2) * 4 + vb.bit_length() - 2) << (4 * k) for k, (kb, vb) in enumerate(pairs)
    )
    sig = {"q_ptr": "*fp32" if q32 else "*fp16", "a8": "*u8", "a16": "*i16", "a32": "*i32", "af": "*fp32", "ah": "*fp16", "table": "*i32",
           "state": "*i32", "lengths": "*i32", "ks_ptr": "*fp16", "part_acc": "*fp32", "part_ml": "*fp32",
           "ROW_BYTES": "i32", "qk_scale": "fp32"}  # fmt: skip
    const = dict(
        HQ=hq, HKV=hkv, D=d, GS=d, G=1, N_SINK=1, NW=128, SB=16, WB=16, WIN_OFF=2112, NUM_SPLITS=12,
        EDGE_SPLITS=8, SLOTS=12 + 8, TB=512, MAXC=300, RUNB=64, WPER=16, PAIRS=code, NP=len(pairs),
        FAST_MASK=sum(dk._pair_bit(*p) for p in pairs), HAS_KS=False, BLOCK_M=block_m, BLOCK_N=block_n,
        EBLOCK_N=16, CT=tl.float32 if ct32 else tl.float16, DT=tl.float32 if q32 else tl.float16,
        PREC="ieee" if q32 else "tf32", ASM=True, EDGE_FIRST=False, BODY_STAGES=0,
        HM=half_scales,
    )  # fmt: skip
    const = {n: v for n, v in const.items() if n in dk._attn_kernel.arg_names}  # older revisions lack some
    sig = {n: v for n, v in sig.items() if n in dk._attn_kernel.arg_names}
    sig.update({n: "constexpr" for n in const})
    # the pointers and ROW_BYTES (older revisions have no float16 view "ah")
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(13 if "ah" in sig else 12)}
    opts = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    src = ASTSource(fn=dk._attn_kernel, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def tile_loop(sass: str) -> list[str]:
    """The backward-branch loop with the most mma instructions, the shortest of those (the body's tile loop:
    loops around it hold the same mma instructions and more); a backward jump whose range holds an exit is
    not a loop (ptxas may lay cold blocks out after the exit)."""
    lines = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    at = {a: i for i, (a, _) in enumerate(lines)}
    best: tuple[int, int, list[str]] | None = None
    for i, (a, ins) in enumerate(lines):
        m = re.search(r"BRA.*0x([0-9a-f]+)\s*$", ins)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in at:
            body = [x for _, x in lines[at[int(m.group(1), 16)] : i + 1]]
            if any("EXIT" in x for x in body):
                continue  # a jump back from code laid out after an exit, not a loop
            key = (sum("MMA" in x for x in body), -len(body))
            if best is None or key > best[:2]:
                best = (*key, body)
    if best is None or best[0] == 0:
        raise RuntimeError("no loop with mma instructions found")
    return best[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", default="4,4", help='bit pairs "kb,vb;kb,vb" the body programs take')
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--maxnreg", type=int, default=168, help="0: no cap")
    ap.add_argument("--block-m", type=int, default=8, help="query heads padded to this many columns")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--hq", type=int, default=28)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--half-scales", action="store_true", help="float16 scales and zeros (scale_dtype)")
    ap.add_argument(
        "--q-float32", action="store_true", help="float32 queries (float16 tiles, split products)"
    )
    ap.add_argument(
        "--ct-float32", action="store_true", help="float32 tiles (the launch before float32 queries split)"
    )
    ap.add_argument("--dump", help="write the tile loop's SASS to this file")
    a = ap.parse_args()
    pairs = [tuple(int(x) for x in p.split(",")) for p in a.pairs.split(";")]
    c = compile_attn(
        pairs, a.block_n, a.warps, a.stages, a.maxnreg, a.block_m, a.head_dim, a.hq, a.hkv, a.half_scales,
        a.q_float32, a.ct_float32,
    )  # fmt: skip
    nv = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(c.asm["ptx"])
        r = subprocess.run(
            [f"{nv}/ptxas", "-arch=sm_90a", "-v", ptx, "-o", cubin], capture_output=True, text=True
        )
        sass = subprocess.run([f"{nv}/cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
    body = tile_loop(sass)
    if a.dump:
        with open(a.dump, "w") as f:
            f.write("\n".join(body) + "\n")
    hist = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0] for ins in body)
    print(f"triton {triton.__version__}, pairs {pairs}, BLOCK_N {a.block_n}, warps {a.warps}, stages "
          f"{a.stages}, maxnreg {a.maxnreg}, BLOCK_M {a.block_m}")  # fmt: skip
    print(
        " ".join(re.findall(r"Used \d+ registers|\d+ bytes spill stores", r.stderr)),
        f"smem {c.metadata.shared}",
    )
    moves = sum(bool(re.match(r"(@!?U?P\w+\s+)?(IMAD\.MOV|MOV)\b", ins)) for ins in body)
    print(
        f"tile loop: {len(body)} instructions per warp ({moves} register moves); {dict(hist.most_common())}"
    )


if __name__ == "__main__":
    main()
