"""Pure-PyTorch reference of every op: the oracle the compiled kernels are tested against.

Written for clarity, not speed; it is also the kernel of `torch.ops.demem.*` when the extension is absent
(`demem_ext.ops.loader`), and no other production code imports it. Conventions shared with the kernels
(csrc/), besides those of `demem_ext.ops.rule`: per-sample norms accumulate the sum of squares in
float64; the noise generator is Philox4x32-10 in integer arithmetic, Box–Muller in float32.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from demem_ext.ops.rule import accumulation_dtype, clip_factors, threshold

# Philox4x32-10 constants (Random123 / cuRAND).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF


def demem_weights(
    scores: torch.Tensor,
    lam: float,
    selection: str,
    threshold_rule: str,
    k: float,
    quantile: float,
    tau: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Risk r_i and weight w_i = 1 − λ·r_i for each score; returns (weights, risk)."""
    out_dtype = accumulation_dtype(scores.dtype)
    s = scores.detach().to(torch.float64)
    t = threshold(s, threshold_rule, k, quantile, tau)
    if selection == "hard":
        risk = (s > t).to(torch.float64)
    elif selection == "soft":
        risk = torch.sigmoid((s - t) / temperature)
    else:
        raise ValueError(f"selection must be 'hard' or 'soft', got {selection!r}")
    weights = 1.0 - lam * risk
    return weights.to(out_dtype), risk.to(out_dtype)


def _mul32(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi32, lo32) of the 64-bit product a·x for a 32-bit constant a and uint32 values x (int64)."""
    x_hi, x_lo = x >> 16, x & 0xFFFF
    p_lo = a * x_lo  # < 2**48
    p_hi = a * x_hi  # < 2**48
    low = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2**49
    return (p_hi >> 16) + (low >> 32), low & MASK32


def philox4x32_10(counter: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 on counters [N, 4] (uint32 values held in int64) with key (k0, k1) -> [N, 4]."""
    c0, c1, c2, c3 = (counter[:, i].clone() for i in range(4))
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mul32(PHILOX_M0, c0)
        hi1, lo1 = _mul32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return torch.stack([c0, c1, c2, c3], dim=1)


def philox_uniform(bits: torch.Tensor) -> torch.Tensor:
    """uint32 values (int64) -> float32 uniforms in (0, 1]: u = x·2⁻³² + 2⁻³³."""
    return bits.to(torch.float32) * (2.0**-32) + (2.0**-33)


def philox_normal(
    n: int,
    seed: int,
    offset: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """n standard normals: element j from counter offset + j//4, lane j % 4, Box–Muller in float32."""
    blocks = (n + 3) // 4
    c = offset + torch.arange(blocks, dtype=torch.int64)
    counter = torch.stack([c & MASK32, (c >> 32) & MASK32, torch.zeros_like(c), torch.zeros_like(c)], 1)
    key = (seed & MASK32, (seed >> 32) & MASK32)
    u = philox_uniform(philox4x32_10(counter, key))
    two_pi = torch.tensor(2.0 * math.pi, dtype=torch.float32)
    radius01 = torch.sqrt(-2.0 * torch.log(u[:, 0]))
    radius23 = torch.sqrt(-2.0 * torch.log(u[:, 2]))
    angle01, angle23 = two_pi * u[:, 1], two_pi * u[:, 3]
    z = torch.stack(
        [
            radius01 * torch.cos(angle01),
            radius01 * torch.sin(angle01),
            radius23 * torch.cos(angle23),
            radius23 * torch.sin(angle23),
        ],
        dim=1,
    )
    return z.reshape(-1)[:n].to(device=device, dtype=dtype)


def fused_step(
    grads: torch.Tensor,
    scores: torch.Tensor,
    weights: Optional[torch.Tensor],
    lam: float,
    selection: str,
    threshold_rule: str,
    k: float,
    quantile: float,
    tau: float,
    temperature: float,
    max_grad_norm: Optional[float],
    noise_multiplier: float,
    clip_scope: str,
    denom: float,
    seed: int,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ĝ = (Σ_i w_i·c_i·g_i + σ·C·ξ) / D over per-sample gradients [B, P].

    Returns (grad[P], weights[B], risk[B], norms[B], coeff[B]) in the accumulation dtype.
    `weights`, when given, replaces the computed w_i (the risk still comes from the scores).
    """
    acc = accumulation_dtype(grads.dtype)
    w, risk = demem_weights(scores, lam, selection, threshold_rule, k, quantile, tau, temperature)
    w64 = (weights if weights is not None else w).to(torch.float64)
    r64 = risk.to(torch.float64)
    norms = torch.linalg.vector_norm(grads.to(torch.float64), dim=1)
    clip = clip_factors(norms, r64, max_grad_norm, clip_scope)
    coeff = (w64 * clip).to(acc)
    grad = coeff @ grads.to(acc)
    if noise_multiplier > 0:
        std = noise_multiplier * (max_grad_norm if max_grad_norm is not None else 1.0)
        grad = grad + std * philox_normal(grads.shape[1], seed, offset, grads.device, acc)
    grad = grad / denom
    return grad, w64.to(acc), risk.to(acc), norms.to(acc), coeff
