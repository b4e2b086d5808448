"""Shared test set-up. Triton kernels run under the interpreter on machines without a GPU; the variable must be
set before any ``@triton.jit`` module is imported, so it is set here, before the tests import the package."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
