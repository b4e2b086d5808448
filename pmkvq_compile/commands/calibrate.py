"""``pmkvq calibrate``: calibrate a PM-KVQ plan for a model and write it as a plan directory."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..quant import SUPPORTED_BITS


def _bits_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--bits {text!r} must be a comma-separated list drawn from {list(SUPPORTED_BITS)}"
        ) from None


def _budget(text: str) -> int | str:
    return int(text) if text.strip().isdigit() else text


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="calibrate a plan (sensitivity + HiGHS allocation + key reparameterization) and save it",
        description="Calibrate a PM-KVQ plan and write it to OUT (plan.json + tensors.safetensors). "
        "Calibration text is written by the model itself unless --text is given.",
    )
    p.add_argument("--out", required=True, help="plan directory to write")
    p.add_argument(
        "--model",
        default=None,
        help="a local transformers model directory (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--budget",
        type=_budget,
        default="3bit",
        help="KV bytes for one sequence of --max-len tokens, or '<N>bit' (a cache whose body averages N bits, "
        "scales and zeros included); default 3bit",
    )
    p.add_argument(
        "--max-len", type=int, default=2048, help="sequence length the budget is for (default 2048)"
    )
    p.add_argument(
        "--bits", type=_bits_list, default=(4, 2), help="bit choices, e.g. 4,2 or 8,4,2 (default 4,2)"
    )
    p.add_argument("--separate-kv", action="store_true", help="let keys and values get different bits")
    p.add_argument("--no-reparam", action="store_true", help="skip key reparameterization")
    p.add_argument(
        "--no-pi", action="store_true", help="profile at plain positions (no positional interpolation)"
    )
    p.add_argument(
        "--text", action="append", default=None, help="a UTF-8 text file of calibration text (repeatable)"
    )
    p.add_argument("--n-samples", type=int, default=4, help="self-generated calibration samples (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample (default 256)")
    p.add_argument(
        "--window", type=int, default=128, help="recent-window tokens kept at 16 bits (default 128)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing plan in OUT")
    p.set_defaults(run=run)


def _load(model_dir: str | None) -> tuple[Any, Any]:
    if model_dir is None:
        from ..models import load_embedded_model

        return load_embedded_model()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(model_dir)
    if not d.is_dir() or not (d / "config.json").is_file():
        raise ValueError(f"--model {model_dir!r} is not a transformers model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True).eval()
    tok = None
    if any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    return model, tok


def run(args: argparse.Namespace) -> int:
    from ..calibrate import calibrate, check_calibration_args

    out = Path(args.out)
    if (out / "plan.json").exists() and not args.force:
        raise ValueError(f"{str(out)!r} already holds a plan; pass --force to overwrite it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    texts = None
    if args.text:
        texts = []
        for f in args.text:
            if not Path(f).is_file():
                raise ValueError(f"--text {f!r} is not a file")
            texts.append(Path(f).read_text(encoding="utf-8"))
    model, tok = _load(args.model)
    if texts is not None and tok is None:
        raise ValueError(f"--text needs a tokenizer, and {args.model!r} has none")
    check_calibration_args(  # fail before any model pass
        model.config,
        budget=args.budget,
        max_len=args.max_len,
        bit_choices=args.bits,
        separate_kv=args.separate_kv,
        n_window=args.window,
    )
    plan = calibrate(
        model,
        texts,
        budget=args.budget,
        max_len=args.max_len,
        bit_choices=args.bits,
        tokenizer=tok,
        separate_kv=args.separate_kv,
        reparam=not args.no_reparam,
        pi=not args.no_pi,
        n_samples=args.n_samples,
        seq_len=args.seq_len,
        n_window=args.window,
        seed=args.seed,
    )
    plan.save(out)
    print(plan.describe())
    print(f"wrote {out}")
    return 0
