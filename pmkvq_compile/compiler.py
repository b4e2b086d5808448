"""The ways into the graph passes: a Dynamo backend, an Inductor custom pass, and ``compile(model, plan)``."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .packed_cache import PackedKVCache, use_packed_cache
from .passes import LayerState, PassContext, run_passes
from .plan import Plan

log = logging.getLogger("pmkvq_compile")

__all__ = ["PmkvqBackend", "PmkvqCompiledModel", "PmkvqInductorPass", "backend", "compile", "inductor_pass"]


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
        self._check_consistent(ctx)
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

    def _check_consistent(self, ctx: PassContext) -> None:
        """A layer served from the packed cache in one graph and from its float cache in another would read a
        cache the other graph never wrote: refuse that instead of computing wrong numbers."""
        served = {s.layer for s in ctx.sites} | {s.layer for c in self.contexts for s in c.sites}
        declined = dict(ctx.declined_cache_layers)
        for c in self.contexts:
            declined.update(c.declined_cache_layers)
        both = sorted(served & set(declined))
        if both:
            raise ValueError(
                f"layer {both[0]} is served from the packed cache in one graph but declined in another "
                f"({declined[both[0]]}); its float and packed caches would diverge. For transformers models use "
                "pmkvq_compile.compile(model, plan), which needs no mask"
            )

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
        return self.states[layer].body_bits()


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


class PmkvqCompiledModel:
    """A transformers decoder (Llama, Qwen2, Mistral, ...) running PM-KVQ through the fused ops.

    Prefill runs eagerly (its shape changes with every prompt); each decode step is one
    ``torch.compile(fullgraph=True, dynamic=False)`` graph, traced once: the cache state lives in device tensors
    (:class:`~pmkvq_compile.packed_cache.PackedKVCache`), so neither the step number nor the body's bit-width
    causes a recompile. ``mode="reduce-overhead"`` replays the step as a CUDA graph on the GPU.

    Refuses: padded batches (all rows must share a length), sliding-window or soft-capped attention, plans made
    for another model.
    """

    def __init__(self, model: Any, plan: Plan, *, batch_size: int = 1, **compile_kwargs: Any) -> None:
        from .attention import register
        from .models import cache_kwarg

        if not isinstance(plan, Plan):
            raise ValueError(f"plan must be a pmkvq_compile.Plan, got {type(plan).__name__}")
        config = getattr(model, "config", None)
        if config is None or not hasattr(model, "generate"):
            raise ValueError(
                f"compile(model, plan) takes a transformers causal LM, got {type(model).__name__}; for any other "
                "nn.Module use torch.compile(module, backend=pmkvq_compile.backend(plan))"
            )
        plan.check_model(config)
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            raise ValueError(
                f"sliding_window={config.sliding_window}: sliding-window attention is not served"
            )
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, name, None):
                raise ValueError(f"{name}={getattr(config, name)}: soft-capped attention is not served")
        register()
        self.model, self.plan, self.batch_size = model, plan, batch_size
        self._cache_key = cache_kwarg(model)
        params = inspect.signature(model.forward).parameters
        self._takes_cache_position = "cache_position" in params
        self._takes_logits_to_keep = "logits_to_keep" in params
        kw = {"fullgraph": True, "dynamic": False, **compile_kwargs}
        self._step = torch.compile(self._forward_last, **kw)
        self.cache: PackedKVCache | None = None

    def new_cache(self) -> PackedKVCache:
        """A fresh packed cache for ``batch_size`` sequences on the model's device."""
        dev = next(self.model.parameters()).device
        return PackedKVCache(self.plan, self.model.config, batch_size=self.batch_size, device=dev)

    def _forward_last(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: PackedKVCache
    ) -> torch.Tensor:
        kw: dict[str, Any] = {self._cache_key: cache, "position_ids": position_ids, "use_cache": True}
        if self._takes_cache_position:
            kw["cache_position"] = position_ids[0]
        if self._takes_logits_to_keep:
            kw["logits_to_keep"] = 1
        return self.model(input_ids, **kw).logits[:, -1, :]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Start a sequence: a new cache, the prompt ``[B, T]`` run eagerly. Returns the last logits ``[B, V]``.

        Raises ValueError for a padded ``attention_mask`` or a batch other than ``batch_size``, and
        BudgetExceededError when the plan cannot hold the prompt even at 2 bits.
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise ValueError(
                f"input_ids must be [{self.batch_size}, T] (batch_size), got {tuple(input_ids.shape)}"
            )
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not served by the compiled path; give equal-length prompts")
        cache = self.new_cache()
        cache.check_room(input_ids.shape[1])
        self.cache = cache
        b, t = input_ids.shape
        pos = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)
        with self._active(cache):
            return self._forward_last(input_ids, pos, cache)  # eager: the prompt's shape varies

    @torch.no_grad()
    def decode(self, next_ids: torch.Tensor) -> torch.Tensor:
        """One compiled decode step: ``next_ids [B, 1]`` -> logits ``[B, V]``; BudgetExceededError before a step
        the plan cannot hold."""
        cache = self.cache
        if cache is None:
            raise ValueError("call prefill() (or generate()) before decode()")
        if next_ids.shape != (self.batch_size, 1):
            raise ValueError(f"next_ids must be [{self.batch_size}, 1], got {tuple(next_ids.shape)}")
        cache.check_room(1)
        n = cache.get_seq_length()
        pos = torch.full((self.batch_size, 1), n, device=next_ids.device, dtype=torch.long)
        with self._active(cache):
            logits = self._step(next_ids, pos, cache)
        cache.advance(1)
        return logits

    @contextlib.contextmanager
    def _active(self, cache: PackedKVCache) -> Iterator[None]:
        from .attention import PACKED_IMPLEMENTATION, use_pmkvq_attention

        with use_pmkvq_attention(self.model, PACKED_IMPLEMENTATION), use_packed_cache(cache):
            yield

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Greedy or sampled generation: ``input_ids [B, T]`` -> ``[B, T + new]`` (stops early at ``eos_token_id``).

        Refuses what :meth:`prefill` refuses; BudgetExceededError before a step the plan cannot hold.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        logits = self.prefill(input_ids, attention_mask)
        out = [input_ids]
        finished = torch.zeros(input_ids.shape[0], 1, dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            nxt = self._pick(logits, do_sample, temperature, top_k, generator)
            if (
                eos_token_id is not None
            ):  # rows that already ended keep emitting eos, as transformers pads them
                nxt = nxt.masked_fill(finished, eos_token_id)
                finished |= nxt == eos_token_id
            out.append(nxt)
            if bool(finished.all()) or i == max_new_tokens - 1:
                break
            logits = self.decode(nxt)
        return torch.cat(out, dim=1)

    @staticmethod
    def _pick(
        logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, gen: Any
    ) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(-1, keepdim=True)
        scores = logits.float() / max(temperature, 1e-5)
        if top_k > 0:
            kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        return torch.multinomial(scores.softmax(-1), 1, generator=gen)


def compile(
    model: Any, plan: Plan, *, batch_size: int = 1, **torch_compile_kwargs: Any
) -> PmkvqCompiledModel:
    """Compile a transformers decoder for PM-KVQ; ``torch_compile_kwargs`` go to ``torch.compile`` (e.g. ``mode``)."""
    return PmkvqCompiledModel(model, plan, batch_size=batch_size, **torch_compile_kwargs)
