"""Pass 2: serve each matched attention node from the packed progressive cache.

For every :class:`~pmkvq_compile.passes.context.AttentionSite` found by pass 1, in front of the attention node::

    pmkvq::restart(state, positions, layout)          # a sequence starting at position 0 forgets the old one
    pmkvq::append(arena, state, table, k_new, v_new, key_scale, layout)
    lengths = state[0] - T                            # past tokens, per row
    out = pmkvq::decode_attention(q[:, :, 0], ...)    # one query (unsqueezed back), or
    out = pmkvq::prefill_attention(q, ...)            # many queries, causal

``k_new``/``v_new`` are the tokens the graph wrote into its float cache, before any GQA expansion, so K/V are
read once per group; the float-cache writes are deleted and the expansion becomes dead code. The arena, state,
table (and key scale, when the plan keeps it unfolded) become new graph inputs, listed in ``ctx.extra_inputs``
in placeholder order. Declines nothing: pass 1 did the choosing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from .. import ops as _ops  # noqa: F401  (registers the pmkvq:: ops)
from .context import PassContext, finish

__all__ = ["restart", "rewrite_attention"]

aten = torch.ops.aten
_CONTIG = {"memory_format": torch.contiguous_format}


@torch.library.custom_op("pmkvq::restart", mutates_args=("state",))
def restart(state: torch.Tensor, positions: torch.Tensor, init_bits: int) -> None:
    """Reset ``state`` (int32 [8]) to empty when the first written position is 0; no host sync."""
    keep = (positions.reshape(-1)[:1] != 0).to(state.dtype)  # [1]
    fresh = torch.zeros_like(state)
    fresh[3:5] = init_bits
    state.copy_(state * keep + fresh * (1 - keep))


@restart.register_fake
def _(state: torch.Tensor, positions: torch.Tensor, init_bits: int) -> None:
    return None


@torch.library.custom_op("pmkvq::restart_always", mutates_args=("state",))
def restart_always(state: torch.Tensor, init_bits: int) -> None:
    """Reset ``state`` to empty (a graph whose cat-cache past is empty starts a sequence)."""
    state.zero_()
    state[3:5] = init_bits


@restart_always.register_fake
def _(state: torch.Tensor, init_bits: int) -> None:
    return None


def _last_placeholder(graph: fx.Graph) -> fx.Node:
    last = None
    for n in graph.nodes:
        if n.op == "placeholder":
            last = n
    assert last is not None
    return last


def _emit_registered(emit: Any, site: Any, handle: int) -> fx.Node:
    restart = 2 if site.restart else (1 if site.position is not None else 0)
    k = emit(aten.reshape.default, emit(aten.clone.default, site.k_new, **_CONTIG), list(site.kv_shape))
    v = emit(aten.reshape.default, emit(aten.clone.default, site.v_new, **_CONTIG), list(site.kv_shape))
    lengths = emit(torch.ops.pmkvq.append_registered.default, k, v, site.position, handle, restart)
    return emit(torch.ops.pmkvq.attention_registered.default, site.q, k, v, lengths, handle, site.scale)


def _replace(graph: fx.Graph, site: Any, out: fx.Node) -> None:
    node = site.node
    out.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    if site.tuple_output:
        for user in list(node.users):
            user.replace_all_uses_with(out)
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(out)
    graph.erase_node(node)
    for w in site.writes:
        if not w.users:
            graph.erase_node(w)


def rewrite_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Replace every site in ``ctx.sites`` (see the module docstring)."""
    graph = gm.graph
    inputs: dict[int, list[fx.Node]] = {}
    mode = None
    if ctx.attach == "handle":  # Inductor lowers with fake tensors: new nodes need fake values
        mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])

    def emit(target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        n = graph.call_function(target, args, kwargs)
        if mode is not None:
            fa, fk = fx.node.map_arg((args, kwargs), lambda a: a.meta.get("val"))
            with mode:
                n.meta["val"] = target(*fa, **fk)
        return n

    for site in ctx.sites:
        kval = site.k_new.meta.get("example_value", site.k_new.meta.get("val"))
        st = ctx.layer_state(site.layer, site.batch, kval.device)
        if ctx.attach == "handle":
            with graph.inserting_before(site.node):
                out = _emit_registered(emit, site, ctx.handle(site.layer))
            _replace(graph, site, out)
            continue
        if site.layer not in inputs:
            nodes = []
            for name, tensor in zip(("arena", "state", "table", "key_scale"), st.tensors()):
                with graph.inserting_after(_last_placeholder(graph)):
                    ph = graph.placeholder(f"pmkvq_{name}_{site.layer}")
                ph.meta["val"] = ph.meta["example_value"] = tensor
                ctx.extra_inputs.append(tensor)
                nodes.append(ph)
            inputs[site.layer] = nodes
        arena, state, table, *ks = inputs[site.layer]
        key_scale = ks[0] if ks else None
        layout = st.layout.to_list()
        node = site.node
        with graph.inserting_before(node):
            if site.restart:
                emit(torch.ops.pmkvq.restart_always.default, state, st.layout.init_bits)
            elif site.position is not None:
                emit(torch.ops.pmkvq.restart.default, state, site.position, st.layout.init_bits)
            k = emit(
                aten.reshape.default, emit(aten.clone.default, site.k_new, **_CONTIG), list(site.kv_shape)
            )
            v = emit(
                aten.reshape.default, emit(aten.clone.default, site.v_new, **_CONTIG), list(site.kv_shape)
            )
            emit(torch.ops.pmkvq.append.default, arena, state, table, k, v, key_scale, layout)
            n_tok = emit(aten.slice.Tensor, state, 0, 0, 1)
            past = emit(aten.sub.Tensor, n_tok, site.q_len)
            lengths = emit(aten.clone.default, emit(aten.expand.default, past, [site.batch]), **_CONTIG)
            if site.q_len == 1:
                q = emit(aten.clone.default, emit(aten.select.int, site.q, 2, 0), **_CONTIG)
                args = (q, k, v, arena, state, table, lengths, key_scale, layout, site.scale, 0)
                out = emit(aten.unsqueeze.default, emit(torch.ops.pmkvq.decode_attention.default, *args), 2)
            else:
                q = emit(aten.clone.default, site.q, **_CONTIG)
                args = (q, k, v, arena, state, table, lengths, key_scale, layout, site.scale)
                out = emit(torch.ops.pmkvq.prefill_attention.default, *args)
        _replace(graph, site, out)
    return finish(gm)
