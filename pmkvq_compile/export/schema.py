"""The ``pmkvq`` ONNX domain (opset version 1): op schemas read from ``schema.json`` beside this file.

:func:`register_schemas` registers them with ``onnx.defs`` so that ``onnx.checker.check_model(full_check=True)``
validates ``pmkvq`` nodes (input/output counts, types, attributes) like standard ones. Idempotent.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import onnx
from onnx.defs import OpSchema

__all__ = ["DOMAIN", "DOMAIN_VERSION", "load_schema", "register_schemas"]

DOMAIN = "pmkvq"
DOMAIN_VERSION = 1
SCHEMA_FILE = Path(__file__).with_name("schema.json")

_ATTR_TYPES = {
    "INT": OpSchema.AttrType.INT,
    "INTS": OpSchema.AttrType.INTS,
    "FLOAT": OpSchema.AttrType.FLOAT,
}


@cache
def load_schema() -> dict[str, Any]:
    """The parsed ``schema.json``: ``{"domain", "version", "doc", "ops": [{name, doc, attributes, inputs, outputs}]}``."""
    data = json.loads(SCHEMA_FILE.read_text())
    if data.get("domain") != DOMAIN or data.get("version") != DOMAIN_VERSION:
        raise ValueError(f"{SCHEMA_FILE} describes domain {data.get('domain')!r} v{data.get('version')!r}")
    return data


def _schema(op: dict[str, Any]) -> OpSchema:
    return OpSchema(
        op["name"],
        DOMAIN,
        DOMAIN_VERSION,
        doc=op["doc"],
        inputs=[OpSchema.FormalParameter(p["name"], p["type"], p["doc"]) for p in op["inputs"]],
        outputs=[OpSchema.FormalParameter(p["name"], p["type"], p["doc"]) for p in op["outputs"]],
        attributes=[
            OpSchema.Attribute(a["name"], _ATTR_TYPES[a["type"]], a["doc"], required=True)
            for a in op["attributes"]
        ],
    )


@cache
def register_schemas() -> tuple[str, ...]:
    """Register every ``pmkvq`` op with ``onnx.defs`` (once per process); returns the op names."""
    names = []
    for op in load_schema()["ops"]:
        if not onnx.defs.has(op["name"], DOMAIN):
            onnx.defs.register_schema(_schema(op))
        names.append(op["name"])
    return tuple(names)
