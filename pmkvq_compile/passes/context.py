"""What the graph passes share: the plan, the per-layer device state they wire into graphs, the findings."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..kernels.layout import ArenaLayout
from ..plan import Plan

log = logging.getLogger("pmkvq_compile.passes")

__all__ = ["AttentionSite", "LayerState", "PassContext", "finish"]


@dataclass
class LayerState:
    """One layer's packed cache on the device: ``arena`` u8 [B, budget], ``state`` i32 [8], ``table`` i32 [C, 3]."""

    layout: ArenaLayout
    arena: torch.Tensor
    state: torch.Tensor
    table: torch.Tensor
    key_scale: torch.Tensor | None

    @classmethod
    def allocate(cls, plan: Plan, layer: int, batch: int, device: torch.device) -> LayerState:
        lay = ArenaLayout.from_plan(plan, layer)
        lp = plan.layers[layer]
        ks = None
        if lp.key_scale is not None and not plan.key_scales_folded:
            ks = lp.key_scale.to(device=device, dtype=torch.float32).contiguous()
        st = cls(
            layout=lay,
            arena=torch.zeros(batch, lay.budget_bytes, dtype=torch.uint8, device=device),
            state=lay.initial_state(device),
            table=lay.empty_table(device),
            key_scale=ks,
        )
        for t in st.tensors():
            # fixed addresses, as transformers' StaticCache does: CUDA graphs may then mutate them in place
            torch._dynamo.mark_static_address(t)
        return st

    def tensors(self) -> list[torch.Tensor]:
        out = [self.arena, self.state, self.table]
        return out if self.key_scale is None else [*out, self.key_scale]

    def reset(self) -> None:
        """Forget every token (in place: addresses stay)."""
        self.state.copy_(self.layout.initial_state(self.state.device))
        self.table.zero_()

    def body_bits(self) -> tuple[int, int]:
        """Current (key, value) bits of the body (reads the device state: a host sync)."""
        kb, vb = self.state[3:5].tolist()
        return int(kb), int(vb)

    def nbytes(self) -> int:
        """Bytes the held tokens need, per sequence (reads the device state: a host sync)."""
        n, wl, nc = (int(x) for x in self.state[:3].tolist())
        lay = self.layout
        body = sum(lay.chunk_bytes(int(kb), int(vb)) for _, kb, vb in self.table[:nc].tolist())
        sink = min(n, lay.n_sink) * lay.token_bytes(lay.sink_bits, lay.sink_bits)
        return sink + wl * lay.token_bytes(lay.window_bits, lay.window_bits) + body


@dataclass
class AttentionSite:
    """An attention node the rewrite will serve from the packed cache."""

    node: fx.Node
    layer: int
    q: fx.Node
    k_new: fx.Node
    v_new: fx.Node
    position: Any  # node of the written positions (None for a cat cache)
    restart: bool  # a cat cache whose past is empty: this graph starts a sequence
    writes: list[fx.Node]
    scale: float
    tuple_output: bool
    q_len: int
    batch: int
    kv_shape: tuple[int, int, int, int]  # [B, Hkv, T, D] of the new tokens


@dataclass
class PassContext:
    """Shared by the passes of one graph. ``states`` is shared by every graph compiled with the same plan."""

    plan: Plan
    states: dict[int, LayerState]
    example_inputs: list[Any] = field(default_factory=list)
    sites: list[AttentionSite] = field(default_factory=list)
    declined: list[tuple[str, str]] = field(default_factory=list)  # (node name, reason)
    declined_cache_layers: dict[int, str] = field(default_factory=dict)  # cache-fed layers declined -> reason
    extra_inputs: list[torch.Tensor] = field(default_factory=list)  # placeholders the rewrite added, in order
    # how the rewrite wires the packed state into the graph: new "placeholder" inputs (Dynamo backends) or
    # registered "handle"s (Inductor's post-grad pass, which can add neither inputs nor real constants)
    attach: str = "placeholder"
    handles: dict[int, int] = field(default_factory=dict)  # layer -> registry handle, shared like ``states``

    def handle(self, layer: int) -> int:
        from .registered_state import register_state

        if layer not in self.handles:
            self.handles[layer] = register_state(self.states[layer])
        return self.handles[layer]

    def decline(self, node: fx.Node, reason: str) -> None:
        self.declined.append((node.name, reason))
        log.warning("pmkvq: leaving %s unchanged: %s", node.name, reason)

    def layer_state(self, layer: int, batch: int, device: torch.device) -> LayerState:
        st = self.states.get(layer)
        if st is None:
            st = self.states[layer] = LayerState.allocate(self.plan, layer, batch, device)
        elif st.arena.shape[0] != batch or st.arena.device != device:
            raise ValueError(
                f"layer {layer}: the packed cache holds batch {st.arena.shape[0]} on {st.arena.device}; a graph "
                f"with batch {batch} on {device} needs a new backend (pmkvq_compile.backend(plan))"
            )
        return st


def _is_impure(node: fx.Node) -> bool:
    """FX's own rule plus in-place methods (``x.index_copy_(...)``) and mutating ops, which FX would delete."""
    if node.is_impure():
        return True
    if node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_"):
        return True
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    """What every pass ends with: dead-code elimination (keeping every mutation), lint, recompile."""
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    gm.graph.lint()
    gm.recompile()
    return gm
