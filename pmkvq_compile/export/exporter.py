"""``to_onnx``: export a Llama-family decoder with a PM-KVQ plan to an ONNX directory.

Directory layout (written to a temporary sibling directory, renamed into place only when complete)::

    decoder.onnx         the decoder step (dynamic batch and sequence length; prefill and decode)
    prepare.onnx         flavor "standard" only: the window flush / body shrink graph
    plan/                the plan (plan.json + tensors.safetensors)
    tokenizer/           the tokenizer, when one was given
    pmkvq_onnx.json      manifest: format, flavor, input/output names, state specs, model facts (written last)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import torch

from ..kernels.layout import ArenaLayout
from ..plan import ModelGeometry, Plan
from .step import FLAVORS, DecoderStep, export_patches, state_specs

__all__ = ["MANIFEST", "SUPPORTED_MODEL_TYPES", "check_exportable", "to_onnx"]

MANIFEST = "pmkvq_onnx.json"
FORMAT = "pmkvq-onnx"
FORMAT_VERSION = 1
OPSET = 21
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def check_exportable(model: Any, plan: Plan, flavor: str) -> None:
    """Raise ValueError naming what cannot be exported (nothing is written before this passes)."""
    if flavor not in FLAVORS:
        raise ValueError(f"flavor={flavor!r} is not supported; expected one of {list(FLAVORS)}")
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be a pmkvq_compile.Plan, got {type(plan).__name__}")
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={mt!r} is not supported for ONNX export; supported decoder architectures: "
            f"{list(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise ValueError(
            f"sliding_window={config.sliding_window} is not served by the quantized cache; export a model "
            "without sliding-window attention"
        )
    plan.check_model(ModelGeometry.from_config(config))
    if plan.n_sink < 1:
        raise ValueError(f"n_sink={plan.n_sink} is not supported by the export; use a plan with n_sink >= 1")
    if flavor == "standard" and plan.scale_dtype != "float32":
        raise ValueError(
            f"scale_dtype={plan.scale_dtype!r} is not supported by flavor 'standard' (its graphs keep float32 "
            "scales and zeros); export with flavor='custom' or a plan with scale_dtype='float32'"
        )
    for i in range(len(plan.layers)):
        ArenaLayout.from_plan(plan, i)  # validates each layer's geometry and budget


def _dummy_inputs(plan: Plan, flavor: str, batch: int, t: int, past: int, vocab: int):
    ids = torch.randint(0, vocab, (batch, t))
    mask = torch.ones(batch, past + t, dtype=torch.int64)
    pos = torch.arange(past, past + t).expand(batch, t).contiguous()
    state = [
        torch.zeros(s.concrete(batch), dtype=s.dtype)
        for i in range(len(plan.layers))
        for s in state_specs(plan, i, flavor)
    ]
    return ids, mask, pos, state


def _names(plan: Plan, flavor: str) -> tuple[list[str], list[str], list[dict[int, str]]]:
    ins, outs, dyn = [], [], []
    for i in range(len(plan.layers)):
        for s in state_specs(plan, i, flavor):
            ins.append(f"past_key_values.{i}.{s.name}")
            outs.append(f"present.{i}.{s.name}")
            dyn.append({a: (n if n == "batch" else f"{n}_{i}") for a, n in s.dynamic.items()})
    return ins, outs, dyn


def to_onnx(
    model: Any,
    plan: Plan,
    out_dir: str | os.PathLike[str],
    *,
    flavor: str = "standard",
    tokenizer: Any | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export ``model`` (a Llama / Qwen2 / Mistral ``*ForCausalLM``, float32) with ``plan`` to ``out_dir``.

    Args:
        flavor: ``"standard"`` (standard ONNX ops only, any execution provider) or ``"custom"``
            (``pmkvq`` domain nodes; ONNX Runtime through onnxruntime-extensions Python ops).
        tokenizer: saved into ``out_dir/tokenizer`` for ``pmkvq generate``.
        overwrite: replace an existing ``out_dir`` (otherwise an existing non-empty directory is refused).

    Raises:
        ValueError: unsupported architecture, flavor or plan, or ``out_dir`` exists, before anything is written.
    """
    check_exportable(model, plan, flavor)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"out_dir {str(out)!r} exists and is not empty; pass overwrite=True or another path")
    say = progress or (lambda msg: None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        t0 = time.perf_counter()
        _export_decoder(model, plan, flavor, tmp / "decoder.onnx", say)
        if flavor == "standard":
            from .standard import build_prepare

            say("building prepare.onnx")
            prep = build_prepare(plan)
            onnx.checker.check_model(prep, full_check=True)
            onnx.save(prep, str(tmp / "prepare.onnx"))
        plan.save(tmp / "plan")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        ins, outs, _ = _names(plan, flavor)
        cfg = model.config
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or cfg.eos_token_id
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "flavor": flavor,
            "opset": OPSET,
            "model_type": cfg.model_type,
            "vocab_size": int(cfg.vocab_size),
            "eos_token_id": eos if isinstance(eos, list) else ([eos] if eos is not None else []),
            "inputs": ["input_ids", "attention_mask", "position_ids", *ins],
            "outputs": ["logits", *outs],
            "state_per_layer": [s.name for s in state_specs(plan, 0, flavor)],
            "export_seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; the result is an ordinary directory
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _export_decoder(model: Any, plan: Plan, flavor: str, path: Path, say: Callable[[str], None]) -> None:
    if flavor == "custom":
        from .custom import translations
    else:
        from .standard import translations
    step = DecoderStep(model, plan, flavor).eval()
    ids, mask, pos, state = _dummy_inputs(plan, flavor, 2, 3, 4, int(model.config.vocab_size))
    ins, outs, dyn = _names(plan, flavor)
    seq, total = {0: "batch", 1: "sequence_length"}, {0: "batch", 1: "total_sequence_length"}
    dims = (seq, total, seq)
    say(f"exporting decoder.onnx ({flavor} flavor, {len(plan.layers)} layers)")
    with export_patches(model), torch.no_grad():
        prog = torch.onnx.export(
            step,
            (ids, mask, pos, *state),
            dynamo=True,
            opset_version=OPSET,
            custom_translation_table=translations(),
            input_names=["input_ids", "attention_mask", "position_ids", *ins],
            output_names=["logits", *outs],
            dynamic_shapes=(*dims, tuple(dyn)),
            optimize=False,
            verbose=False,
        )
    say("saving decoder.onnx")
    prog.save(str(path))
    say("checking decoder.onnx")
    onnx.checker.check_model(str(path), full_check=True)
