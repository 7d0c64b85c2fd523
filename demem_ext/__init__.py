"""demem-ext: privacy-enhanced robust adversarial learning via de-memorization (DeMem)."""

from demem_ext.ops.autograd import demem_loss
from demem_ext.config import DeMemConfig
from demem_ext.ops.functional import FusedResult, NonFiniteError, demem_weights, fused_step, philox_normal
from demem_ext.middleware import DeMem, DeMemStats
from demem_ext.ops import backend
from demem_ext.accounting import noise_multiplier_for
from demem_ext.sampling import PoissonBatchSampler, collate_allowing_empty

__all__ = [
    "DeMem",
    "DeMemConfig",
    "DeMemStats",
    "FusedResult",
    "NonFiniteError",
    "PoissonBatchSampler",
    "backend",
    "collate_allowing_empty",
    "demem_loss",
    "demem_weights",
    "fused_step",
    "noise_multiplier_for",
    "philox_normal",
]
__version__ = "0.1.0"
