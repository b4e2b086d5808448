"""``pmkvq generate --onnx DIR``: generate with ONNX Runtime from an exported directory."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

DEFAULT_PROMPT = "What is 17 * 23? Think step by step."


def add_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate text with ONNX Runtime from a `pmkvq export` directory")
    p.add_argument("--onnx", required=True, metavar="DIR", help="directory written by `pmkvq export`")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="feed the prompt as is, without the chat template")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default DIR/tokenizer)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from ..export import OrtGenerator

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    gen = OrtGenerator(args.onnx)
    tdir = Path(args.tokenizer) if args.tokenizer else Path(args.onnx) / "tokenizer"
    if not tdir.is_dir():
        raise ValueError(f"no tokenizer at {str(tdir)!r}; pass --tokenizer DIR")
    tok = AutoTokenizer.from_pretrained(str(tdir))
    if args.no_chat or not getattr(tok, "chat_template", None):
        ids = tok(args.prompt, return_tensors="np")["input_ids"]
    else:
        msgs = [{"role": "user", "content": args.prompt}]
        ids = tok.apply_chat_template(
            msgs, add_generation_prompt=True, return_tensors="np", return_dict=True
        )["input_ids"]
    ids = np.asarray(ids, dtype=np.int64)
    t0 = time.perf_counter()
    with tqdm(total=args.max_new_tokens, desc=f"ORT {gen.flavor} ({gen.device})", unit="tok") as bar:
        out = gen.generate(
            ids,
            args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop_at_eos=True,
            on_token=lambda _: bar.update(1),
        )
    dt = time.perf_counter() - t0
    bits = sorted({gen.body_bits(i) for i in range(len(gen.layouts))})
    print(tok.decode(out[0], skip_special_tokens=True).strip())
    print(
        f"\n{out.shape[1]} tokens in {dt:.2f} s ({out.shape[1] / dt:.1f} tok/s, prompt {ids.shape[1]} tokens); "
        f"body bits (K, V) now {bits}"
    )
    return 0
