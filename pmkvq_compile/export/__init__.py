"""ONNX export with a ``pmkvq`` custom-op domain, a standard-ops flavor, and an ONNX Runtime runner.

* :func:`to_onnx` writes a decoder step graph (+ plan, manifest) with the torch dynamo exporter;
* :class:`OrtGenerator` runs greedy / sampled generation from such a directory with ONNX Runtime.
"""

from .exporter import SUPPORTED_MODEL_TYPES, check_exportable, to_onnx
from .step import FLAVORS

__all__ = ["FLAVORS", "SUPPORTED_MODEL_TYPES", "OrtGenerator", "check_exportable", "to_onnx"]


def __getattr__(name: str):
    if name == "OrtGenerator":
        from .runtime import OrtGenerator

        return OrtGenerator
    raise AttributeError(name)
