"""DP accounting for the DeMem update (docs/design.md, "Formal DP").

ε is reported only when the update is a valid Gaussian mechanism; `dp_guarantee` says whether a
configuration is one and why not. `epsilon` composes Poisson-subsampled Gaussian steps with the
dp-accounting library (RDP or PLD accountant). `privacy_spent` is the one report of a run's ε, used by
`DeMem.privacy_spent` and by the audit.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from demem_ext.config import DeMemConfig

ACCOUNTANTS = ("rdp", "pld")


def dp_guarantee(config: DeMemConfig) -> tuple[bool, str]:
    """(True, description) when every step is a Gaussian mechanism of sensitivity C; else (False, why)."""
    if config.max_grad_norm is None:
        return False, "no per-sample clipping (max_grad_norm is None): the sensitivity is unbounded"
    if config.clip_scope != "all":
        return False, ("clip_scope='high_risk' clips only high-risk samples: the other samples' "
                       "gradients are unbounded")
    if config.noise_multiplier <= 0:
        return False, "no noise (noise_multiplier = 0)"
    if config.lam > 2:
        return False, f"lam = {config.lam} > 2 allows |w_i| = |1 - lam*r_i| > 1, so ||w_i c_i g_i|| can exceed C"
    if config.lam > 0 and config.threshold != "fixed":
        return False, (f"threshold='{config.threshold}' is batch-relative: one sample's weight depends "
                       "on the other samples, so ε is not guaranteed (use lam=0 or threshold='fixed')")
    if config.lam > 0 and config.proxy != "loss":
        return False, (f"proxy='{config.proxy}' is not covered: the weight must depend only on the "
                       "sample's current loss (use proxy='loss' or lam=0)")
    return True, (f"Gaussian mechanism: per-sample clipping C = {config.max_grad_norm}, "
                  f"noise multiplier σ = {config.noise_multiplier}, |w_i| <= 1 depending on the sample only")


def epsilon(sample_rate: float, noise_multiplier: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """ε after `steps` Poisson-subsampled Gaussian steps (rate q, noise multiplier σ) at the given δ."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if steps == 0:
        return 0.0
    import dp_accounting  # imported here: it is slow to import and only needed for reports

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
        steps,
    )
    acc = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def check_delta(delta: float) -> None:
    """δ must be a real number in (0, 1)."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def privacy_spent(config: DeMemConfig, noisy_batch_sizes: Sequence[int], num_samples: Optional[int],
                  delta: float, accountant: str = "rdp",
                  secure_noise: bool = False) -> tuple[Optional[float], str]:
    """(ε, how it was computed) after the noisy steps of sizes `noisy_batch_sizes`, or (None, why not).

    The sampling rate is q = D/N with D = expected_batch_size or the mean noisy batch size.
    """
    check_delta(delta)
    valid, reason = dp_guarantee(config)
    if not valid:
        return None, f"ε is not guaranteed: {reason}"
    if num_samples is None:
        return None, "ε needs the sampling rate: pass num_samples (the dataset size) to DeMem"
    steps = len(noisy_batch_sizes)
    if steps == 0:
        return 0.0, "no noisy steps taken yet"
    batch = config.expected_batch_size or sum(noisy_batch_sizes) / steps
    rate = batch / num_samples
    if rate > 1:
        return None, f"sampling rate q = {batch}/{num_samples} > 1"
    eps = epsilon(rate, config.noise_multiplier, steps, delta, accountant)
    notes = [f"{reason}; {accountant.upper()} accountant, Poisson-subsampled Gaussian, "
             f"q = {rate:.4g}, {steps} noisy steps, δ = {delta:g}"]
    if config.expected_batch_size is None:
        notes.append("q from the mean batch size (set expected_batch_size with Poisson sampling)")
    if not secure_noise:
        notes.append("noise from a seeded generator (use secure_noise=True for deployment)")
    return eps, "; ".join(notes)
