"""``pmkvq demo``: the embedded SmolLM2-135M-Instruct, unquantized vs a 4-bit-budget PM-KVQ plan."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

DEFAULT_PROMPT = (
    "A train leaves at 3 pm travelling at 60 km/h and a second train leaves the same station at 4 pm at "
    "90 km/h on the same track. When does the second train catch up? Think step by step."
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="generate with the embedded SmolLM2, unquantized and with a 4-bit-budget plan"
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument(
        "--bits", type=int, default=4, choices=(16, 8, 4, 2), help="budget bits at the full length"
    )
    p.add_argument("--window", type=int, default=32, help="recent-window tokens kept at 16 bits (paper: 128)")
    p.add_argument("--plan", default=None, help="use this saved plan instead of a uniform one")
    p.set_defaults(run=run)


class _Progress:
    """A StoppingCriteria that only advances a progress bar, one tick per generated token."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generate(model: Any, ids: torch.Tensor, n: int, desc: str, **kw: Any) -> tuple[torch.Tensor, float]:
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    with tqdm(total=n, desc=desc, unit="tok", leave=False) as bar:
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([_Progress(bar)]),
            **kw,
        )
        dt = time.perf_counter() - t0
    return out[0, ids.shape[1] :], dt


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from ..attention import use_pmkvq_attention
    from ..cache import ProgressiveKVCache
    from ..models import cache_kwarg, load_embedded_model
    from ..plan import Plan

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    torch.manual_seed(0)
    with tqdm(total=1, desc="loading SmolLM2-135M-Instruct (embedded)", leave=False) as bar:
        model, tok = load_embedded_model()
        bar.update(1)
    msgs = [{"role": "user", "content": args.prompt}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    total = ids.shape[1] + args.max_new_tokens
    if args.plan:
        plan = Plan.load(args.plan, model.config)
    else:
        plan = Plan.uniform(model.config, args.bits, total, n_window=args.window)
    key = cache_kwarg(model)
    ref_cache = DynamicCache(config=model.config)
    ref, t_ref = _generate(model, ids, args.max_new_tokens, "unquantized", **{key: ref_cache})
    ref_bytes = sum(lay.keys.numel() * lay.keys.element_size() * 2 for lay in ref_cache.layers)
    cache = ProgressiveKVCache(plan, model.config, batch_size=1, dtype=torch.float32)
    with use_pmkvq_attention(model):
        got, t_q = _generate(model, ids, args.max_new_tokens, "pm-kvq", **{key: cache})
    same = int((ref == got).cumprod(0).sum())
    n = args.max_new_tokens
    bits = sorted({cache.body_bits(i) for i in range(len(cache.layers))})
    print(f"prompt ({ids.shape[1]} tokens): {args.prompt}\n")
    print(f"--- unquantized (fp32 DynamicCache) --- {n / t_ref:.1f} tok/s, KV {ref_bytes / 2**20:.2f} MiB")
    print(tok.decode(ref, skip_special_tokens=True).strip(), "\n")
    print(
        f"--- PM-KVQ, {args.bits}-bit budget at {total} tokens, window {plan.n_window} --- {n / t_q:.1f} tok/s, "
        f"KV {cache.nbytes() / 2**20:.2f} MiB used of {plan.total_budget_bytes / 2**20:.2f} MiB budget, "
        f"body bits (K, V) now {bits}"
    )
    print(tok.decode(got, skip_special_tokens=True).strip(), "\n")
    print(f"identical greedy prefix: {same}/{n} tokens")
    return 0
