"""K models of one architecture as one module: a flat batch [K·B, ...] in, logits [K·B, classes] out.

Rows k·B .. (k+1)·B - 1 belong to model k, whose parameters are slice k of the stacked parameters
(`set_params`, names as in `named_parameters`). Two ways to compute it:

- "vmap": `torch.func.vmap(functional_call)` over the K models; any architecture without BatchNorm.
- "grouped": the K models side by side in the channel dimension, [B, K·C, H, W]: each convolution is
  one grouped convolution (groups = K), GroupNorm one GroupNorm of K·G groups, each Linear one batched
  matmul; the digits SmallCNN only (its layers run in order: features, then classifier).

Both give each sample a function of its own model's parameters and its own input only, so gradients
with respect to the input (the attack) and to the parameters (training) are those of the K models apart.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from demem_ext.training.models import SmallCNN, has_batchnorm

BACKENDS = ("vmap", "grouped")
_ELEMENTWISE = (nn.ReLU, nn.Identity, nn.AdaptiveMaxPool2d)


def grouped_layers(model: nn.Module) -> Optional[list[tuple[str, nn.Module]]]:
    """The (name, layer) sequence the grouped backend runs for `model`, or None where it cannot."""
    if not isinstance(model, SmallCNN):
        return None
    layers = [(f"features.{i}", m) for i, m in enumerate(model.features)]
    layers += [(f"classifier.{i}", m) for i, m in enumerate(model.classifier)]
    supported = (nn.Conv2d, nn.GroupNorm, nn.Flatten, nn.Linear, *_ELEMENTWISE)
    return layers if all(isinstance(m, supported) for _, m in layers) else None


def check_backend(model: nn.Module, backend: str) -> None:
    """ValueError when `backend` cannot run `model`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if has_batchnorm(model):
        raise ValueError("stacked models cannot have BatchNorm (its batch statistics would mix padded rows)")
    if backend == "grouped" and grouped_layers(model) is None:
        raise ValueError(f"backend 'grouped' supports the digits SmallCNN only, not {type(model).__name__}")


class StackedForward(nn.Module):
    """The forward of K models of `base`'s architecture on a flat batch (see the module docstring)."""

    def __init__(self, base: nn.Module, backend: str, channels_last: bool = False) -> None:
        super().__init__()
        check_backend(base, backend)
        self.base = base
        self.backend = backend
        self.channels_last = channels_last
        self.params: dict[str, Tensor] = {}
        self._layers = grouped_layers(base) if backend == "grouped" else None
        # a stack of channels_last weights flattens to odd strides: each grouped weight is made dense in this format
        self._format = torch.channels_last if channels_last else torch.contiguous_format

    @property
    def num_models(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def set_params(self, params: dict[str, Tensor]) -> None:
        """The stacked parameters [K, ...] of the next forward calls."""
        self.params = params

    def forward(self, x: Tensor) -> Tensor:
        xs = x.unflatten(0, (self.num_models, -1))
        out = self._vmap(xs) if self._layers is None else self._grouped(xs)
        return out.flatten(0, 1)

    def _vmap(self, xs: Tensor) -> Tensor:
        def one(params: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(self.base, params, (x,))

        return vmap(one)(self.params, xs)

    def _grouped(self, xs: Tensor) -> Tensor:
        k, b = xs.shape[:2]
        h = xs.transpose(0, 1).reshape(b, k * xs.shape[2], *xs.shape[3:])  # [B, K·C, H, W], model-major channels
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        p = self.params
        for name, layer in self._layers:
            if isinstance(layer, nn.Conv2d):
                weight = p[f"{name}.weight"].flatten(0, 1).contiguous(memory_format=self._format)
                bias = p[f"{name}.bias"].flatten() if layer.bias is not None else None
                h = F.conv2d(h, weight, bias, layer.stride, layer.padding, layer.dilation, k * layer.groups)
            elif isinstance(layer, nn.GroupNorm):
                h = F.group_norm(h, k * layer.num_groups, p[f"{name}.weight"].flatten(),
                                 p[f"{name}.bias"].flatten(), layer.eps)
            elif isinstance(layer, nn.Flatten):
                h = h.reshape(b, k, -1).transpose(0, 1)  # [K, B, C·H·W], each model's own Flatten order
            elif isinstance(layer, nn.Linear):
                weight = p[f"{name}.weight"].transpose(1, 2)
                h = torch.baddbmm(p[f"{name}.bias"].unsqueeze(1), h, weight) if layer.bias is not None \
                    else torch.bmm(h, weight)
            else:
                h = layer(h)
        return h
