"""Calibration samples: given token ids, texts plus a tokenizer, or text the model writes itself.

Every sample is a 1-D int64 tensor of at most ``seq_len`` token ids; profiling feeds them one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = ["DEFAULT_PROMPTS", "generate_samples", "prepare_samples"]

DEFAULT_PROMPTS: tuple[str, ...] = (
    "Explain step by step how to compute the area of a triangle from the lengths of its three sides.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Describe how a computer executes a simple program, from source code to machine instructions.",
    "Solve this problem and show your reasoning: a train leaves at 9:40 and travels 210 km at 84 km/h. "
    "When does it arrive?",
    "Summarize the main causes of the seasons on Earth and why they are reversed between hemispheres.",
    "List the steps to make bread at home and explain what each step does chemically.",
    "Write a Python function that checks whether a string is a palindrome, then explain it line by line.",
    "Compare the advantages and drawbacks of trains and planes for a 600 km trip.",
)

_MIN_TOKENS = 2


def _vocab_size(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    text = getattr(cfg, "text_config", None) or cfg
    return getattr(text, "vocab_size", None)


def _check_ids(ids: torch.Tensor, vocab: int | None, where: str) -> torch.Tensor:
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{where}: token ids must be an integer tensor, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab)):
        raise ValueError(
            f"{where}: token ids must lie in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]"
        )
    return ids.to(torch.int64)


def prepare_samples(
    calibration: Any,
    *,
    tokenizer: Any | None = None,
    seq_len: int,
    vocab_size: int | None = None,
) -> list[torch.Tensor]:
    """Turn user calibration data into samples of at most ``seq_len`` tokens.

    Accepts: an int tensor ``[T]`` or ``[N, T]``; a list of int tensors ``[T_i]``; a string or a list of
    strings together with ``tokenizer`` (long texts are cut into ``seq_len`` pieces). Pieces shorter than 2
    tokens are dropped.

    Raises:
        ValueError: no usable sample, texts without a tokenizer, ids outside the vocabulary, other types.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < _MIN_TOKENS:
        raise ValueError(f"seq_len={seq_len!r} must be an int >= {_MIN_TOKENS}")
    rows: list[torch.Tensor] = []
    if isinstance(calibration, str):
        calibration = [calibration]
    if isinstance(calibration, Sequence) and len(calibration) == 0:
        raise ValueError("the calibration data is empty (an empty list); pass texts or token ids, or None")
    if isinstance(calibration, torch.Tensor):
        t = calibration
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2:
            raise ValueError(f"calibration token ids must be [T] or [N, T], got shape {tuple(t.shape)}")
        rows = [_check_ids(r, vocab_size, "calibration") for r in t]
    elif isinstance(calibration, Sequence) and all(isinstance(c, str) for c in calibration):
        if tokenizer is None:
            raise ValueError("calibration texts need a tokenizer; pass tokenizer=... or token-id tensors")
        rows = [
            torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
            for text in calibration
            if text.strip()
        ]
    elif isinstance(calibration, Sequence) and all(isinstance(c, torch.Tensor) for c in calibration):
        rows = []
        for i, c in enumerate(calibration):
            if c.dim() != 1:
                raise ValueError(
                    f"calibration[{i}] must be a 1-D token-id tensor, got shape {tuple(c.shape)}"
                )
            rows.append(_check_ids(c, vocab_size, f"calibration[{i}]"))
    else:
        raise ValueError(
            f"calibration of type {type(calibration).__name__} is not supported; pass token-id tensors, "
            "texts with a tokenizer, or None to let the model write its own"
        )
    samples = [
        row[start : start + seq_len]
        for row in rows
        for start in range(0, row.numel(), seq_len)
        if row[start : start + seq_len].numel() >= _MIN_TOKENS
    ]
    if not samples:
        raise ValueError(
            f"the calibration data is empty: no sample has at least {_MIN_TOKENS} tokens; "
            "pass non-empty texts or token ids"
        )
    return samples


def generate_samples(
    model: Any,
    *,
    tokenizer: Any | None,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    progress: bool = True,
) -> list[torch.Tensor]:
    """Let the model write its own calibration text: ``n_samples`` samples of ``seq_len`` tokens.

    Prompts are the first ``n_samples`` of ``prompts`` (cycled), tokenized with ``tokenizer``; without a
    tokenizer each prompt is 8 seeded random token ids. Sampling (temperature 0.8, top-p 0.95) runs under
    ``torch.random.fork_rng`` seeded with ``seed``: the same model and seed give the same samples, and the
    caller's random state is untouched. Samples are generated one at a time (no padding).
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples={n_samples!r} must be an int >= 1")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 16:
        raise ValueError(f"seq_len={seq_len!r} must be an int >= 16 to generate calibration text")
    device = next(model.parameters()).device
    vocab = _vocab_size(model) or 2
    out: list[torch.Tensor] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in tqdm(range(n_samples), desc="calibration text", disable=not progress, leave=False):
            if tokenizer is not None:
                prompt = torch.tensor(tokenizer(prompts[i % len(prompts)])["input_ids"], dtype=torch.int64)
                if prompt.numel() == 0:
                    raise ValueError(
                        "the tokenizer turned the calibration prompt into no tokens; is it empty?"
                    )
            else:
                prompt = torch.randint(0, vocab, (8,), dtype=torch.int64)
            prompt = prompt[: seq_len // 2]
            new = seq_len - prompt.numel()
            gen = model.generate(
                prompt.unsqueeze(0).to(device),
                attention_mask=torch.ones(1, prompt.numel(), dtype=torch.int64, device=device),
                do_sample=True,
                temperature=0.8,
                top_p=0.95,
                top_k=0,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=getattr(tokenizer, "eos_token_id", None) or 0,
            )
            out.append(gen[0].cpu())
    return out
