"""``pmkvq export MODEL_OR_DIR --plan PLAN --out DIR [--flavor standard|custom]``: write an ONNX directory."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="export a model with a PM-KVQ plan to ONNX (decoder step + plan)")
    p.add_argument(
        "model", metavar="MODEL_OR_DIR", help="`embedded` (SmolLM2-135M-Instruct) or a transformers model dir"
    )
    p.add_argument("--plan", required=True, help="plan directory (pmkvq calibrate / Plan.save)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument(
        "--flavor",
        default="standard",
        choices=("standard", "custom"),
        help="standard: stock ONNX ops, any execution provider; custom: pmkvq-domain nodes (default standard)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(run=run)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"--out {str(out)!r} exists and is not empty; pass --overwrite or another path")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..export import SUPPORTED_MODEL_TYPES, check_exportable, to_onnx
    from ..plan import Plan

    out = Path(args.out)
    _check_out(out, args.overwrite)
    steps = ["load model", "export", "check", "save", "prepare", "done"]
    with tqdm(total=len(steps) - (args.flavor == "custom"), desc="pmkvq export", unit="step") as bar:
        if args.model == "embedded":
            from ..models import load_embedded_model

            bar.set_postfix_str("loading the embedded SmolLM2-135M-Instruct")
            model, tok = load_embedded_model()
        else:
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

            src = Path(args.model)
            if not (src / "config.json").is_file():
                raise ValueError(
                    f"MODEL_OR_DIR={args.model!r} is neither `embedded` nor a model directory with config.json"
                )
            config = AutoConfig.from_pretrained(str(src))
            if config.model_type not in SUPPORTED_MODEL_TYPES:  # refuse before loading any weights
                raise ValueError(
                    f"model_type={config.model_type!r} is not supported for ONNX export; supported: "
                    f"{list(SUPPORTED_MODEL_TYPES)}"
                )
            Plan.load(args.plan, config)
            bar.set_postfix_str(f"loading {src}")
            import torch

            model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
            try:
                tok = AutoTokenizer.from_pretrained(str(src))
            except (OSError, ValueError):
                tok = None
        plan = Plan.load(args.plan, model.config)
        check_exportable(model, plan, args.flavor)
        bar.update(1)

        def progress(msg: str) -> None:
            bar.set_postfix_str(msg)
            if not msg.startswith("exporting"):
                bar.update(1)

        path = to_onnx(
            model, plan, out, flavor=args.flavor, tokenizer=tok, overwrite=args.overwrite, progress=progress
        )
        bar.update(bar.total - bar.n)
    files = sorted(p.name for p in path.iterdir())
    print(f"wrote {path} ({args.flavor} flavor): {', '.join(files)}")
    return 0
