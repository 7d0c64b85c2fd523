"""demem-ext: privacy-enhanced robust adversarial learning via de-memorization (DeMem)."""

from demem_ext.ops.autograd import demem_loss
from demem_ext.config import DeMemConfig
from demem_ext.ops.functional import FusedResult, NonFiniteError, demem_weights, fused_step, philox_normal
from demem_ext.middleware import DeMem, DeMemStats
from demem_ext.ops import backend

__all__ = [
    "DeMem",
    "DeMemConfig",
    "DeMemStats",
    "FusedResult",
    "NonFiniteError",
    "backend",
    "demem_loss",
    "demem_weights",
    "fused_step",
    "philox_normal",
]
__version__ = "0.1.0"
