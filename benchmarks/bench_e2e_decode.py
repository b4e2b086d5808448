"""End-to-end decode: ``pmkvq_compile.compile(model, plan)`` vs bf16 ``StaticCache`` + SDPA, both compiled.

Qwen2-7B geometry with random weights (28 layers, 28 query heads, 4 KV heads, head_dim 128), bf16, on a GPU.
Prints one table: decode tokens/s of each (median step time over ``--steps`` steps after warm-up), the ratio,
and the KV memory each allocated (``torch.cuda.memory_allocated`` around the cache's creation) against the plan's
budget. Both decode steps are compiled with ``fullgraph=True`` and ``--mode`` (default ``reduce-overhead``: CUDA
graphs). Prefill runs eagerly for both.

    python benchmarks/bench_e2e_decode.py --batch 8 --prompt 32768 --steps 32 --bits 4
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch


def _qwen2_7b(layers: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072, rope_theta=1e6,
        use_sliding_window=False, sliding_window=None, tie_word_embeddings=False,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = Qwen2ForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def _time_steps(step, first, n: int) -> tuple[float, torch.Tensor]:
    tok = first
    for _ in range(3):  # warm-up: compile, CUDA-graph record
        tok = step(tok)
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tok = step(tok)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), tok


def bench_static(model, ids, steps: int, mode: str) -> dict:
    from transformers import StaticCache

    from pmkvq_compile.models import cache_kwarg

    b, t = ids.shape
    key = cache_kwarg(model)
    before = torch.cuda.memory_allocated()
    cache = StaticCache(config=model.config, max_cache_len=t + steps + 8)
    with torch.no_grad():
        logits = model(ids, **{key: cache}, use_cache=True, logits_to_keep=1).logits[:, -1]
    torch.cuda.synchronize()
    kv = sum(lay.keys.numel() * lay.keys.element_size() * 2 for lay in cache.layers)
    del before
    pos = [t]

    def fwd(tok, p):
        return model(tok, **{key: cache}, position_ids=p, use_cache=True, logits_to_keep=1).logits[:, -1]

    cfwd = torch.compile(fwd, fullgraph=True, dynamic=False, mode=mode)

    def step(tok):
        p = torch.full((b, 1), pos[0], device="cuda", dtype=torch.long)
        with torch.no_grad():
            out = cfwd(tok, p)
        pos[0] += 1
        return out.argmax(-1, keepdim=True)

    med, _ = _time_steps(step, logits.argmax(-1, keepdim=True), steps)
    return {"step_ms": med * 1e3, "tok_s": b / med, "kv_bytes": kv}


def bench_pmkvq(model, ids, steps: int, mode: str, bits: int) -> dict:
    import pmkvq_compile as pk

    b, t = ids.shape
    plan = pk.Plan.uniform(model.config, bits, t + steps + 8)
    cm = pk.compile(model, plan, batch_size=b, mode=mode)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    cache = cm.new_cache()
    kv_alloc = torch.cuda.memory_allocated() - before
    del cache
    logits = cm.prefill(ids)
    torch.cuda.synchronize()

    def step(tok):
        return cm.decode(tok).argmax(-1, keepdim=True)

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    med, _ = _time_steps(step, logits.argmax(-1, keepdim=True), steps)
    growth = torch.cuda.memory_allocated() - base
    return {
        "step_ms": med * 1e3, "tok_s": b / med, "kv_bytes": kv_alloc, "budget_bytes": b * plan.total_budget_bytes,
        "body_bits_layer0": list(cm.cache.body_bits(0)), "memory_growth_during_decode": growth,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--mode", default="reduce-overhead")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    model = _qwen2_7b(args.layers)
    ids = torch.randint(0, 150000, (args.batch, args.prompt), device="cuda")
    res = {"device": torch.cuda.get_device_name(), "args": vars(args)}
    res["static_bf16"] = bench_static(model, ids, args.steps, args.mode)
    gc.collect()
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    res["pmkvq"] = bench_pmkvq(model, ids, args.steps, args.mode, args.bits)
    s, p = res["static_bf16"], res["pmkvq"]
    res["speedup"] = p["tok_s"] / s["tok_s"]
    print(
        f"device {res['device']}; batch {args.batch}, prompt {args.prompt}, {args.layers} layers, mode {args.mode}"
    )
    print(f"{'':22} {'step ms':>9} {'tok/s':>9} {'KV MiB':>10}")
    print(f"{'bf16 StaticCache+SDPA':22} {s['step_ms']:9.2f} {s['tok_s']:9.1f} {s['kv_bytes'] / 2**20:10.1f}")
    print(
        f"{'pmkvq ' + str(args.bits) + '-bit plan':22} {p['step_ms']:9.2f} {p['tok_s']:9.1f} {p['kv_bytes'] / 2**20:10.1f}"
    )
    print(f"decode speedup {res['speedup']:.2f}x; pmkvq KV allocated / budget = {p['kv_bytes'] / p['budget_bytes']:.4f}; "
          f"memory growth during decode {p['memory_growth_during_decode']} bytes")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
