"""``pmkvq plan show PLAN``: print a saved plan's per-layer bits and bytes."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help="inspect a saved plan")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print the per-layer bits and byte budgets as a table")
    show.add_argument("plan", metavar="PLAN", help="plan directory (or its plan.json)")
    show.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..plan import Plan

    plan = Plan.load(args.plan)
    print(plan.describe())
    if plan.key_scales_folded:
        print("key scales: folded into the model's q/k projections")
    for k, v in sorted(plan.metadata.items()):
        print(f"{k}: {v}")
    return 0
