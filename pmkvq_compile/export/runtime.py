"""``OrtGenerator``: greedy and sampled generation from an exported directory with ONNX Runtime.

The cache state lives in ``OrtValue`` s for the whole generation: each step binds the previous step's
``present.*`` outputs as its ``past_key_values.*`` inputs through IOBinding, allocated on the session's
device (CUDA when the CUDA execution provider is active, else CPU); only ``logits`` come back to the host.
The host keeps a mirror of the progressive schedule (:mod:`pmkvq_compile.export.schedule`) so that it knows,
without reading the device, when a step flushes the window (standard flavor: ``prepare.onnx`` runs first for
that layer, ERS-shrinking the body to the bits the eager cache has after that step) and refuses a step the
budget cannot hold (:class:`~pmkvq_compile.cache.BudgetExceededError`), as the eager cache does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from ..kernels.layout import ArenaLayout
from ..plan import Plan
from .exporter import FORMAT, FORMAT_VERSION, MANIFEST
from .schedule import LayerMirror, plan_step
from .step import state_specs

__all__ = ["OrtGenerator"]

_NP = {"torch.uint8": np.uint8, "torch.int32": np.int32, "torch.float32": np.float32}


class OrtGenerator:
    """Run an exported decoder (see :func:`pmkvq_compile.export.to_onnx`).

    Args:
        out_dir: the directory ``to_onnx`` wrote.
        providers: ONNX Runtime execution providers (default: CUDA first when available; the custom flavor
            runs on the CPU only, its ops being Python ops).
        plan: the standard flavor can run another plan with the same sink/window/group settings and no
            key scales (its graphs depend on those only); default the exported plan.
        threads: intra-op threads (default ONNX Runtime's choice).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        providers: Sequence[str] | None = None,
        plan: Plan | None = None,
        threads: int | None = None,
    ) -> None:
        d = Path(out_dir)
        mf = d / MANIFEST
        if not mf.is_file():
            raise ValueError(f"{str(d)!r} is not a complete pmkvq ONNX export (no {MANIFEST})")
        self.manifest: dict[str, Any] = json.loads(mf.read_text())
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"{str(mf)!r} is not a {FORMAT} v{FORMAT_VERSION} manifest")
        self.dir = d
        self.flavor: str = self.manifest["flavor"]
        exported = Plan.load(d / "plan")
        if plan is not None and self.manifest["flavor"] != "standard":
            raise ValueError("only a standard-flavor export can run another plan; export again with it")
        self.plan = exported if plan is None else self._check_replan(exported, plan)
        self.layouts = [ArenaLayout.from_plan(self.plan, i) for i in range(len(self.plan.layers))]
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        avail = ort.get_available_providers()
        if self.flavor == "custom":
            from .custom import register_ort_ops, session_bytes

            so.register_custom_ops_library(register_ort_ops())
            self.session = ort.InferenceSession(
                session_bytes(str(d / "decoder.onnx")), so, providers=["CPUExecutionProvider"]
            )
            self.prepare_session = None
        else:
            chosen = list(providers) if providers else [p for p in ("CUDAExecutionProvider",) if p in avail]
            chosen = [*chosen, "CPUExecutionProvider"] if "CPUExecutionProvider" not in chosen else chosen
            self.session = ort.InferenceSession(str(d / "decoder.onnx"), so, providers=chosen)
            self.prepare_session = ort.InferenceSession(str(d / "prepare.onnx"), so, providers=chosen)
        on_gpu = "CUDAExecutionProvider" in self.session.get_providers()
        self.device = "cuda" if on_gpu else "cpu"
        self.state_names: list[str] = self.manifest["state_per_layer"]
        self.eos: list[int] = list(self.manifest.get("eos_token_id") or [])
        self.state: list[list[ort.OrtValue]] = []
        self.mirror: list[LayerMirror] = []
        self.mask = np.zeros((1, 0), dtype=np.int64)

    @staticmethod
    def _check_replan(exported: Plan, plan: Plan) -> Plan:
        """The standard graphs depend on the plan only through these settings and the key scales."""
        same = (
            "n_sink",
            "n_window",
            "sink_bits",
            "window_bits",
            "init_bits",
            "group_size",
            "key_scales_folded",
        )
        diff = [
            f"{k}: {getattr(plan, k)} vs exported {getattr(exported, k)}"
            for k in same
            if getattr(plan, k) != getattr(exported, k)
        ]
        for i, (a, b) in enumerate(zip(plan.layers, exported.layers)):
            if (a.key_scale is None) != (b.key_scale is None) or (
                a.key_scale is not None and not torch.equal(a.key_scale, b.key_scale)
            ):
                diff.append(f"layers[{i}].key_scale differs (key scales are baked into the graph)")
                break
        if diff:
            raise ValueError(
                "this export cannot run that plan (" + "; ".join(diff) + "); export again with it"
            )
        plan.check_model(exported.geometry)
        return plan

    # ---- state -------------------------------------------------------------------------------------------
    def reset(self, batch_size: int = 1) -> None:
        """Empty cache state for ``batch_size`` rows."""
        self.state = []
        for i, lay in enumerate(self.layouts):
            tensors = []
            for s in state_specs(self.plan, i, self.flavor):
                a = np.zeros(s.concrete(batch_size), dtype=_NP[str(s.dtype)])
                if s.name == "state":
                    a[3:5] = lay.init_bits
                tensors.append(ort.OrtValue.ortvalue_from_numpy(a, self.device, 0))
            self.state.append(tensors)
        self.mirror = [LayerMirror.empty(lay) for lay in self.layouts]
        self.mask = np.zeros((batch_size, 0), dtype=np.int64)

    @property
    def n_tokens(self) -> int:
        return self.mirror[0].n_tokens if self.mirror else 0

    def body_bits(self, layer: int) -> tuple[int, int]:
        """Current (key, value) bits of ``layer``'s body (host mirror)."""
        m = self.mirror[layer]
        return m.key_bits, m.value_bits

    def _prepare(self, layer: int, key_bits: int, value_bits: int) -> None:
        assert self.prepare_session is not None
        st = self.state[layer]
        idx = {n: j for j, n in enumerate(self.state_names)}
        io = self.prepare_session.io_binding()
        for name in (
            "window.key",
            "window.value",
            "window.meta",
            "body.key",
            "body.value",
            "body.meta",
            "state",
        ):
            io.bind_ortvalue_input(name, st[idx[name]])
        io.bind_cpu_input("target_bits", np.array([key_bits, value_bits], dtype=np.int32))
        outs = ("body.key", "body.value", "body.meta", "state")
        for name in outs:
            io.bind_output(f"{name}.out", self.device)
        self.prepare_session.run_with_iobinding(io)
        for name, val in zip(outs, io.get_outputs()):
            st[idx[name]] = val

    # ---- one step ----------------------------------------------------------------------------------------
    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Run ``input_ids [B, T]`` (int64) through the decoder, storing them; returns logits float32 [B, T, V].

        ``attention_mask [B, T]`` (1 = real token, 0 = left padding) defaults to ones.
        """
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [B, T] with T >= 1, got shape {ids.shape}")
        b, t = ids.shape
        if not self.state:
            self.reset(b)
        if b != self.mask.shape[0]:
            raise ValueError(f"the cache holds batch {self.mask.shape[0]}, got input_ids of batch {b}")
        new_mask = (
            np.ones((b, t), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        )
        plans = [plan_step(lay, m, t, i) for i, (lay, m) in enumerate(zip(self.layouts, self.mirror))]
        if self.flavor == "standard":
            for i, sp in enumerate(plans):
                if sp.n_flush:
                    self._prepare(i, sp.key_bits, sp.value_bits)
        mask = np.concatenate([self.mask, new_mask], axis=1)
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -t:].astype(np.int64)
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", np.ascontiguousarray(pos))
        io.bind_output("logits", "cpu")
        for i, tensors in enumerate(self.state):
            for name, val in zip(self.state_names, tensors):
                io.bind_ortvalue_input(f"past_key_values.{i}.{name}", val)
                io.bind_output(f"present.{i}.{name}", self.device)
        self.session.run_with_iobinding(io)
        outs = io.get_outputs()
        n = len(self.state_names)
        for i in range(len(self.state)):
            self.state[i] = list(outs[1 + i * n : 1 + (i + 1) * n])
        self.mirror = [sp.after for sp in plans]
        self.mask = mask
        return outs[0].numpy()

    # ---- generation --------------------------------------------------------------------------------------
    def generate(
        self,
        input_ids: Sequence[Sequence[int]] | np.ndarray,
        max_new_tokens: int,
        *,
        attention_mask: np.ndarray | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_at_eos: bool = False,
        on_token: Callable[[np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """Generate ``max_new_tokens`` tokens after the prompt ``input_ids [B, T]``; returns int64 ``[B, n]``.

        Greedy by default; ``do_sample`` samples from ``softmax(logits / temperature)`` restricted to the
        ``top_k`` most likely tokens (0 = all) and the ``top_p`` nucleus, with a numpy generator seeded by
        ``seed``. Like transformers' ``generate``, the last generated token is not stored in the cache.
        ``stop_at_eos`` stops when every row produced an end-of-sequence token.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0 when sampling")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        self.reset(ids.shape[0])
        rng = np.random.default_rng(seed)
        out: list[np.ndarray] = []
        logits = self.step(ids, attention_mask)[:, -1]
        done = np.zeros(ids.shape[0], dtype=bool)
        for k in range(max_new_tokens):
            nxt = _sample(logits, rng, temperature, top_k, top_p) if do_sample else logits.argmax(-1)
            out.append(nxt.astype(np.int64))
            if on_token is not None:
                on_token(out[-1])
            done |= np.isin(nxt, self.eos)
            if k == max_new_tokens - 1 or (stop_at_eos and done.all()):
                break
            logits = self.step(out[-1][:, None])[:, -1]
        return np.stack(out, axis=1)


def _sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float):
    z = logits.astype(np.float64) / temperature
    if top_k and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p < 1:
        order = np.argsort(-p, axis=-1)
        sp = np.take_along_axis(p, order, -1)
        keep = np.cumsum(sp, -1) - sp < top_p
        mask = np.zeros_like(p, dtype=bool)
        np.put_along_axis(mask, order, keep, -1)
        p = np.where(mask, p, 0)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])
