"""Evaluation of KV-cache quantizers against PM-KVQ at equal bytes (``pmkvq eval``).

* :mod:`.baselines`: per-token RTN and KIVI as transformers caches, with their byte counts.
* :mod:`.methods`: the compared methods at a byte budget (RTN, KIVI, PM-KVQ uniform and calibrated).
* :mod:`.workload`: long self-written chain-of-thought traces of the embedded SmolLM2, stored as token ids.
* :mod:`.score`: teacher-forced KL / top-1 / perplexity in lockstep with the reference, free-running greedy.
* :mod:`.run`: the whole run and its results JSON; :mod:`.plots`: the PNGs.
"""

from .baselines import BaselineCache, KIVIConfig, RTNConfig, kivi_bytes, kv_nbytes, rtn_bytes
from .methods import DEFAULT_KINDS, METHOD_KINDS, Method, build_methods, fit_kivi
from .run import EvalConfig, format_buckets, format_table, run_eval, save_results
from .score import TraceScores, bucket_stats, score_trace, summary_stats
from .workload import PROMPTS, Trace, generate_traces, load_traces, save_traces

__all__ = [
    "DEFAULT_KINDS",
    "METHOD_KINDS",
    "PROMPTS",
    "BaselineCache",
    "EvalConfig",
    "KIVIConfig",
    "Method",
    "RTNConfig",
    "Trace",
    "TraceScores",
    "bucket_stats",
    "build_methods",
    "fit_kivi",
    "format_buckets",
    "format_table",
    "generate_traces",
    "kivi_bytes",
    "kv_nbytes",
    "load_traces",
    "rtn_bytes",
    "run_eval",
    "save_results",
    "save_traces",
    "score_trace",
    "summary_stats",
]
