"""Dispatch to the compiled extension (torch.ops.demem.*) or to the pure-PyTorch reference.

The C++ library declares (csrc/, `TORCH_LIBRARY(demem, m)`):

    demem::weights(Tensor scores, float lam, str selection, str threshold, float k,
                   float quantile, float tau, float temperature) -> (Tensor weights, Tensor risk)
    demem::philox_normal(int n, int seed, int offset, Device device) -> Tensor      # float32
    demem::fused_step(Tensor grads, Tensor scores, Tensor? weights, float lam, str selection,
                      str threshold, float k, float quantile, float tau, float temperature,
                      float? max_grad_norm, float noise_multiplier, str clip_scope, float denom,
                      int seed, int offset) -> (Tensor grad, Tensor weights, Tensor risk,
                                                Tensor norms, Tensor coeff)

`seed` is passed as the signed 64-bit integer with the same bits as the unsigned seed.
Inputs are validated by the public functions in `demem_ext.functional` before they get here.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

import torch

from demem_ext import reference


def _load_extension() -> Optional[ModuleType]:
    if os.environ.get("DEMEM_FORCE_REFERENCE", "0") == "1":
        return None
    try:
        from demem_ext import _C  # noqa: F401  (importing registers torch.ops.demem.*)
    except ImportError:
        return None
    return _C


_EXT = _load_extension()


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


def _use_extension(device: torch.device) -> bool:
    if _EXT is None:
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and extension_has_cuda()


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= (1 << 63) else value


if _EXT is not None:

    @torch.library.register_fake("demem::weights")
    def _weights_fake(scores, lam, selection, threshold, k, quantile, tau, temperature):
        dtype = reference.accumulation_dtype(scores.dtype)
        return scores.new_empty(scores.shape, dtype=dtype), scores.new_empty(scores.shape, dtype=dtype)

    @torch.library.register_fake("demem::philox_normal")
    def _philox_normal_fake(n, seed, offset, device):
        return torch.empty(n, dtype=torch.float32, device=device)

    @torch.library.register_fake("demem::fused_step")
    def _fused_step_fake(grads, scores, weights, lam, selection, threshold, k, quantile, tau,
                         temperature, max_grad_norm, noise_multiplier, clip_scope, denom, seed, offset):
        dtype = reference.accumulation_dtype(grads.dtype)
        batch, size = grads.shape
        per_sample = [grads.new_empty((batch,), dtype=dtype) for _ in range(4)]
        return (grads.new_empty((size,), dtype=dtype), *per_sample)


def weights(scores: torch.Tensor, lam: float, selection: str, threshold: str, k: float,
            quantile: float, tau: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, risk) for validated scores."""
    args = (lam, selection, threshold, k, quantile, tau, temperature)
    if _use_extension(scores.device):
        return torch.ops.demem.weights(scores, *args)
    return reference.demem_weights(scores, *args)


def philox_normal(n: int, seed: int, offset: int, device: torch.device) -> torch.Tensor:
    """float32 Philox normals for validated arguments."""
    if _use_extension(device):
        return torch.ops.demem.philox_normal(n, _signed64(seed), offset, device)
    return reference.philox_normal(n, seed, offset, device)


def fused_step(grads: torch.Tensor, scores: torch.Tensor, weights: Optional[torch.Tensor],
               lam: float, selection: str, threshold: str, k: float, quantile: float, tau: float,
               temperature: float, max_grad_norm: Optional[float], noise_multiplier: float,
               clip_scope: str, denom: float, seed: int, offset: int):
    """(grad, weights, risk, norms, coeff) for validated arguments."""
    rule = (lam, selection, threshold, k, quantile, tau, temperature)
    tail = (max_grad_norm, noise_multiplier, clip_scope, denom)
    if _use_extension(grads.device):
        return torch.ops.demem.fused_step(grads, scores, weights, *rule, *tail, _signed64(seed), offset)
    return reference.fused_step(grads, scores, weights, *rule, *tail, seed, offset)
