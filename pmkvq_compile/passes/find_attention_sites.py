"""Pass 1: find the attention nodes the plan can serve exactly, and decline the rest with a reason.

Matches every SDPA node (:func:`pmkvq_compile.passes.match.as_sdpa`) whose K and V are fed, through optional
GQA expansion (``repeat_interleave`` / ``repeat_kv``) and prefix slices, by a KV-cache write of the step's new
tokens (``index_copy_``, ``index_put_``, ``cache[:, :, pos] = x``, slice ``copy_``, or ``torch.cat``). Maps the
node to its plan layer by module path (``...layers.3...`` -> layer 3), never by counting.

Declines, logging one line naming the node and the reason, and leaves the node untouched:
attention with dropout; K/V not fed by a cache write (cross-attention, attention without a cache);
a mask that is not the causal mask (sliding-window, padding or custom masks); a non-causal multi-query
call without a mask; soft-capped attention never reaches SDPA; a module path with no layer index, or an index
outside the plan; K/V whose heads or head_dim differ from the plan's geometry.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from .context import AttentionSite, PassContext, finish
from .match import as_sdpa, find_cache_write, layer_index, module_path, strip_expansion

__all__ = ["find_attention_sites"]


def _val(node: Any) -> Any:
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def _placeholder_value(node: fx.Node, ctx: PassContext) -> Any:
    placeholders = [n for n in node.graph.nodes if n.op == "placeholder"]
    i = placeholders.index(node)
    if i < len(ctx.example_inputs):
        return ctx.example_inputs[i]
    return None


_ATEN_NEG_INF_MASK = (
    torch.ops.aten.where.self,
    torch.ops.aten.where.ScalarOther,
    torch.ops.aten.where.Scalar,
)


def _is_causal_mask(mask: Any, position: Any, ctx: PassContext) -> bool:
    """True when ``mask`` is rows ``position`` of a lower-triangular boolean buffer (gpt-fast's causal mask).

    Dynamo graphs: ``buf[None, None, pos]``, the buffer's values checked (example inputs are real). ATen
    graphs: ``where(index(unsqueeze(unsqueeze(buf)), [None, None, pos]), 0, -inf)``; Inductor's post-grad pass
    sees no values, so there a square boolean buffer indexed by the written positions is taken to be the causal
    mask (gpt-fast's convention).
    """
    if not isinstance(mask, fx.Node) or position is None:
        return False
    cur = mask
    if cur.op == "call_function" and cur.target in _ATEN_NEG_INF_MASK:
        fill = [a.args[1] if isinstance(a, fx.Node) and a.target is torch.ops.aten.full.default else a
                for a in cur.args[1:3]]  # fmt: skip
        if fill != [0.0, float("-inf")]:
            return False
        cur = cur.args[0]
    rows_by_position = False
    while cur.op == "call_function":
        if cur.target is operator.getitem or cur.target is torch.ops.aten.index.Tensor:
            idx = cur.args[1]
            if isinstance(idx, (tuple, list)):
                if any(i is position for i in idx):
                    rows_by_position = True
                elif not all(i is None or isinstance(i, slice) for i in idx):
                    return False
            elif idx is position:
                rows_by_position = True
            else:
                return False
        elif cur.target is not torch.ops.aten.unsqueeze.default or cur.args[1] not in (0, 1):
            return False
        cur = cur.args[0]
    if cur.op == "get_attr":
        value = getattr(cur.graph.owning_module, str(cur.target), None)
    elif cur.op == "placeholder":
        value = _placeholder_value(cur, ctx)
    else:
        return False
    if value is None and ctx.attach == "handle":
        value = cur.meta.get("val")  # a fake tensor: shape and dtype only
        return (
            rows_by_position
            and isinstance(value, torch.Tensor)
            and value.dtype == torch.bool
            and value.dim() == 2
            and value.shape[0] == value.shape[1]
        )
    if (
        not rows_by_position
        or not isinstance(value, torch.Tensor)
        or value.dtype != torch.bool
        or value.dim() != 2
    ):
        return False
    if value.shape[0] != value.shape[1] or type(value) is not torch.Tensor:
        return False
    return bool(torch.equal(value, torch.ones_like(value).tril()))


def find_attention_sites(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Annotate ``ctx.sites`` with the attention nodes to rewrite (see the module docstring)."""
    geo = ctx.plan.geometry
    for node in list(gm.graph.nodes):
        call = as_sdpa(node)
        if call is None:
            continue
        if call.dropout_p:
            ctx.decline(node, f"attention with dropout_p={call.dropout_p}")
            continue
        if call.tuple_output and any(
            not (u.target is operator.getitem and u.args[1] == 0) for u in node.users
        ):
            ctx.decline(node, "the attention's log-sum-exp output is used")
            continue
        ek, ev = strip_expansion(call.k), strip_expansion(call.v)
        wk, wv = find_cache_write(ek.base, node), find_cache_write(ev.base, node)
        if wk is None or wv is None or wk.kind != wv.kind:
            ctx.decline(node, "no KV-cache write feeds K/V (cross-attention or attention without a cache)")
            continue
        path = module_path(node)
        layer = layer_index(path)
        if layer is None or not 0 <= layer < geo.num_layers:
            ctx.decline(node, f"module path {path!r} names no layer of the plan (0..{geo.num_layers - 1})")
            continue
        qv, kv, cache_v = _val(call.q), _val(wk.value), _val(ek.base)
        if qv is None or kv is None or qv.dim() != 4:
            ctx.decline(node, "q/k shapes are unknown or not [B, H, T, D]")
            continue
        b, hq, tq, d = qv.shape
        if kv.dim() != 4 and cache_v is not None and cache_v.dim() == 4:
            # ATen decompositions may write a squeezed view ([Hkv, T, D] for batch 1): the cache says [B, Hkv, ., D]
            cb, chkv, _, cd = cache_v.shape
            if kv.numel() != cb * chkv * tq * cd:
                ctx.decline(node, f"cannot read the written K of shape {tuple(kv.shape)} as [B, Hkv, T, D]")
                continue
            hkv, tk, dk = chkv, tq, cd
        elif kv.dim() == 4:
            _, hkv, tk, dk = kv.shape
        else:
            ctx.decline(node, "q/k shapes are unknown or not [B, H, T, D]")
            continue
        if (hkv, dk) != (geo.num_kv_heads, geo.head_dim) or d != dk or hq % hkv:
            ctx.decline(
                node,
                f"K/V of {hkv} heads x {dk} (q {hq} heads) do not match the plan's {geo.num_kv_heads} KV heads x "
                f"{geo.head_dim}",
            )
            continue
        groups = hq // hkv
        if ek.groups != groups and not (call.enable_gqa and ek.groups == 1):
            ctx.decline(node, f"K is expanded {ek.groups}x but q has {groups} heads per KV head")
            continue
        if tq != tk:
            ctx.decline(node, f"{tq} queries for {tk} new keys: not self-attention over a cache")
            continue
        restart = False
        position = wk.position
        if wk.kind == "cat":
            past = _val(wk.result.args[0][0])
            restart = past is not None and past.shape[2] == 0
        elif isinstance(
            position, slice
        ):  # cache[:, :, a:b] = x: a graph specialised on a (0 starts a sequence)
            if isinstance(position.start, fx.Node):
                ctx.decline(node, "a cache slice with a symbolic start is not served")
                continue
            restart, position = position.start in (None, 0), None
        full_k = _val(call.k)
        if call.attn_mask is None and call.is_causal and tq > 1 and (full_k is None or full_k.shape[2] != tq):
            # SDPA's is_causal aligns queries to the first keys: with a past that is not PM-KVQ's causal
            ctx.decline(node, f"is_causal with {tq} queries over a longer K (top-left aligned causal mask)")
            ctx.declined_cache_layers[layer] = "is_causal over a past"
            continue
        if call.attn_mask is None:
            causal = call.is_causal or tq == 1
        else:
            causal = not call.is_causal and _is_causal_mask(call.attn_mask, wk.position, ctx)
        if not causal:
            what = (
                "no mask and is_causal=False"
                if call.attn_mask is None
                else "a mask that is not the causal mask"
            )
            reason = f"{tq} queries with {what} (sliding-window, padding or custom masks are not served)"
            ctx.decline(node, reason)
            ctx.declined_cache_layers[layer] = reason
            continue
        ctx.sites.append(
            AttentionSite(
                node=node,
                layer=layer,
                q=call.q,
                k_new=wk.value,
                v_new=wv.value,
                position=position,
                restart=restart,
                writes=[*wk.nodes, *wv.nodes],
                scale=float(call.scale) if call.scale is not None else 1.0 / math.sqrt(d),
                tuple_output=call.tuple_output,
                q_len=tq,
                batch=b,
                kv_shape=(b, hkv, tq, dk),
            )
        )
    return finish(gm)
