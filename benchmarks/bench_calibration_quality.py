"""Calibration quality on the embedded SmolLM2-135M (CPU): next-token KL against the unquantized model.

At the same byte budget (default: 3 and 2.5 bits average at max_len 2048, scales and zeros counted), a long
teacher-forced trace is scored through each cache and compared with the unquantized model's distributions:

* ``RTN``: plain per-token round-to-nearest of every past K/V at the budget's bits (3 -> K3/V3, 2.5 -> K3/V2;
  no 16-bit sink/window, so it uses fewer bytes than the budget: shown in the table);
* ``progressive, equal split``: the PM-KVQ cache, every layer the same bytes (no allocation);
* ``+ HiGHS, K=V bits``: the paper's integer program (one bit-width per layer for K and V), sensitivities
  profiled with positional interpolation (PI);
* ``+ HiGHS, separate K/V bits``: the same program with a (key bits, value bits) pair per layer;
* ``+ HiGHS, separate K/V, no PI`` (only with ``--all``): sensitivities profiled at plain positions;
* ``+ HiGHS sep. K/V + reparam``: full PM-KVQ (key reparameterization and sensitivities, both with PI);
* ``... no PI``: key statistics and sensitivities at plain positions.

The trace is English text from Python's own ``pydoc_data.topics`` (offline, identical everywhere); calibration
uses other pydoc text, disjoint from the trace (``--self-generated``: text the model writes, as ``calibrate()``
does by default; much slower on a shared CPU). Scoring feeds the trace in chunks of
``--chunk`` tokens through ``model(..., cache=cache)`` with ``attn_implementation="pmkvq"``; a chunk's own tokens
attend to each other unquantized (as in the pmkvq attention), everything before comes from the quantized cache.

    python benchmarks/bench_calibration_quality.py            # ~10 min on a shared 2-core CPU, 1 thread
    python benchmarks/bench_calibration_quality.py --quick    # smaller trace/calibration, ~3 min
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pmkvq_compile import Plan, ProgressiveKVCache, use_pmkvq_attention
from pmkvq_compile.attention import _sdpa
from pmkvq_compile.calibrate import check_calibration_args
from pmkvq_compile.calibration import collect_key_statistics, generate_samples, search_key_scales
from pmkvq_compile.models import cache_kwarg, load_embedded_model
from pmkvq_compile.plan import LayerPlan
from pmkvq_compile.planning import allocate, equal_split_plan, profile_sensitivity

# ---- uniform RTN baseline: an attention implementation that fake-quantizes the past -----------------------
_RTN_BITS: dict[str, int] = {"k": 4, "v": 4}


def _fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token asymmetric RTN over the whole head_dim (group 64), any bit-width; same formula as quant.py."""
    mx, mn = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
    scale = ((mx - mn) / (2**bits - 1)).clamp(1e-5, 1e5)
    q = torch.floor((x - mn) / scale + 0.5).clamp(0, 2**bits - 1)
    return q * scale + mn


def _rtn_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    past = key.shape[2] - query.shape[2]
    k = torch.cat([_fake_quant(key[:, :, :past].float(), _RTN_BITS["k"]), key[:, :, past:].float()], dim=2)
    v = torch.cat(
        [_fake_quant(value[:, :, :past].float(), _RTN_BITS["v"]), value[:, :, past:].float()], dim=2
    )
    return _sdpa(query, k, v, attention_mask, scaling), None


AttentionInterface.register("bench_rtn", _rtn_attention)
AttentionMaskInterface.register("bench_rtn", sdpa_mask)


# ---- scoring -------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_logprobs(model: Any, trace: torch.Tensor) -> torch.Tensor:
    """Unquantized log-probabilities ``[T, V]`` float32."""
    return F.log_softmax(model(trace[None], use_cache=False).logits[0].float(), dim=-1)


@torch.no_grad()
def chunked_logprobs(model: Any, trace: torch.Tensor, cache: Any, chunk: int) -> torch.Tensor:
    """Feed ``trace`` chunk by chunk through ``cache``; log-probabilities ``[T, V]``."""
    out = []
    kw = cache_kwarg(model)
    for start in range(0, trace.numel(), chunk):
        ids = trace[start : start + chunk][None]
        logits = model(ids, use_cache=True, **{kw: cache}).logits[0]
        out.append(F.log_softmax(logits.float(), dim=-1))
    return torch.cat(out)


def kl(ref: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """Per-position KL(ref || got) ``[T]``."""
    return (ref.exp() * (ref - got)).sum(-1)


def score_plan(model: Any, plan: Plan, trace: torch.Tensor, chunk: int) -> torch.Tensor:
    cache = ProgressiveKVCache(plan, model.config)
    with use_pmkvq_attention(model):
        return chunked_logprobs(model, trace, cache, chunk)


def score_rtn(model: Any, kbits: int, vbits: int, trace: torch.Tensor, chunk: int) -> torch.Tensor:
    _RTN_BITS.update(k=kbits, v=vbits)
    previous = model.config._attn_implementation
    model.set_attn_implementation("bench_rtn")
    try:
        return chunked_logprobs(model, trace, DynamicCache(config=model.config), chunk)
    finally:
        model.set_attn_implementation(previous)


def pydoc_trace(tok: Any, n_tokens: int, skip: int = 0) -> torch.Tensor:
    """``n_tokens`` ids of English text from ``pydoc_data.topics`` (sorted topics), after ``skip`` tokens."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok(text[: 12 * (n_tokens + skip)])["input_ids"]
    if len(ids) < n_tokens + skip:
        raise ValueError("pydoc text too short for the requested trace")
    return torch.tensor(ids[skip : skip + n_tokens], dtype=torch.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--trace-len", type=int, default=2048)
    ap.add_argument("--budgets", default="3bit,2.5bit")
    ap.add_argument("--chunk", type=int, default=32, help="tokens per teacher-forced step (default 32)")
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--n-window", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the CPU is shared)")
    ap.add_argument(
        "--self-generated",
        action="store_true",
        help="calibrate on text the model writes (calibrate()'s default; slow on a shared CPU)",
    )
    ap.add_argument("--all", action="store_true", help="also HiGHS without PI and without reparam")
    ap.add_argument("--quick", action="store_true", help="trace 1024, 2 samples of 192 tokens")
    args = ap.parse_args()
    if args.quick:
        args.trace_len, args.n_samples, args.seq_len = 1024, 2, 192
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load_embedded_model()
    trace = pydoc_trace(tok, args.trace_len)
    ref = reference_logprobs(model, trace)
    print(
        f"# model loaded, trace {trace.numel()} tokens, reference done ({time.time() - t0:.0f}s)", flush=True
    )

    if args.self_generated:
        samples = generate_samples(
            model, tokenizer=tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed
        )
        source = "written by the model"
    else:  # pydoc text after the trace: disjoint from it
        calib = pydoc_trace(tok, args.n_samples * args.seq_len, skip=args.trace_len + 4096)
        samples = list(calib.view(args.n_samples, args.seq_len))
        source = "pydoc text disjoint from the trace"
    print(
        f"# calibration: {len(samples)} x {args.seq_len} tokens, {source} ({time.time() - t0:.0f}s)",
        flush=True,
    )
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    proto, _, bits = check_calibration_args(
        model.config, budget=budgets[0], max_len=args.max_len, bit_choices=(4, 2), n_window=args.n_window
    )
    gs = proto.group_size
    # calibration components, each profiled once and shared by both budgets
    sens, scales = {}, {}
    for pi in (True, False):
        eff = args.max_len if pi else None
        stats = collect_key_statistics(model, samples, effective_len=eff)
        rep = search_key_scales(stats, key_bits=min(bits), group_size=gs)
        scales[pi] = list(rep.scales)
        with torch.enable_grad():
            if pi or args.all:  # the no-PI, no-reparam profile only feeds the --all row
                sens[(pi, False)] = profile_sensitivity(
                    model, samples, bit_choices=bits, group_size=gs, effective_len=eff
                )
            sens[(pi, True)] = profile_sensitivity(
                model, samples, bit_choices=bits, group_size=gs, effective_len=eff, key_scales=scales[pi]
            )
        gain = sum(rep.mse_none) / max(sum(rep.mse_best), 1e-30)
        print(
            f"# PI={pi}: alphas {','.join(f'{a:g}' for a in rep.alphas)}; attention-output MSE at {min(bits)} bits "
            f"without/with reparam = {gain:.2f}x ({time.time() - t0:.0f}s)",
            flush=True,
        )

    rows = []
    half = trace.numel() // 2
    for budget in budgets:
        _, nbytes, _ = check_calibration_args(
            model.config, budget=budget, max_len=args.max_len, bit_choices=bits, n_window=args.n_window
        )
        nbits = float(budget.rstrip("bit"))
        kb_rtn, vb_rtn = int(-(-nbits // 1)), int(nbits // 1)
        hkv, d, n_layers = proto.geometry.num_kv_heads, proto.geometry.head_dim, proto.geometry.num_layers
        rtn_bytes = n_layers * args.max_len * hkv * (d * (kb_rtn + vb_rtn) // 8 + 16 * (d // gs))
        configs: list[tuple[str, Any, int]] = [(f"RTN K{kb_rtn}/V{vb_rtn}", None, rtn_bytes)]
        eq = equal_split_plan(proto, nbytes)
        configs.append(("progressive, equal split", eq, eq.total_budget_bytes))

        def highs(pi: bool, reparam: bool, separate_kv: bool, nbytes: int = nbytes) -> Plan:
            layers = allocate(proto, sens[(pi, reparam)], nbytes, separate_kv=separate_kv)
            if reparam:
                layers = [
                    LayerPlan(lp.key_bits, lp.value_bits, lp.budget_bytes, key_scale=s)
                    for lp, s in zip(layers, scales[pi])
                ]
            return proto.with_layers(layers)

        variants = [("+ HiGHS, K=V bits (paper's IP)", True, False, False)]
        variants.append(("+ HiGHS, separate K/V bits", True, False, True))
        if args.all:
            variants.append(("+ HiGHS, separate K/V, no PI", False, False, True))
        variants += [
            ("+ HiGHS sep. K/V + reparam = PM-KVQ", True, True, True),
            ("+ HiGHS sep. K/V + reparam, no PI", False, True, True),
        ]
        for name, pi, rp, sep in variants:
            p = highs(pi, rp, sep)
            configs.append((name, p, p.total_budget_bytes))
        for name, plan, used in configs:
            t1 = time.time()
            if plan is None:
                got = score_rtn(model, kb_rtn, vb_rtn, trace, args.chunk)
                layout = "-"
            else:
                got = score_plan(model, plan, trace, args.chunk)
                layout = " ".join(f"{lp.key_bits}{lp.value_bits}" for lp in plan.layers)
            k = kl(ref, got)
            rows.append((budget, name, used, nbytes, float(k.mean()), float(k[half:].mean()), layout))
            print(
                f"{budget:>7} | {name:<32} | {used:>10,} B | KL {k.mean():.4f} | KL 2nd half {k[half:].mean():.4f} "
                f"| K,V bits per layer {layout} ({time.time() - t1:.0f}s)",
                flush=True,
            )
    print(
        f"\n# total {time.time() - t0:.0f}s; trace {trace.numel()} tokens, chunk {args.chunk}, max_len {args.max_len}"
    )
    print("\n| budget | configuration | bytes | / budget | mean KL | mean KL, 2nd half | ratio to RTN |")
    print("|---|---|---:|---:|---:|---:|---:|")
    base = {}
    for budget, name, used, nbytes, m, m2, _ in rows:
        base.setdefault(budget, m)
        print(
            f"| {budget} | {name} | {used:,} | {used / nbytes:.3f} | {m:.4f} | {m2:.4f} | {m / base[budget]:.2f} |"
        )


if __name__ == "__main__":
    main()
