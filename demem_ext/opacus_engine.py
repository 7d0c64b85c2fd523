"""Per-sample gradients through Opacus's GradSampleModule hooks: `DeMem(..., engine="opacus")`.

Opacus records each trainable layer's input in a forward hook and turns it, with the gradient of
the layer's output, into per-sample gradients in a backward hook. With this engine the model's own
forward passes are differentiated per sample, so that `dm.backward(per_sample_losses)` works with
clipping and noise, without a `loss_fn`. Forward passes in eval mode or without grad (attacks run in
eval mode, logging under no_grad) record nothing, and their backward passes are ignored.
Opacus is optional (the dev extra); asking for this engine without it is a clear error.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from demem_ext.per_sample import FlatBuffer, flatten_into


def _hooks_class() -> type:
    try:
        from opacus import GradSampleModule
    except ImportError as exc:
        raise ValueError("engine='opacus' needs Opacus: pip install opacus (or the dev extra), "
                         "or use engine='torch.func'") from exc

    class Hooks(GradSampleModule):
        """GradSampleModule whose backward hook ignores passes of forwards that recorded nothing."""

        def capture_backprops_hook(self, module: nn.Module, *args, **kwargs):  # type: ignore[override]
            if not getattr(module, "activations", None):  # eval mode, no_grad, or an attack on the input
                return None
            return super().capture_backprops_hook(module, *args, **kwargs)

    return Hooks


class OpacusEngine:
    """Opacus hooks on `module` (summed losses: grad_sample_i = ∇ℓ_i) until `close()`."""

    def __init__(self, module: nn.Module) -> None:
        self._hooks = _hooks_class()(module, batch_first=True, loss_reduction="sum", strict=True)
        self._module = module

    @staticmethod
    @contextlib.contextmanager
    def quiet() -> Iterator[None]:
        """Backward passes through the hooks: torch warns that the first layer's input needs no
        gradient (the hooks run all the same)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield

    def per_sample_grads(self, losses: torch.Tensor, params: Sequence[nn.Parameter],
                         dtype: torch.dtype, out: Optional[FlatBuffer] = None) -> torch.Tensor:
        """[B, P] per-sample gradients of losses [B] (computed by a forward with the hooks on).

        The parameters' `.grad` is not touched; rows follow `params`, flattened, as `dtype` (into
        `out` when given: the result is then a view of it, valid until its next use).
        """
        batch = losses.shape[0]
        for p in params:
            p.grad_sample = None
        with self.quiet():
            torch.autograd.grad(losses.sum(), list(params), allow_unused=True)
        if all(p.grad_sample is None for p in params):
            raise ValueError("Opacus recorded no per-sample gradients: compute the losses from a forward of "
                             "the model in train mode with grad enabled, inside the DeMem block")
        rows = []
        for p in params:
            sample = p.grad_sample
            if isinstance(sample, list):  # earlier train-mode passes since the last call: ours is last
                sample = sample[-1]
            if sample is None:  # not reached by these losses
                sample = torch.zeros(batch, *p.shape, dtype=dtype, device=p.device)
            if sample.shape[0] != batch:
                raise ValueError(f"Opacus recorded per-sample gradients for {sample.shape[0]} samples but "
                                 f"per_sample_losses has {batch}: compute the losses from one train-mode "
                                 "forward of the model on the batch")
            rows.append(sample)
            p.grad_sample = None
        return flatten_into(rows, batch, dtype, out)

    def close(self) -> None:
        """Remove the hooks and every attribute Opacus added to the parameters and layers."""
        self._hooks._close()
        for module in self._module.modules():
            for name in ("activations", "max_batch_len"):
                if hasattr(module, name):
                    delattr(module, name)
