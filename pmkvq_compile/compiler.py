"""The ways into the graph passes: a Dynamo backend, an Inductor custom pass, and ``compile(model, plan)``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .passes import LayerState, PassContext, run_passes
from .plan import Plan

log = logging.getLogger("pmkvq_compile")

__all__ = ["PmkvqBackend", "PmkvqInductorPass", "backend", "inductor_pass"]


class PmkvqBackend:
    """A ``torch.compile`` backend: runs the pmkvq passes on each Dynamo graph, then ``compiler``.

    Args:
        plan: the plan; attention nodes are mapped to its layers by module path.
        compiler: ``"inductor"`` (default) or ``"eager"`` (run the rewritten FX graph as is), or any Dynamo
            backend callable ``(gm, example_inputs) -> callable``.

    Every graph compiled with one backend shares one packed cache per layer (``states``): prefill and
    decode graphs read and write the same arenas. A sequence starts over when a graph writes position 0.
    """

    def __init__(self, plan: Plan, *, compiler: str | Callable[..., Any] = "inductor") -> None:
        if not isinstance(plan, Plan):
            raise ValueError(f"plan must be a pmkvq_compile.Plan, got {type(plan).__name__}")
        if not (callable(compiler) or compiler in ("inductor", "eager")):
            raise ValueError(f"compiler={compiler!r}: expected 'inductor', 'eager' or a backend callable")
        self.plan = plan
        self.compiler = compiler
        self.states: dict[int, LayerState] = {}
        self.contexts: list[PassContext] = []  # one per compiled graph: sites found, nodes declined

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        ctx = PassContext(self.plan, self.states, list(example_inputs))
        gm = run_passes(_copy(gm), ctx)
        self.contexts.append(ctx)
        log.info("pmkvq: rewrote %d attention node(s), declined %d", len(ctx.sites), len(ctx.declined))
        extra = list(ctx.extra_inputs)
        inputs = [*example_inputs, *extra]
        if self.compiler == "eager":
            inner: Callable[..., Any] = gm.forward
        elif self.compiler == "inductor":
            from torch._inductor.compile_fx import compile_fx

            inner = compile_fx(gm, inputs)
        else:
            inner = self.compiler(gm, inputs)
        if not extra:
            return inner

        def run(*args: Any) -> Any:
            return inner(*args, *extra)

        return run

    def reset(self) -> None:
        """Forget every token of every layer (arenas keep their addresses)."""
        for st in self.states.values():
            st.reset()

    def nbytes(self, layer: int | None = None) -> int:
        """Bytes the held tokens need (one sequence), in ``layer`` or all layers; reads device state."""
        if layer is not None:
            return self.states[layer].nbytes() if layer in self.states else 0
        return sum(st.nbytes() for st in self.states.values())

    def body_bits(self, layer: int) -> tuple[int, int]:
        """Current (key, value) body bits of ``layer`` (reads device state)."""
        kb, vb = self.states[layer].state[3:5].tolist()
        return int(kb), int(vb)


class PmkvqInductorPass(CustomGraphPass):
    """The pmkvq passes as an Inductor post-grad custom pass, for an existing ``torch.compile`` pipeline::

        torch._inductor.config.post_grad_custom_post_pass = pmkvq_compile.inductor_pass(plan)

    It runs on ATen graphs after AOT autograd (functional cache writes, backend-specific SDPA ops) and reaches
    the packed state through registered handles (:mod:`pmkvq_compile.passes.registered_state`). ``uuid()`` hashes the passes' source files and the
    plan, so Inductor's FX-graph cache never serves a graph compiled by another version or for another plan.
    Masks: Inductor shows no buffer values, so a square boolean buffer indexed by the written positions is
    taken to be the causal mask (gpt-fast's convention); other masks decline.
    """

    def __init__(self, plan: Plan) -> None:
        if not isinstance(plan, Plan):
            raise ValueError(f"plan must be a pmkvq_compile.Plan, got {type(plan).__name__}")
        self.plan = plan
        self.states: dict[int, LayerState] = {}
        self.handles: dict[int, int] = {}
        self.contexts: list[PassContext] = []
        self._nonce = os.urandom(8)  # handles live in this process: never share compiled graphs across passes

    def __call__(self, graph: fx.Graph) -> None:
        gm = graph.owning_module
        ctx = PassContext(self.plan, self.states, [], attach="handle", handles=self.handles)
        run_passes(gm, ctx)
        self.contexts.append(ctx)

    def uuid(self) -> bytes:
        files = [
            *sorted(str(p) for p in (Path(__file__).parent / "passes").glob("*.py")),
            __file__,
            str(Path(__file__).parent / "ops.py"),
        ]
        h = hashlib.sha256(get_hash_for_files(tuple(files)))
        h.update(json.dumps(self.plan.to_json_dict(), sort_keys=True).encode())
        h.update(self._nonce)
        for lp in self.plan.layers:
            if lp.key_scale is not None:
                h.update(lp.key_scale.numpy().tobytes())
        return h.digest()

    def reset(self) -> None:
        """Forget every token of every layer."""
        for st in self.states.values():
            st.reset()


def inductor_pass(plan: Plan) -> PmkvqInductorPass:
    """An Inductor custom pass object; see :class:`PmkvqInductorPass`."""
    return PmkvqInductorPass(plan)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a copy of ``gm``'s graph: Dynamo keeps reading the original after the backend."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def backend(plan: Plan, *, compiler: str | Callable[..., Any] = "inductor") -> PmkvqBackend:
    """``torch.compile(model, backend=pmkvq_compile.backend(plan))`` for any ``nn.Module``."""
    return PmkvqBackend(plan, compiler=compiler)
