"""ONNX Runtime (CPU) decode tokens/s against the PyTorch eager PM-KVQ path, embedded SmolLM2-135M-Instruct.

Both runtimes decode the same greedy continuation of the same prompt with the same plan and thread count;
prefill is timed separately. Prints a table with the ratio to the eager path measured in this run.

    python benchmarks/bench_onnx_decode.py --onnx /tmp/smol_std   # an existing `pmkvq export` directory
    python benchmarks/bench_onnx_decode.py                         # exports (standard flavor) first
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from pmkvq_compile import Plan, ProgressiveKVCache, use_pmkvq_attention
from pmkvq_compile.export import OrtGenerator, to_onnx
from pmkvq_compile.models import cache_kwarg, load_embedded_model

PROMPT = "Explain step by step why the sum of two odd numbers is always even."


def eager_decode(model, plan, ids: torch.Tensor, n: int) -> tuple[float, float, list[int]]:
    cache = ProgressiveKVCache(plan, model.config, batch_size=1)
    kw = {cache_kwarg(model): cache}
    with torch.no_grad(), use_pmkvq_attention(model):
        t0 = time.perf_counter()
        logits = model(ids, **kw).logits[:, -1]
        t1 = time.perf_counter()
        toks = [int(logits.argmax(-1))]
        for _ in range(n - 1):
            logits = model(torch.tensor([[toks[-1]]]), **kw).logits[:, -1]
            toks.append(int(logits.argmax(-1)))
        t2 = time.perf_counter()
    return t1 - t0, (n - 1) / (t2 - t1), toks


def ort_decode(gen: OrtGenerator, ids: np.ndarray, n: int) -> tuple[float, float, list[int]]:
    gen.reset(1)
    t0 = time.perf_counter()
    logits = gen.step(ids)[:, -1]
    t1 = time.perf_counter()
    toks = [int(logits.argmax(-1)[0])]
    for _ in range(n - 1):
        toks.append(int(gen.step(np.array([[toks[-1]]]))[:, -1].argmax(-1)[0]))
    t2 = time.perf_counter()
    return t1 - t0, (n - 1) / (t2 - t1), toks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", default=None, help="existing export dir (standard flavor, n_window 16)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_embedded_model()
    msgs = [{"role": "user", "content": PROMPT}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    total = ids.shape[1] + args.tokens
    out = args.onnx
    if out is None:
        out = tempfile.mkdtemp(prefix="pmkvq-bench-") + "/onnx"
        to_onnx(model, Plan.uniform(model.config, 16, total, n_window=16), out, tokenizer=tok)
    gen = OrtGenerator(out, threads=args.threads)
    plan = Plan.uniform(model.config, args.bits, total, n_window=gen.plan.n_window)
    gen = OrtGenerator(out, plan=plan, threads=args.threads)
    ort_decode(gen, ids.numpy(), 4)  # warm-up
    e_pre, e_tps, e_toks = eager_decode(model, plan, ids, args.tokens)
    o_pre, o_tps, o_toks = ort_decode(gen, ids.numpy(), args.tokens)
    same = int(np.cumprod(np.array(e_toks) == np.array(o_toks)).sum())
    print(
        f"SmolLM2-135M fp32, {args.bits}-bit plan (window {plan.n_window}), prompt {ids.shape[1]} tokens, "
        f"{args.tokens} decoded, {args.threads} threads, body bits at the end {gen.body_bits(0)}"
    )
    print(f"{'path':<34} {'prefill s':>10} {'decode tok/s':>13} {'ratio':>7}")
    print(f"{'PyTorch eager (pmkvq attention)':<34} {e_pre:>10.3f} {e_tps:>13.1f} {1.0:>7.2f}")
    print(f"{'ORT CPU, standard flavor':<34} {o_pre:>10.3f} {o_tps:>13.1f} {o_tps / e_tps:>7.2f}")
    print(f"identical greedy prefix: {same}/{args.tokens} tokens")


if __name__ == "__main__":
    main()
