"""The ``pmkvq`` command.

Each subcommand lives in ``pmkvq_compile/commands/<name>.py``, listed in ``COMMANDS`` in ``--help`` order.
A module exposes ``add_parser(subparsers)``, which adds its parser(s) and calls
``parser.set_defaults(run=<callable(args) -> int>)`` on each leaf parser.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: list[str] = [
    "pmkvq_compile.commands.demo",
    "pmkvq_compile.commands.eval",
    "pmkvq_compile.commands.calibrate",
    "pmkvq_compile.commands.plan",
    "pmkvq_compile.commands.export",
    "pmkvq_compile.commands.generate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pmkvq", description="PM-KVQ progressive mixed-precision KV-cache quantization"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, MemoryError) as e:  # user errors (bad plan, bad budget, ...): one line, no traceback
        print(f"pmkvq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
