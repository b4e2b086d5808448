"""Pattern helpers shared by the graph passes: what an attention node is, where its K/V come from.

Recognised, in Dynamo graphs (torch functions, methods, ``operator.setitem``) and in ATen graphs (after AOT
autograd, functional or not):

* attention: ``F.scaled_dot_product_attention`` (any ``enable_gqa``) and the ATen SDPA ops
  (``aten.scaled_dot_product_attention`` and the backend-specific ``_scaled_dot_product_*`` ops);
* GQA expansion in front of attention (removed by the rewrite so K/V are read once per group):
  ``repeat_interleave(n, dim=1)`` and transformers' ``repeat_kv`` (``x[:, :, None].expand(...).reshape(...)``);
* prefix reads of a static cache: ``cache[:, :, :n]``;
* KV-cache writes: ``index_copy_`` / ``index_copy`` (transformers' ``StaticCache``), ``index_put_`` /
  ``index_put`` and ``cache[:, :, pos] = x`` (gpt-fast), ``cache[:, :, a:b].copy_(x)`` (slice assignment),
  and a hand-written ``torch.cat([past, new], dim=2)`` cache.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten

_SDPA_FUNCS = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
_ATEN_SDPA = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}


@dataclass
class SdpaCall:
    """An attention node, normalised. ``tuple_output``: the node returns a tuple whose item 0 is the output."""

    node: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    attn_mask: Any
    dropout_p: float
    is_causal: bool
    scale: float | None
    enable_gqa: bool
    tuple_output: bool


def as_sdpa(node: fx.Node) -> SdpaCall | None:
    """Normalise ``node`` if it is an SDPA call of any flavour, else None."""
    if node.op != "call_function":
        return None
    t, a, kw = node.target, node.args, node.kwargs

    def arg(i: int, name: str, default: Any) -> Any:
        return a[i] if len(a) > i else kw.get(name, default)

    if t in _SDPA_FUNCS or t is aten.scaled_dot_product_attention.default:
        return SdpaCall(
            node, a[0], a[1], a[2],
            attn_mask=arg(3, "attn_mask", None),
            dropout_p=arg(4, "dropout_p", 0.0),
            is_causal=arg(5, "is_causal", False),
            scale=arg(6, "scale", None),
            enable_gqa=arg(7, "enable_gqa", False),
            tuple_output=False,
        )  # fmt: skip
    if t is aten._scaled_dot_product_flash_attention_for_cpu.default:
        return SdpaCall(node, a[0], a[1], a[2], kw.get("attn_mask"), arg(3, "dropout_p", 0.0),
                        arg(4, "is_causal", False), kw.get("scale"), False, True)  # fmt: skip
    if t is aten._scaled_dot_product_flash_attention.default:
        return SdpaCall(node, a[0], a[1], a[2], None, arg(3, "dropout_p", 0.0), arg(4, "is_causal", False),
                        kw.get("scale"), False, True)  # fmt: skip
    if t in (
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
    ):
        return SdpaCall(node, a[0], a[1], a[2], arg(3, "attn_bias", None), arg(5, "dropout_p", 0.0),
                        arg(6, "is_causal", False), kw.get("scale"), False, True)  # fmt: skip
    return None


def _is_call(node: Any, *targets: Any, methods: tuple[str, ...] = ()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in targets:
        return True
    return node.op == "call_method" and node.target in methods


def _full_slice(s: Any) -> bool:
    return isinstance(s, slice) and s == slice(None, None, None)


@dataclass
class Expansion:
    """What lies between a cache tensor and the attention's K/V input."""

    base: fx.Node  # the cache tensor (or the new tokens when there is no cache)
    groups: int = 1  # GQA repetition removed
    prefix_slice: bool = False


def strip_expansion(node: fx.Node) -> Expansion:
    """Walk back from a K/V input through GQA repetition, prefix slices, dtype casts and contiguous()."""
    exp = Expansion(node)
    cur = node
    while True:
        nxt = None
        if _is_call(
            cur, torch.repeat_interleave, aten.repeat_interleave.self_int, methods=("repeat_interleave",)
        ):
            reps = cur.args[1] if len(cur.args) > 1 else cur.kwargs.get("repeats")
            dim = cur.args[2] if len(cur.args) > 2 else cur.kwargs.get("dim")
            if isinstance(reps, int) and dim == 1:
                exp.groups *= reps
                nxt = cur.args[0]
        elif _is_call(cur, torch.reshape, aten.reshape.default, aten.view.default, aten._unsafe_view.default,
                      methods=("reshape", "view")):  # fmt: skip
            src = cur.args[0]
            if _is_call(src, aten.clone.default, methods=("contiguous",)):
                src = src.args[0]
            if _is_call(src, aten.expand.default, methods=("expand",)):
                sizes = src.args[1:] if src.op == "call_method" else src.args[1]
                if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                    sizes = sizes[0]
                inner = src.args[0]
                unsq = None
                if _is_call(inner, operator.getitem) and isinstance(inner.args[1], tuple):
                    idx = inner.args[1]
                    if len(idx) >= 3 and _full_slice(idx[0]) and _full_slice(idx[1]) and idx[2] is None:
                        unsq = inner.args[0]
                elif _is_call(inner, aten.unsqueeze.default, methods=("unsqueeze",)) and inner.args[1] == 2:
                    unsq = inner.args[0]
                elif (
                    _is_call(inner, aten.slice.Tensor)
                    and _is_call(inner.args[0], aten.unsqueeze.default)
                    and inner.args[0].args[1] == 2
                ):
                    unsq = inner.args[0].args[0]
                if unsq is not None and len(sizes) == 5 and isinstance(sizes[2], int):
                    exp.groups *= sizes[2]
                    nxt = unsq
        elif _is_call(cur, operator.getitem) and isinstance(cur.args[1], tuple):
            idx = cur.args[1]
            # cache[:, :, :n] or cache[:, :, :n, :]
            if (
                len(idx) in (3, 4)
                and _full_slice(idx[0])
                and _full_slice(idx[1])
                and isinstance(idx[2], slice)
                and idx[2].start in (None, 0)
                and idx[2].step in (None, 1)
                and all(_full_slice(s) for s in idx[3:])
            ):
                exp.prefix_slice = True
                nxt = cur.args[0]
        elif (
            _is_call(cur, aten.slice.Tensor)
            and cur.args[1] == 2
            and (len(cur.args) < 3 or cur.args[2] in (0, None))
        ):
            exp.prefix_slice = True
            nxt = cur.args[0]
        elif _is_call(
            cur, aten.clone.default, aten._to_copy.default, methods=("contiguous", "to", "type_as")
        ):
            nxt = cur.args[0]
        if not isinstance(nxt, fx.Node):
            break
        cur = nxt
    exp.base = cur
    return exp


@dataclass
class CacheWrite:
    """A write of the step's new K or V tokens into a cache tensor."""

    kind: str  # "index_copy", "index_put", "setitem", "slice_copy", "cat"
    nodes: list[fx.Node]  # the write node(s) to delete when the float cache goes
    value: fx.Node  # the new tokens [B, Hkv, T, D]
    position: Any  # the positions written (a node), or None for "cat"
    result: fx.Node | None = None  # functional writes (ATen index_put/index_copy): the updated cache


def _order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def find_cache_write(base: fx.Node, before: fx.Node) -> CacheWrite | None:
    """The write of new tokens into ``base`` that precedes ``before``, or ``base`` itself as a cat cache."""
    if _is_call(base, torch.cat, aten.cat.default):
        parts = base.args[0]
        dim = base.args[1] if len(base.args) > 1 else base.kwargs.get("dim", 0)
        if isinstance(parts, (list, tuple)) and len(parts) == 2 and dim in (2, -2):
            return CacheWrite("cat", [], parts[1], None, result=base)
        return None

    # functional ATen writes: base is the write's result, copied back into the input buffer at the end
    def functional(kind: str, value: Any, position: Any) -> CacheWrite:
        epilogue = [u for u in base.users if _is_call(u, aten.copy_.default) and u.args[1] is base]
        return CacheWrite(kind, [*epilogue, base], value, position, result=base)

    if _is_call(base, aten.index_copy.default) and base.args[1] in (2, -2):
        return functional("index_copy", base.args[3], base.args[2])
    if _is_call(base, aten.index_put.default):
        idx = base.args[1]
        if len(idx) == 3 and idx[0] is None and idx[1] is None:
            return functional("index_put", base.args[2], idx[2])
    order = _order(base.graph)
    limit = order[before]
    writes: list[CacheWrite] = []
    for user in base.users:
        if order[user] > limit:
            continue
        if _is_call(user, aten.index_copy_.default, methods=("index_copy_",)) and user.args[0] is base:
            if user.args[1] in (2, -2):
                writes.append(CacheWrite("index_copy", [user], user.args[3], user.args[2]))
        elif _is_call(user, aten.index_put_.default, methods=("index_put_",)) and user.args[0] is base:
            idx = user.args[1]
            if isinstance(idx, (tuple, list)) and len(idx) == 3 and idx[0] is None and idx[1] is None:
                writes.append(CacheWrite("index_put", [user], user.args[2], idx[2]))
        elif _is_call(user, operator.setitem) and user.args[0] is base and isinstance(user.args[1], tuple):
            idx = user.args[1]
            if (
                len(idx) in (3, 4)
                and _full_slice(idx[0])
                and _full_slice(idx[1])
                and all(_full_slice(s) for s in idx[3:])
            ):
                writes.append(CacheWrite("setitem", [user], user.args[2], idx[2]))
        elif _is_call(user, operator.getitem) and isinstance(user.args[1], tuple):
            idx = user.args[1]
            copies = [
                u
                for u in user.users
                if _is_call(u, aten.copy_.default, methods=("copy_",)) and u.args[0] is user
            ]
            if (
                copies
                and len(idx) >= 3
                and _full_slice(idx[0])
                and _full_slice(idx[1])
                and isinstance(idx[2], slice)
            ):
                writes.append(CacheWrite("slice_copy", [copies[0], user], copies[0].args[1], idx[2]))
    if len(writes) != 1:
        return None
    return writes[0]


_LAYER_RE = re.compile(r"(?:^|[.\[])(\d+)(?:[.\]]|$)")


def module_path(node: fx.Node) -> str:
    """The innermost module path that produced ``node`` (from Dynamo's ``nn_module_stack``), or ''."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['[^']*'\]\.?", "", str(path))
    path = re.sub(r"^(args|kwargs)\[\d+\]\.?|^\[\d+\]\.?", "", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).strip(".")


def layer_index(path: str) -> int | None:
    """The decoder layer a module path belongs to: the first integer component (``model.layers.3.attn`` -> 3)."""
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else None
