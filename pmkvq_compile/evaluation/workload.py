"""The evaluation workload: long chain-of-thought traces the model writes itself, stored as token ids.

A trace is the chat-templated prompt followed by ``n_new`` tokens the unquantized model sampled (temperature
0.6, top-p 0.95, seeded; the end-of-sequence token is suppressed until ``n_new`` tokens exist, so a trace
that finishes its answer early goes on writing, as long reasoning traces do). Scoring is teacher-forced on
these ids, so every cache method sees exactly the same tokens.

Generating is slow on a CPU (~15 tokens/s for SmolLM2-135M on 2 cores), so traces are written to a JSON
file of token ids (:func:`save_traces`) and read back (:func:`load_traces`); the default traces of
``pmkvq eval`` ship with the package as ``evaluation/traces_smollm2.json`` and can be regenerated bit for bit
on the same torch build with ``pmkvq eval --regenerate-traces``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DEFAULT_TRACES_PATH",
    "PROMPTS",
    "Trace",
    "generate_trace",
    "generate_traces",
    "load_traces",
    "save_traces",
]

TRACE_FORMAT = "pmkvq-eval-traces"
TRACE_VERSION = 1
DEFAULT_TRACES_PATH = Path(__file__).with_name("traces_smollm2.json")

# Written for this project: two math and two code problems that invite long step-by-step answers.
PROMPTS: dict[str, str] = {
    "math-fields": (
        "A farmer has three fields. The first is 120 m long and 80 m wide. The second is twice as long as the "
        "first and half as wide. The third is a square with the same area as the first two together. Fencing "
        "costs 7 dollars per metre. Work out the area and the perimeter of every field and the total cost of "
        "fencing all three. Think step by step, check each calculation, and explain your reasoning in detail."
    ),
    "code-sieve": (
        "Write a Python function that returns all prime numbers below n with the sieve of Eratosthenes. "
        "Reason step by step: explain the idea, write the code, trace it by hand for n = 30 showing the list "
        "after every step, analyse its time and memory complexity, then write unit tests and explain each one."
    ),
    "math-savings": (
        "Maria saves 150 dollars in the first month and each month she saves 12 dollars more than the month "
        "before. Her bank pays 0.5 percent interest per month on the balance. How much has she saved after two "
        "years, with and without interest? Solve it step by step, show every month's balance, and check it."
    ),
    "code-bst": (
        "Implement a binary search tree in Python with insert, search, delete and in-order traversal. Think "
        "step by step about every case of deletion, write the code, run it by hand on the keys 50, 30, 70, 20, "
        "40, 60, 80 while deleting 30 and then 50, and explain the complexity of each operation."
    ),
}

DEFAULT_PROMPT_NAMES: tuple[str, ...] = ("math-fields", "code-sieve")


@dataclass(frozen=True)
class Trace:
    """One trace: ``ids`` int64 ``[prompt_len + n_new]``, the first ``prompt_len`` of them the prompt."""

    name: str
    prompt: str
    ids: torch.Tensor
    prompt_len: int

    def __post_init__(self) -> None:
        if not isinstance(self.ids, torch.Tensor) or self.ids.dim() != 1 or self.ids.dtype != torch.int64:
            raise ValueError(
                f"trace {self.name!r}: ids must be a 1-D int64 tensor, got "
                f"{getattr(self.ids, 'dtype', type(self.ids).__name__)} {tuple(getattr(self.ids, 'shape', ()))}"
            )
        if not 1 <= self.prompt_len < self.ids.numel():
            raise ValueError(
                f"trace {self.name!r}: prompt_len={self.prompt_len} must lie in [1, {self.ids.numel()})"
            )

    @property
    def n_new(self) -> int:
        return self.ids.numel() - self.prompt_len


def _prompt_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    msgs = [{"role": "user", "content": prompt}]
    out = tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return out["input_ids"][0].to(torch.int64)


def generate_trace(
    model: Any,
    tokenizer: Any,
    name: str,
    prompt: str,
    n_new: int,
    *,
    seed: int = 0,
    temperature: float = 0.6,
    top_p: float = 0.95,
    progress: bool = True,
) -> Trace:
    """Sample ``n_new`` tokens from ``model`` after the chat-templated ``prompt`` (seeded; RNG state restored)."""
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    if isinstance(n_new, bool) or not isinstance(n_new, int) or n_new < 1:
        raise ValueError(f"n_new={n_new!r} must be an int >= 1")
    ids = _prompt_ids(tokenizer, prompt)
    bar = tqdm(total=n_new, desc=f"trace {name}", unit="tok", disable=not progress, leave=False)

    def tick(input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(
            ids.unsqueeze(0),
            attention_mask=torch.ones(1, ids.numel(), dtype=torch.int64),
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            pad_token_id=tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([tick]),
        )
    bar.close()
    return Trace(name=name, prompt=prompt, ids=out[0].to(torch.int64), prompt_len=ids.numel())


def generate_traces(
    model: Any,
    tokenizer: Any,
    names: Sequence[str] = DEFAULT_PROMPT_NAMES,
    n_new: int = 2048,
    *,
    seed: int = 0,
    progress: bool = True,
) -> list[Trace]:
    """One trace per prompt name of :data:`PROMPTS`; trace ``i`` is sampled with seed ``seed + i``."""
    bad = [n for n in names if n not in PROMPTS]
    if bad or not names:
        raise ValueError(f"unknown prompt names {bad or list(names)}; expected names from {sorted(PROMPTS)}")
    return [
        generate_trace(model, tokenizer, n, PROMPTS[n], n_new, seed=seed + i, progress=progress)
        for i, n in enumerate(names)
    ]


def save_traces(
    traces: Sequence[Trace], path: str | os.PathLike[str], *, model_name: str, meta: dict
) -> Path:
    """Write traces as JSON token ids (with the prompt text and how they were made)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": TRACE_FORMAT,
        "version": TRACE_VERSION,
        "model": model_name,
        "generation": meta,
        "traces": [
            {"name": t.name, "prompt": t.prompt, "prompt_len": t.prompt_len, "ids": t.ids.tolist()}
            for t in traces
        ],
    }
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    os.replace(tmp, p)
    return p


def load_traces(path: str | os.PathLike[str], *, vocab_size: int | None = None) -> list[Trace]:
    """Read traces written by :func:`save_traces`; ids outside ``[0, vocab_size)`` are refused."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no trace file at {str(p)!r}; generate one with `pmkvq eval --regenerate-traces`")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(p)!r} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != TRACE_FORMAT or doc.get("version") != TRACE_VERSION:
        raise ValueError(f"{str(p)!r} is not a {TRACE_FORMAT} v{TRACE_VERSION} file")
    traces = []
    for t in doc["traces"]:
        ids = torch.tensor(t["ids"], dtype=torch.int64)
        if vocab_size is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"trace {t['name']!r} in {str(p)!r} has token ids outside [0, {vocab_size})")
        traces.append(Trace(name=t["name"], prompt=t["prompt"], ids=ids, prompt_len=int(t["prompt_len"])))
    if not traces:
        raise ValueError(f"{str(p)!r} holds no traces")
    return traces
