"""Makes `torch.ops.demem.*` exist: from the compiled extension, or with the reference as their kernels.

The schemas are declared once, in C++ (`TORCH_LIBRARY(demem, m)` in csrc/demem.cpp). When the extension
is absent (not built, or `DEMEM_FORCE_REFERENCE=1`), this module defines the same three ops with the
pure-PyTorch reference as their kernel; their schemas are inferred from the kernels' signatures below,
and tests/ops check that they equal the C++ ones. When the extension was built without its CUDA
kernels, the reference serves as the CUDA kernel of `weights` and `fused_step`. Either way there is one
dispatcher (PyTorch's), `torch.library.opcheck` covers both, and the fake kernels for torch.compile are
registered here once.

`seed` crosses the op boundary as the signed 64-bit integer with the same bits as the unsigned seed
(`to_signed64`).
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from demem_ext.ops import reference
from demem_ext.ops.rule import accumulation_dtype

OP_NAMES = ("weights", "philox_normal", "fused_step")
_UINT64 = (1 << 64) - 1


def to_signed64(value: int) -> int:
    """The signed 64-bit integer with the bits of the unsigned `value` (how seeds enter the ops)."""
    return value - (1 << 64) if value >= (1 << 63) else value


def _load_extension() -> Optional[ModuleType]:
    if os.environ.get("DEMEM_FORCE_REFERENCE", "0") == "1":
        return None
    try:
        from demem_ext import _C  # noqa: F401  (importing registers torch.ops.demem.*)
    except ImportError:
        return None
    return _C


# The reference kernels with the ops' exact signatures (the fallback's schemas are inferred from these).
def weights_kernel(scores: Tensor, lam: float, selection: str, threshold: str, k: float, quantile: float,
                   tau: float, temperature: float) -> tuple[Tensor, Tensor]:
    return reference.demem_weights(scores, lam, selection, threshold, k, quantile, tau, temperature)


def philox_normal_kernel(n: int, seed: int, offset: int, device: torch.device) -> Tensor:
    return reference.philox_normal(n, seed & _UINT64, offset, device)


def fused_step_kernel(grads: Tensor, scores: Tensor, weights: Optional[Tensor], lam: float, selection: str,
                      threshold: str, k: float, quantile: float, tau: float, temperature: float,
                      max_grad_norm: Optional[float], noise_multiplier: float, clip_scope: str, denom: float,
                      seed: int, offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return reference.fused_step(grads, scores, weights, lam, selection, threshold, k, quantile, tau, temperature,
                                max_grad_norm, noise_multiplier, clip_scope, denom, seed & _UINT64, offset)


REFERENCE_KERNELS = {"weights": weights_kernel, "philox_normal": philox_normal_kernel,
                     "fused_step": fused_step_kernel}


def reference_schema(name: str) -> str:
    """The schema of op `name` inferred from its reference kernel (Python `int` is the C++ schema's `int`,
    not the `SymInt` that inference picks)."""
    return torch.library.infer_schema(REFERENCE_KERNELS[name], mutates_args=()).replace("SymInt", "int")


def _define_reference_ops() -> torch.library.Library:
    """The demem:: ops with the reference as their kernel, for every device (no extension)."""
    lib = torch.library.Library("demem", "DEF")
    for name, kernel in REFERENCE_KERNELS.items():
        lib.define(name + reference_schema(name))
        lib.impl(name, kernel, "CompositeExplicitAutograd")
    return lib


def _reference_cuda_kernels() -> torch.library.Library:
    """The reference as the CUDA kernel of the tensor ops (an extension built without CUDA kernels)."""
    lib = torch.library.Library("demem", "IMPL")
    for name in ("weights", "fused_step"):
        lib.impl(name, REFERENCE_KERNELS[name], "CUDA")
    return lib


_EXT = _load_extension()
_LIBRARY = _define_reference_ops() if _EXT is None else (
    None if _EXT.with_cuda() else _reference_cuda_kernels())


@torch.library.register_fake("demem::weights")
def _weights_fake(scores, lam, selection, threshold, k, quantile, tau, temperature):
    dtype = accumulation_dtype(scores.dtype)
    return scores.new_empty(scores.shape, dtype=dtype), scores.new_empty(scores.shape, dtype=dtype)


@torch.library.register_fake("demem::philox_normal")
def _philox_normal_fake(n, seed, offset, device):
    return torch.empty(n, dtype=torch.float32, device=device)


@torch.library.register_fake("demem::fused_step")
def _fused_step_fake(grads, scores, weights, lam, selection, threshold, k, quantile, tau, temperature,
                     max_grad_norm, noise_multiplier, clip_scope, denom, seed, offset):
    dtype = accumulation_dtype(grads.dtype)
    batch, size = grads.shape
    per_sample = [grads.new_empty((batch,), dtype=dtype) for _ in range(4)]
    return (grads.new_empty((size,), dtype=dtype), *per_sample)


def extension_loaded() -> bool:
    """True when the compiled extension is in use (not forced off)."""
    return _EXT is not None


def extension_has_cuda() -> bool:
    """True when the loaded extension was compiled with its CUDA kernels."""
    return _EXT is not None and bool(_EXT.with_cuda())


def backend() -> str:
    """"cuda" (extension with CUDA kernels and a GPU), "cpu" (extension) or "reference"."""
    if _EXT is None:
        return "reference"
    if extension_has_cuda() and torch.cuda.is_available():
        return "cuda"
    return "cpu"
