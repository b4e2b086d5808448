"""The plan: frozen, validated, versioned per-layer bit-widths and byte budgets.

A plan is saved as a directory holding ``plan.json`` (everything but tensors) and ``tensors.safetensors``
(optional per-layer key reparameterization scales). Nothing is pickled.

The memory model (used by the cache, the integer program, the evaluation) counts codes *and* the scale and
zero of every group, for keys and values:

``token_bytes(kb, vb) = Hkv * (D * kb / 8 + D * vb / 8 + 4 * m * (D / group_size))``

with ``m`` = 4 bytes (float32 scale and zero). A plan with ``scale_dtype="float16"`` stores the scale and zero
of tokens whose codes have at most 8 bits (both K and V) as float16 (``m`` = 2), as KIVI does; 16-bit tokens
keep float32 (a float16 zero point would swamp 16-bit codes).

A layer's storage is ``n_sink`` sink tokens at ``sink_bits``, a reserved window of ``n_window`` tokens at
``window_bits`` and a body of whole ``n_window``-token chunks. Its budget at final bits ``(kb, vb)`` is the
bytes of sink + full window + ``(max_len - n_sink) // n_window`` body chunks at ``(kb, vb)``, so a sequence
of ``max_len`` tokens ends with its body at exactly those bits.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .quant import check_bits

__all__ = [
    "FORMAT_VERSION",
    "SCALE_DTYPES",
    "LayerPlan",
    "ModelGeometry",
    "Plan",
    "PlanMismatchError",
    "meta_bytes",
    "meta_dtype",
    "next_body_bits",
    "token_bytes",
]

FORMAT_VERSION = 1
_FORMAT_NAME = "pmkvq-plan"
SCALE_DTYPES: tuple[str, ...] = ("float32", "float16")


class PlanMismatchError(ValueError):
    """A plan was applied to a model whose geometry it was not made for."""


def _pos_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    return int(value)


@dataclass(frozen=True)
class ModelGeometry:
    """What a plan needs to know about a decoder: read from a transformers config (or given directly)."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    max_position_embeddings: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> ModelGeometry:
        """Read a transformers ``PretrainedConfig`` (Llama, Qwen2, Mistral and alike) or a ModelGeometry."""
        if isinstance(config, ModelGeometry):
            return config
        text = getattr(config, "text_config", None)
        if text is not None and not hasattr(config, "num_hidden_layers"):
            config = text
        try:
            layers = int(config.num_hidden_layers)
            heads = int(config.num_attention_heads)
            hidden = int(config.hidden_size)
        except AttributeError as e:
            raise ValueError(
                f"cannot read the decoder geometry from {type(config).__name__}: {e}; expected a transformers "
                "decoder config with num_hidden_layers, num_attention_heads and hidden_size"
            ) from None
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(
            model_type=str(getattr(config, "model_type", "") or ""),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(kv),
            head_dim=int(head_dim),
            hidden_size=hidden,
            max_position_embeddings=getattr(config, "max_position_embeddings", None),
        )

    def fingerprint(self) -> str:
        """A stable hash of what makes a plan fit a model (not the max position count)."""
        key = {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def next_body_bits(key_bits: int, value_bits: int, final: tuple[int, int]) -> tuple[int, int] | None:
    """The body's ERS schedule: one level down from ``(key_bits, value_bits)``, or None at (2, 2).

    The sides (keys, values) above 2 bits that are furthest above their final bits (by ratio) shrink together,
    so a plan with equal key and value bits walks 16 -> 8 -> 4 -> 2 on both at once, as in the paper, and a plan
    with different final bits passes through exactly its ``(key_bits, value_bits)``. The cache, the kernels and
    the ONNX runner all use this one rule.
    """
    ratios = {
        side: bits / f for side, bits, f in ((0, key_bits, final[0]), (1, value_bits, final[1])) if bits > 2
    }
    if not ratios:
        return None
    top = max(ratios.values())
    kb = key_bits // 2 if ratios.get(0) == top else key_bits
    vb = value_bits // 2 if ratios.get(1) == top else value_bits
    return kb, vb


def check_scale_dtype(scale_dtype: Any) -> str:
    """Return ``scale_dtype`` or raise ValueError naming it and :data:`SCALE_DTYPES`."""
    if not isinstance(scale_dtype, str) or scale_dtype not in SCALE_DTYPES:
        raise ValueError(
            f"scale_dtype={scale_dtype!r} is not supported; expected one of {list(SCALE_DTYPES)}"
        )
    return scale_dtype


def check_half_meta_alignment(
    num_kv_heads: int, groups: int, n_window: int, n_sink: int, sink_bits: int
) -> None:
    """float16 scales keep every region a multiple of 16 bytes (the kernels' vector loads rely on it) only
    when ``num_kv_heads * capacity * groups`` is even for the window (body chunks) and a sink at <= 8 bits."""
    caps = [("n_window", n_window)] + ([("n_sink", n_sink)] if n_sink and sink_bits <= 8 else [])
    for name, cap in caps:
        if (num_kv_heads * cap * groups) % 2:
            raise ValueError(
                f'scale_dtype="float16" needs num_kv_heads * {name} * groups even, got {num_kv_heads} * {cap} * '
                f'{groups}; use an even {name} or scale_dtype="float32"'
            )


def meta_bytes(key_bits: float, value_bits: float, scale_dtype: str = "float32") -> int:
    """Bytes of one stored scale or zero of a token at these bits: 2 with ``scale_dtype="float16"`` when both
    widths are at most 8 bits, else 4 (float32)."""
    return 2 if check_scale_dtype(scale_dtype) == "float16" and max(key_bits, value_bits) <= 8 else 4


def meta_dtype(key_bits: int, value_bits: int, scale_dtype: str = "float32") -> torch.dtype:
    """The stored dtype of a token's scale and zero at these bits (:func:`meta_bytes`)."""
    return torch.float16 if meta_bytes(key_bits, value_bits, scale_dtype) == 2 else torch.float32


def token_bytes(
    num_kv_heads: int,
    head_dim: int,
    group_size: int,
    key_bits: int,
    value_bits: int,
    scale_dtype: str = "float32",
) -> int:
    """Bytes one token needs in one layer: K and V codes plus scale and zero per group (:func:`meta_bytes`)."""
    groups = head_dim // group_size
    return num_kv_heads * (
        head_dim * key_bits // 8
        + head_dim * value_bits // 8
        + 4 * meta_bytes(key_bits, value_bits, scale_dtype) * groups
    )


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """One layer: the body bit-widths at ``max_len`` and the byte budget the layer never exceeds.

    ``key_scale`` (optional) is the key reparameterization: float32 ``[Hkv, D // 2]``, one positive scale per
    KV head and rotary pair, applied as ``K / s`` and ``Q * s`` (both channels of a pair) when it is not folded
    into the weights.
    """

    key_bits: int
    value_bits: int
    budget_bytes: int
    key_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_bits(self.key_bits, what="key_bits")
        check_bits(self.value_bits, what="value_bits")
        _pos_int("budget_bytes", self.budget_bytes)
        s = self.key_scale
        if s is not None:
            if not isinstance(s, torch.Tensor) or s.dim() != 2 or s.dtype != torch.float32:
                raise ValueError(
                    f"key_scale must be a float32 tensor [Hkv, D // 2], got "
                    f"{getattr(s, 'dtype', type(s).__name__)} {tuple(getattr(s, 'shape', ()))}"
                )
            if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
                raise ValueError("key_scale must be finite and positive")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LayerPlan):
            return NotImplemented
        same = (self.key_bits, self.value_bits, self.budget_bytes) == (
            other.key_bits,
            other.value_bits,
            other.budget_bytes,
        )
        if not same or (self.key_scale is None) != (other.key_scale is None):
            return False
        return self.key_scale is None or torch.equal(self.key_scale, other.key_scale)

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, eq=False)
class Plan:
    """A PM-KVQ plan for one model geometry. Validated on construction; see the module docstring."""

    layers: tuple[LayerPlan, ...]
    geometry: ModelGeometry
    max_len: int
    group_size: int
    n_sink: int = 1
    n_window: int = 128
    init_bits: int = 16
    sink_bits: int = 16
    window_bits: int = 16
    key_scales_folded: bool = False
    scale_dtype: str = "float32"
    metadata: dict[str, str] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        g = self.geometry
        if not isinstance(g, ModelGeometry):
            raise ValueError(f"geometry must be a ModelGeometry, got {type(g).__name__}")
        object.__setattr__(self, "layers", tuple(self.layers))
        if len(self.layers) != g.num_layers:
            raise ValueError(f"plan has {len(self.layers)} layers but the model has {g.num_layers}")
        for i, lp in enumerate(self.layers):
            if not isinstance(lp, LayerPlan):
                raise ValueError(f"layers[{i}] must be a LayerPlan, got {type(lp).__name__}")
            if lp.key_scale is not None and tuple(lp.key_scale.shape) != (g.num_kv_heads, g.head_dim // 2):
                raise ValueError(
                    f"layers[{i}].key_scale has shape {tuple(lp.key_scale.shape)}, expected "
                    f"{(g.num_kv_heads, g.head_dim // 2)}"
                )
        if g.head_dim % 16 != 0:
            raise ValueError(f"head_dim={g.head_dim} is not supported; it must be a multiple of 16")
        _pos_int("max_len", self.max_len)
        _pos_int("group_size", self.group_size)
        if g.head_dim % self.group_size != 0 or self.group_size % 8 != 0:
            raise ValueError(
                f"group_size={self.group_size} must be a multiple of 8 that divides head_dim={g.head_dim}"
            )
        _pos_int("n_sink", self.n_sink, minimum=0)
        _pos_int("n_window", self.n_window)
        for name in ("init_bits", "sink_bits", "window_bits"):
            check_bits(getattr(self, name), what=name)
        for i, lp in enumerate(self.layers):
            if max(lp.key_bits, lp.value_bits) > self.init_bits:
                raise ValueError(
                    f"layers[{i}] bits ({lp.key_bits}, {lp.value_bits}) exceed init_bits={self.init_bits}"
                )
            if self.window_bits < self.init_bits:
                raise ValueError(f"window_bits={self.window_bits} must be >= init_bits={self.init_bits}")
        if self.max_len <= self.n_sink:
            raise ValueError(f"max_len={self.max_len} must exceed n_sink={self.n_sink}")
        check_scale_dtype(self.scale_dtype)
        if self.scale_dtype == "float16":
            check_half_meta_alignment(
                g.num_kv_heads, g.head_dim // self.group_size, self.n_window, self.n_sink, self.sink_bits
            )
        if g.max_position_embeddings is not None and self.max_len > g.max_position_embeddings:
            raise ValueError(
                f"max_len={self.max_len} exceeds the model's max_position_embeddings="
                f"{g.max_position_embeddings}"
            )
        if self.version != FORMAT_VERSION:
            raise ValueError(
                f"plan format version {self.version} is not supported (expected {FORMAT_VERSION})"
            )
        md = self.metadata
        if not isinstance(md, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in md.items()
        ):
            raise ValueError("metadata must be a dict of str to str")
        object.__setattr__(self, "metadata", dict(md))

    # ---- the memory model -------------------------------------------------------------------------------
    def token_bytes(self, key_bits: int, value_bits: int) -> int:
        """Bytes of one token of one layer at these bits (codes + scales + zeros)."""
        g = self.geometry
        return token_bytes(
            g.num_kv_heads, g.head_dim, self.group_size, key_bits, value_bits, self.scale_dtype
        )

    @property
    def sink_bytes(self) -> int:
        return self.n_sink * self.token_bytes(self.sink_bits, self.sink_bits)

    @property
    def window_bytes(self) -> int:
        """Bytes reserved for a full window."""
        return self.n_window * self.token_bytes(self.window_bits, self.window_bits)

    def chunk_bytes(self, key_bits: int, value_bits: int) -> int:
        """Bytes of one body chunk (``n_window`` tokens) at these bits."""
        return self.n_window * self.token_bytes(key_bits, value_bits)

    @property
    def max_chunks(self) -> int:
        """Body chunks held at ``max_len`` tokens."""
        return (self.max_len - self.n_sink) // self.n_window

    def budget_for(self, key_bits: int, value_bits: int, max_len: int | None = None) -> int:
        """A layer's budget so that ``max_len`` tokens end with the body at ``(key_bits, value_bits)``."""
        n = self.max_len if max_len is None else max_len
        chunks = max(n - self.n_sink, 0) // self.n_window
        return self.sink_bytes + self.window_bytes + chunks * self.chunk_bytes(key_bits, value_bits)

    @property
    def total_budget_bytes(self) -> int:
        """Sum of the layers' budgets: KV bytes for one sequence."""
        return sum(lp.budget_bytes for lp in self.layers)

    def average_bits(self) -> float:
        """Mean body bits over layers and K/V at ``max_len``."""
        return sum(lp.key_bits + lp.value_bits for lp in self.layers) / (2 * len(self.layers))

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        config: Any,
        bits: int,
        max_len: int,
        *,
        value_bits: int | None = None,
        n_sink: int = 1,
        n_window: int = 128,
        init_bits: int = 16,
        sink_bits: int = 16,
        window_bits: int = 16,
        group_size: int | None = None,
        scale_dtype: str = "float32",
        metadata: dict[str, str] | None = None,
    ) -> Plan:
        """Every layer gets the budget of ``bits`` (keys) / ``value_bits`` (values, default ``bits``) at ``max_len``.

        ``scale_dtype="float16"`` stores the scales and zeros of tokens at 8 bits or fewer as float16 (see the
        module docstring); it needs ``num_kv_heads * n_window * head_dim / group_size`` even."""
        geo = ModelGeometry.from_config(config)
        gs = min(geo.head_dim, 128) if group_size is None else group_size
        kb = check_bits(bits)
        vb = kb if value_bits is None else check_bits(value_bits, what="value_bits")
        proto = cls(
            layers=tuple(LayerPlan(kb, vb, 1) for _ in range(geo.num_layers)),
            geometry=geo,
            max_len=max_len,
            group_size=gs,
            n_sink=n_sink,
            n_window=n_window,
            init_bits=init_bits,
            sink_bits=sink_bits,
            window_bits=window_bits,
            scale_dtype=scale_dtype,
            metadata=dict(metadata or {"source": "uniform"}),
        )
        budget = proto.budget_for(kb, vb)
        return replace(proto, layers=tuple(LayerPlan(kb, vb, budget) for _ in range(geo.num_layers)))

    def with_layers(self, layers: tuple[LayerPlan, ...] | list[LayerPlan], **changes: Any) -> Plan:
        """A copy with other layers (and other fields), validated again."""
        return replace(self, layers=tuple(layers), **changes)

    # ---- checks ------------------------------------------------------------------------------------------
    @property
    def model_fingerprint(self) -> str:
        return self.geometry.fingerprint()

    def check_model(self, config: Any) -> None:
        """Raise :class:`PlanMismatchError` when ``config`` is not the geometry this plan was made for."""
        other = ModelGeometry.from_config(config)
        if other.fingerprint() != self.model_fingerprint:
            mine, theirs = self.geometry, other
            diffs = [
                f"{f.name}: plan {getattr(mine, f.name)!r} vs model {getattr(theirs, f.name)!r}"
                for f in fields(ModelGeometry)
                if f.name != "max_position_embeddings" and getattr(mine, f.name) != getattr(theirs, f.name)
            ]
            raise PlanMismatchError(
                "this plan was made for another model ("
                + "; ".join(diffs)
                + "); calibrate a plan for this model"
            )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in fields(Plan))

    __hash__ = None  # type: ignore[assignment]

    # ---- I/O ---------------------------------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        g = self.geometry
        return {
            "format": _FORMAT_NAME,
            "version": self.version,
            "model_fingerprint": self.model_fingerprint,
            "geometry": {f.name: getattr(g, f.name) for f in fields(ModelGeometry)},
            "max_len": self.max_len,
            "group_size": self.group_size,
            "n_sink": self.n_sink,
            "n_window": self.n_window,
            "init_bits": self.init_bits,
            "sink_bits": self.sink_bits,
            "window_bits": self.window_bits,
            "key_scales_folded": self.key_scales_folded,
            "scale_dtype": self.scale_dtype,
            "metadata": self.metadata,
            "layers": [
                {
                    "key_bits": lp.key_bits,
                    "value_bits": lp.value_bits,
                    "budget_bytes": lp.budget_bytes,
                    "key_scale": f"layers.{i}.key_scale" if lp.key_scale is not None else None,
                }
                for i, lp in enumerate(self.layers)
            ],
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``plan.json`` and ``tensors.safetensors`` into directory ``path`` (created if needed).

        Files are written under temporary names and renamed, so an interrupted save leaves the old plan.
        """
        out = Path(path)
        if out.exists() and not out.is_dir():
            raise ValueError(f"plan path {str(out)!r} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"layers.{i}.key_scale": lp.key_scale.contiguous()
            for i, lp in enumerate(self.layers)
            if lp.key_scale is not None
        }
        with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-") as tmp:
            tj, tt = Path(tmp) / "plan.json", Path(tmp) / "tensors.safetensors"
            tj.write_text(json.dumps(self.to_json_dict(), indent=2, sort_keys=False) + "\n")
            save_file(tensors, str(tt), metadata={"format": _FORMAT_NAME, "version": str(self.version)})
            os.replace(tt, out / "tensors.safetensors")
            os.replace(tj, out / "plan.json")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str], config: Any | None = None) -> Plan:
        """Read a plan saved by :meth:`save`; with ``config``, also check it fits that model."""
        p = Path(path)
        pj = p / "plan.json" if p.is_dir() else p
        if not pj.is_file():
            raise ValueError(f"no plan at {str(p)!r}: expected a directory with plan.json")
        try:
            d = json.loads(pj.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(pj)!r} is not valid JSON: {e}") from None
        if not isinstance(d, dict) or d.get("format") != _FORMAT_NAME:
            raise ValueError(f"{str(pj)!r} is not a pmkvq plan (format {d.get('format')!r})")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"plan {str(pj)!r} has format version {d.get('version')!r}; this pmkvq-compile reads {FORMAT_VERSION}"
            )
        pt = pj.parent / "tensors.safetensors"
        tensors = load_file(str(pt)) if pt.is_file() else {}
        layers = []
        for ld in d["layers"]:
            name = ld.get("key_scale")
            if name is not None and name not in tensors:
                raise ValueError(f"plan {str(pj)!r} names tensor {name!r} that tensors.safetensors lacks")
            layers.append(
                LayerPlan(
                    key_bits=ld["key_bits"],
                    value_bits=ld["value_bits"],
                    budget_bytes=ld["budget_bytes"],
                    key_scale=tensors[name] if name is not None else None,
                )
            )
        plan = cls(
            layers=tuple(layers),
            geometry=ModelGeometry(**d["geometry"]),
            max_len=d["max_len"],
            group_size=d["group_size"],
            n_sink=d["n_sink"],
            n_window=d["n_window"],
            init_bits=d["init_bits"],
            sink_bits=d["sink_bits"],
            window_bits=d["window_bits"],
            key_scales_folded=bool(d["key_scales_folded"]),
            scale_dtype=d.get("scale_dtype", "float32"),
            metadata=d.get("metadata", {}),
            version=d["version"],
        )
        if d.get("model_fingerprint") != plan.model_fingerprint:
            raise ValueError(f"plan {str(pj)!r} is corrupt: its fingerprint does not match its geometry")
        if config is not None:
            plan.check_model(config)
        return plan

    def describe(self) -> str:
        """A table of the per-layer bits and bytes."""
        rows = [f"{'layer':>5} {'K bits':>6} {'V bits':>6} {'budget bytes':>14} {'key scale':>9}"]
        for i, lp in enumerate(self.layers):
            rows.append(
                f"{i:>5} {lp.key_bits:>6} {lp.value_bits:>6} {lp.budget_bytes:>14,} "
                f"{'yes' if lp.key_scale is not None else '-':>9}"
            )
        g = self.geometry
        rows.append(
            f"total {self.total_budget_bytes:,} bytes per sequence of {self.max_len} tokens; avg "
            f"{self.average_bits():.2f} bits; {g.model_type or 'model'} {g.num_layers}L x {g.num_kv_heads} KV "
            f"heads x {g.head_dim}; sink {self.n_sink}@{self.sink_bits}b, window {self.n_window}@"
            f"{self.window_bits}b, group {self.group_size}, scales {self.scale_dtype}"
        )
        return "\n".join(rows)
