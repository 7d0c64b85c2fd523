"""Per-sample gradients with torch.func: the engine behind `DeMem.backward_per_sample`.

`vmap(grad_and_value(f))` over the samples of a batch, where f evaluates the user's
`loss_fn(model, *batch)` on a batch of one through `functional_call`, so that loss_fn may use the
model in any way (submodules, several forward calls) and still be differentiated per sample. On the
CPU, conv2d layers with a large weight on a small output map take a faster per-sample weight gradient
(`demem_ext.grad_sample.conv_rule`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from demem_ext.grad_sample.conv_rule import SmallMapConv2d, unfold_conv_enabled
from demem_ext.grad_sample.flat import FlatBuffer, flatten_into

LossFn = Callable[..., torch.Tensor]


class LossModule(nn.Module):
    """Holds the user's model as the submodule `model`; forward(*batch) = loss_fn(model, *batch)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, *batch)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for every parameter of `model` with requires_grad, in registration order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def check_loss_shape(losses: object, batch_size: int) -> None:
    """loss_fn must return a tensor of per-sample losses [B]."""
    if not isinstance(losses, torch.Tensor) or losses.shape != (batch_size,):
        got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn must return per-sample losses of shape [B] = ({batch_size},), got {got} "
            "(use reduction='none')"
        )


def per_sample_grads(
    module: LossModule,
    params: dict[str, torch.Tensor],
    batch: Sequence[torch.Tensor],
    dtype: torch.dtype,
    out: Optional[FlatBuffer] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients flattened to [b, P] (in `params` order, as `dtype`) and losses [b].

    params: the trainable parameters of `module` by their names in it ("model.<name>"), detached;
    the other parameters and the buffers are the module's own. out: a FlatBuffer to write into (the
    result is then a view of it, valid until its next use).
    """

    def sample_loss(p: dict[str, torch.Tensor], *sample: torch.Tensor) -> torch.Tensor:
        out = functional_call(module, p, tuple(x.unsqueeze(0) for x in sample))
        check_loss_shape(out, 1)
        return out[0]

    in_dims = (None,) + (0,) * len(batch)
    with SmallMapConv2d() if unfold_conv_enabled() else contextlib.nullcontext():
        grads, losses = vmap(grad_and_value(sample_loss), in_dims=in_dims, randomness="different")(
            params, *batch
        )
    return flatten_into([grads[name] for name in params], losses.shape[0], dtype, out), losses.detach()
