"""Calibration: data (given or self-generated), PI key statistics, key reparameterization scales and folding."""

from .data import DEFAULT_PROMPTS, generate_samples, prepare_samples
from .reparam import (
    ALPHA_GRID,
    KeyStatistics,
    ReparamResult,
    collect_key_statistics,
    fold_key_scales,
    key_scales_from_max,
    search_key_scales,
)

__all__ = [
    "ALPHA_GRID",
    "DEFAULT_PROMPTS",
    "KeyStatistics",
    "ReparamResult",
    "collect_key_statistics",
    "fold_key_scales",
    "generate_samples",
    "key_scales_from_max",
    "prepare_samples",
    "search_key_scales",
]
