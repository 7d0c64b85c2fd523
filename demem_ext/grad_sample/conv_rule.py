"""Per-sample conv2d weight gradients by unfold + matmul, for the torch.func engine on the CPU.

Under `vmap(grad(...))` torch.func computes a conv2d's per-sample weight gradients as one grouped
convolution (groups = samples). On the CPU that is slow for a large weight on a small output map
(ResNet-18's 512-channel 4x4 layers: 107 ms for 6 samples, against 51 ms for an unfold of the input
and a matrix product; `benchmarks/bench_conv_grads.py`). `SmallMapConv2d` is a TorchFunctionMode that,
while active, sends such conv2d calls through `UnfoldConv2d`, whose backward writes the weight
gradient as `grad_output @ unfold(input)ᵀ` — vmapped by torch.func into one batched matrix product.
The forward and the input gradient are torch's own; every other call is left alone.
`DEMEM_UNFOLD_CONV=0` in the environment turns the rule off (`unfold_conv_enabled`).
"""

from __future__ import annotations

import os
from typing import Any, Sequence, Union

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Route a conv2d when its weight has at least this many elements per element of its output map
# (weight.numel() >= this * H_out * W_out). Measured on the project's CPU (docs/benchmarks.md): unfold +
# matmul wins 1.5-2.2x at 512ch 4x4, 256->512ch 8->4, 640ch 8x8, 320->640ch 16->8 (ratio 29k-147k), ties or
# wins a little at 256ch 8x8 (9k; routing it too made no ResNet-18 step faster), loses up to 2x on large
# maps (64ch 32x32: 36).
MIN_WEIGHT_PER_OUTPUT = 16384

IntPair = Union[int, Sequence[int]]


def unfold_conv_enabled() -> bool:
    """False when DEMEM_UNFOLD_CONV=0 is set: the torch.func engine then keeps torch's own rule."""
    return os.environ.get("DEMEM_UNFOLD_CONV", "1") != "0"


def _pair(value: IntPair) -> tuple[int, int]:
    """conv2d's int-or-pair argument as a pair (a one-element sequence repeats, as in conv2d)."""
    if isinstance(value, int):
        return value, value
    return (int(value[0]), int(value[0])) if len(value) == 1 else (int(value[0]), int(value[1]))


class UnfoldConv2d(torch.autograd.Function):
    """conv2d(x, weight) (no bias, groups = 1) whose weight gradient is an unfold and a matmul."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int]) -> torch.Tensor:
        return F.conv2d(x, weight, None, stride, padding, dilation)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, weight, stride, padding, dilation = inputs
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad_out, stride, padding, dilation)
        if ctx.needs_input_grad[1]:
            cols = F.unfold(x, weight.shape[2:], dilation, padding, stride)  # [N, C_in*kh*kw, L]
            grad_w = torch.matmul(grad_out.flatten(2), cols.transpose(1, 2))  # [N, C_out, C_in*kh*kw]
            # per sample N = 1: indexing, unlike sum(0), copies nothing
            grad_w = (grad_w[0] if grad_w.shape[0] == 1 else grad_w.sum(0)).view_as(weight)
        return grad_x, grad_w, None, None, None


def output_map_elements(in_size: Sequence[int], kernel: Sequence[int], stride: tuple[int, int],
                        padding: tuple[int, int], dilation: tuple[int, int]) -> int:
    """H_out * W_out of a conv2d on an input map of `in_size` (H, W)."""
    size = 1
    for dim in range(2):
        extent = in_size[dim] + 2 * padding[dim] - dilation[dim] * (kernel[dim] - 1) - 1
        size *= max(0, extent // stride[dim] + 1)
    return size


def routes(x: Any, weight: Any, stride: IntPair, padding: Any, dilation: IntPair, groups: int) -> bool:
    """Whether SmallMapConv2d sends this conv2d call through UnfoldConv2d."""
    if (groups != 1 or isinstance(padding, str) or not isinstance(x, torch.Tensor)
            or not isinstance(weight, torch.Tensor) or x.dim() != 4 or weight.dim() != 4
            or x.device.type != "cpu" or torch.is_autocast_enabled("cpu")):
        return False  # autocast would hand the backward a grad_out of another dtype than x and weight
    elements = output_map_elements(x.shape[2:], weight.shape[2:], _pair(stride), _pair(padding), _pair(dilation))
    return 0 < elements and weight.numel() >= MIN_WEIGHT_PER_OUTPUT * elements


_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV2D_DEFAULTS = (None, None, None, 1, 0, 1, 1)


class SmallMapConv2d(TorchFunctionMode):
    """While active, conv2d calls that `routes` accepts go through UnfoldConv2d (see the module)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            call = dict(zip(_CONV2D_ARGS, _CONV2D_DEFAULTS))
            call.update(zip(_CONV2D_ARGS, args))
            call.update(kwargs)
            x, weight, bias = call["input"], call["weight"], call["bias"]
            if routes(x, weight, call["stride"], call["padding"], call["dilation"], call["groups"]):
                out = UnfoldConv2d.apply(x, weight, _pair(call["stride"]), _pair(call["padding"]),
                                         _pair(call["dilation"]))
                return out if bias is None else out + bias.view(1, -1, 1, 1)
        return func(*args, **kwargs)
