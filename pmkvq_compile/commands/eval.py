"""``pmkvq eval``: every KV-cache method at equal bytes on long self-written traces of the embedded SmolLM2."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch


def add_parser(sub: Any) -> None:
    from ..evaluation.methods import DEFAULT_KINDS, METHOD_KINDS
    from ..evaluation.workload import DEFAULT_PROMPT_NAMES, DEFAULT_TRACES_PATH, PROMPTS

    p = sub.add_parser(
        "eval",
        help="compare RTN, KIVI and PM-KVQ (uniform and calibrated) at equal KV bytes on long traces",
        description="Teacher-forced KL / top-1 / perplexity per position bucket and free-running greedy "
        "agreement of every method against the unquantized model, a results JSON and PNG plots.",
    )
    p.add_argument("--traces", type=Path, default=DEFAULT_TRACES_PATH, help="trace file (JSON token ids)")
    p.add_argument(
        "--regenerate-traces",
        action="store_true",
        help="sample new traces with the model and write them to --traces first (slow: ~7 tok/s on 2 cores)",
    )
    p.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPT_NAMES), choices=sorted(PROMPTS))
    p.add_argument("--n-new", type=int, default=2048, help="generated tokens per trace when regenerating")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N generated tokens")
    p.add_argument("--budgets", type=int, nargs="+", default=[4, 2], help="budget bit-widths (8, 4, 2)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_KINDS),
        choices=METHOD_KINDS,
        help="method kinds (pmkvq-f16s: PM-KVQ uniform with float16 scales at the same bytes; not by default)",
    )
    p.add_argument("--window", type=int, default=32, help="PM-KVQ 16-bit window tokens (paper: 128)")
    p.add_argument("--chunk", type=int, default=32, help="teacher-forcing chunk (tokens per forward)")
    p.add_argument("--free-run", type=int, default=128, help="greedy tokens decoded after each trace")
    p.add_argument("--bucket", type=int, default=512, help="positions per reported bucket")
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy box)")
    p.add_argument("--out", type=Path, default=Path("out/eval"), help="folder for results.json and plans")
    p.add_argument("--plots", type=Path, default=None, help="folder for the PNGs (default: --out)")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.plots import plot_all
    from ..evaluation.run import EvalConfig, format_buckets, format_table, run_eval, save_results
    from ..evaluation.workload import Trace, generate_traces, load_traces, save_traces
    from ..models import load_embedded_model

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads={args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens={args.max_tokens} must be >= 1")
    cfg = EvalConfig(
        budgets=tuple(args.budgets),
        kinds=tuple(args.methods),
        window=args.window,
        chunk=args.chunk,
        free_run=args.free_run,
        bucket=args.bucket,
        calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len,
        seed=args.seed,
    )
    if not args.regenerate_traces and not Path(args.traces).is_file():
        raise ValueError(f"no trace file at {str(args.traces)!r}; pass --regenerate-traces to write one")
    t0 = time.perf_counter()
    model, tok = load_embedded_model()
    name = "SmolLM2-135M-Instruct (embedded, fp32)"
    if args.regenerate_traces:
        traces = generate_traces(model, tok, args.prompts, args.n_new, seed=args.seed)
        meta = {
            "n_new": args.n_new,
            "seed": args.seed,
            "temperature": 0.6,
            "top_p": 0.95,
            "torch": torch.__version__,
        }
        print(f"wrote {save_traces(traces, args.traces, model_name=name, meta=meta)}")
    traces = [
        t for t in load_traces(args.traces, vocab_size=model.config.vocab_size) if t.name in args.prompts
    ]
    if not traces:
        raise ValueError(f"{str(args.traces)!r} holds none of the traces {args.prompts}")
    if args.max_tokens is not None:
        traces = [
            Trace(t.name, t.prompt, t.ids[: t.prompt_len + args.max_tokens], t.prompt_len) for t in traces
        ]
    results = run_eval(model, tok, traces, cfg, model_name=name)
    results["timing"]["wall_s"] = time.perf_counter() - t0
    out = save_results(results, Path(args.out) / "results.json")
    print(format_table(results))
    print()
    print(format_buckets(results))
    print(f"\nresults: {out}")
    print(f"wall time {results['timing']['wall_s']:.0f} s (model load, calibration, scoring)")
    if not args.no_plots:
        for p in plot_all(results, args.plots or args.out):
            print(f"plot: {p}")
    return 0
