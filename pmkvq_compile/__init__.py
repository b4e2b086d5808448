"""pmkvq-compile: PM-KVQ progressive mixed-precision KV-cache quantization as a compiler pass and export toolkit."""

from .attention import register as _register_attention
from .attention import use_pmkvq_attention
from .cache import BudgetExceededError, ProgressiveKVCache
from .calibrate import calibrate
from .compiler import PmkvqBackend, PmkvqCompiledModel, PmkvqInductorPass, backend, compile, inductor_pass
from .packed_cache import PackedKVCache, use_packed_cache
from .plan import LayerPlan, ModelGeometry, Plan, PlanMismatchError

__all__ = [
    "BudgetExceededError",
    "LayerPlan",
    "ModelGeometry",
    "PackedKVCache",
    "Plan",
    "PlanMismatchError",
    "PmkvqBackend",
    "PmkvqCompiledModel",
    "PmkvqInductorPass",
    "ProgressiveKVCache",
    "backend",
    "calibrate",
    "compile",
    "inductor_pass",
    "use_packed_cache",
    "use_pmkvq_attention",
]
__version__ = "0.1.0"

_register_attention()
