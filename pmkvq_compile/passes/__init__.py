"""Graph passes, one per file, each ``(gm, ctx) -> gm`` ending with dead-code elimination, lint and recompile.

They run in this order (:data:`PASSES`):

1. :func:`find_attention_sites`: find SDPA nodes fed by KV-cache writes that the plan serves exactly; decline
   the rest with one logged line each.
2. :func:`rewrite_attention`: replace them with ``pmkvq::append`` + ``pmkvq::decode_attention`` /
   ``pmkvq::prefill_attention`` over the packed arena; delete the float-cache writes and GQA expansion.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx

from .context import AttentionSite, LayerState, PassContext, finish
from .find_attention_sites import find_attention_sites
from .rewrite_attention import rewrite_attention

__all__ = ["PASSES", "AttentionSite", "LayerState", "PassContext", "finish", "run_passes"]

PASSES: list[Callable[[fx.GraphModule, PassContext], fx.GraphModule]] = [
    find_attention_sites,
    rewrite_attention,
]


def run_passes(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Run :data:`PASSES` in order."""
    for p in PASSES:
        gm = p(gm, ctx)
    return gm
