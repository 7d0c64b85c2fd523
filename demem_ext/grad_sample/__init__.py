"""Per-sample gradient engines: torch.func (with its conv2d rule) and Opacus's hooks, and the flat buffer."""

from demem_ext.grad_sample.flat import FlatBuffer, flat_dtype, flatten_into
from demem_ext.grad_sample.torch_func import LossModule, check_loss_shape, per_sample_grads, trainable_parameters

__all__ = ["FlatBuffer", "LossModule", "check_loss_shape", "flat_dtype", "flatten_into", "per_sample_grads",
           "trainable_parameters"]
