"""pmkvq-compile: PM-KVQ progressive mixed-precision KV-cache quantization as a compiler pass and export toolkit."""

from .attention import register as _register_attention
from .attention import use_pmkvq_attention
from .cache import BudgetExceededError, ProgressiveKVCache
from .calibrate import calibrate
from .compiler import PmkvqBackend, PmkvqInductorPass, backend, inductor_pass
from .plan import LayerPlan, ModelGeometry, Plan, PlanMismatchError

__all__ = [
    "BudgetExceededError",
    "LayerPlan",
    "ModelGeometry",
    "Plan",
    "PlanMismatchError",
    "PmkvqBackend",
    "PmkvqInductorPass",
    "ProgressiveKVCache",
    "backend",
    "calibrate",
    "inductor_pass",
    "use_pmkvq_attention",
]
__version__ = "0.1.0"

_register_attention()
