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

from demem_ext.grad_sample.flat import FlatBuffer


class _Sink:
    """Columns of a [B, P] matrix, one block per parameter, that per-sample gradients are moved into
    as soon as Opacus has computed a layer's (so that only one layer's stay allocated)."""

    def __init__(self, params: Sequence[nn.Parameter], flat: torch.Tensor) -> None:
        self.flat = flat
        self.columns: dict[int, torch.Tensor] = {}
        start = 0
        for p in params:
            self.columns[id(p)] = flat[:, start:start + p.numel()]
            start += p.numel()
        self.filled: set[int] = set()

    def take(self, p: nn.Parameter) -> None:
        """Move p.grad_sample into p's columns (Opacus sets it once per backward pass: when the last
        forward call that used p has been backpropagated)."""
        rows = self.flat.shape[0]
        if p.grad_sample.shape[0] != rows:
            raise ValueError(f"Opacus recorded per-sample gradients for {p.grad_sample.shape[0]} samples but "
                             f"per_sample_losses has {rows}: compute the losses from one train-mode "
                             "forward of the model on the batch")
        self.columns[id(p)].copy_(p.grad_sample.reshape(rows, -1))
        self.filled.add(id(p))
        p.grad_sample = None

    def zero_unfilled(self, params: Sequence[nn.Parameter]) -> None:
        """Zeros for the parameters these losses do not reach."""
        for p in params:
            if id(p) not in self.filled:
                self.columns[id(p)].zero_()


def _hooks_class() -> type:
    try:
        from opacus import GradSampleModule
    except ImportError as exc:
        raise ValueError("engine='opacus' needs Opacus: pip install opacus (or the dev extra), "
                         "or use engine='torch.func'") from exc

    class Hooks(GradSampleModule):
        """GradSampleModule whose backward hook ignores passes of forwards that recorded nothing and,
        while `sink` is set, moves each layer's finished per-sample gradients into it."""

        sink: Optional[_Sink] = None

        def capture_backprops_hook(self, module: nn.Module, *args, **kwargs):  # type: ignore[override]
            if not getattr(module, "activations", None):  # eval mode, no_grad, or an attack on the input
                return None
            super().capture_backprops_hook(module, *args, **kwargs)
            if self.sink is not None:
                for p in module.parameters(recurse=False):
                    if id(p) in self.sink.columns and getattr(p, "grad_sample", None) is not None:
                        self.sink.take(p)
            return None

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
                         dtype: torch.dtype, out: FlatBuffer) -> torch.Tensor:
        """[B, P] per-sample gradients of losses [B] (computed by a forward with the hooks on).

        The parameters' `.grad` is not touched; rows follow `params`, flattened, as `dtype`, in `out`
        (the result is a view of it, valid until its next use). Each layer's per-sample gradients move
        into the result as soon as its backward hook has computed them.
        """
        batch = losses.shape[0]
        flat = out.rows(batch, sum(p.numel() for p in params), dtype, params[0].device)
        for p in params:
            p.grad_sample = None
        sink = _Sink(params, flat)
        self._hooks.sink = sink
        try:
            with self.quiet():
                torch.autograd.grad(losses.sum(), list(params), allow_unused=True)
        except BaseException:
            self._forget_forwards()  # a backward stopped half way leaves Opacus's counts behind
            raise
        finally:
            self._hooks.sink = None
            for p in params:
                p.grad_sample = None
        if any(hasattr(p, "_current_grad_sample") for p in params):
            self._forget_forwards()
            raise ValueError("a train-mode forward of the model with grad enabled since the last backward is not "
                             "part of these losses, so Opacus cannot match per-sample gradients to it: run such "
                             "forwards under torch.no_grad() or in eval mode")
        if not sink.filled:
            raise ValueError("Opacus recorded no per-sample gradients: compute the losses from a forward of "
                             "the model in train mode with grad enabled, inside the DeMem block")
        sink.zero_unfilled(params)
        return flat

    def _forget_forwards(self) -> None:
        """Drop what Opacus recorded of forwards not yet backpropagated (a clean state for the next)."""
        for module in self._module.modules():
            if getattr(module, "activations", None):
                module.activations.clear()
        for p in self._module.parameters():
            if hasattr(p, "_current_grad_sample"):
                del p._current_grad_sample
            if hasattr(p, "_forward_counter"):
                p._forward_counter = 0

    def close(self) -> None:
        """Remove the hooks and every attribute Opacus added to the parameters and layers."""
        self._hooks._close()
        for module in self._module.modules():
            for name in ("activations", "max_batch_len"):
                if hasattr(module, name):
                    delattr(module, name)
