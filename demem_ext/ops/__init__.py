"""The op layer: `torch.ops.demem.*` (compiled kernels, or the reference as their kernel), the validated
public functions over them, and `demem_loss`."""

from demem_ext.ops.autograd import demem_loss
from demem_ext.ops.functional import FusedResult, NonFiniteError, demem_weights, fused_step, philox_normal
from demem_ext.ops.loader import backend, extension_has_cuda, extension_loaded

__all__ = ["FusedResult", "NonFiniteError", "backend", "demem_loss", "demem_weights", "extension_has_cuda",
           "extension_loaded", "fused_step", "philox_normal"]
