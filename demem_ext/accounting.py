"""DP accounting for the DeMem update (docs/design.md, "Formal DP").

ε is reported only when the update is a valid Gaussian mechanism; `dp_guarantee` says whether a
configuration is one and why not. `epsilon` composes Poisson-subsampled Gaussian steps with the
dp-accounting library (RDP or PLD accountant), and `noise_multiplier_for` calibrates σ to a target ε. `privacy_spent` is the one report of a run's ε, used by
`DeMem.privacy_spent` and by the audit.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from demem_ext.config import DeMemConfig
from demem_ext.sampling import Sampling

ACCOUNTANTS = ("rdp", "pld")
SIGMA_RANGE = (1e-3, 1e3)  # where noise_multiplier_for searches σ


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
        return False, (f"threshold='{config.threshold}' is batch-relative (or class-relative): one sample's weight "
                       "depends on the other samples, so ε is not guaranteed (use lam=0 or threshold='fixed')")
    if config.lam > 0 and config.proxy != "loss":
        return False, (f"proxy='{config.proxy}' is not covered: the weight must depend only on the "
                       "sample's current loss (use proxy='loss' or lam=0)")
    return True, (f"Gaussian mechanism: per-sample clipping C = {config.max_grad_norm}, "
                  f"noise multiplier σ = {config.noise_multiplier}, |w_i| <= 1 depending on the sample only")


def _check_accounting(sample_rate: float, steps: int, delta: float, accountant: str) -> None:
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    check_delta(delta)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def _accountant(accountant: str) -> Any:
    import dp_accounting  # imported here: it is slow to import and only needed for reports

    return dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()


def _steps_event(sample_rate: float, noise_multiplier: float, steps: int) -> Any:
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)


def epsilon(sample_rate: float, noise_multiplier: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """ε after `steps` Poisson-subsampled Gaussian steps (rate q, noise multiplier σ) at the given δ."""
    _check_accounting(sample_rate, steps, delta, accountant)
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
    if steps == 0:
        return 0.0
    acc = _accountant(accountant)
    acc.compose(_steps_event(sample_rate, noise_multiplier, steps))
    return float(acc.get_epsilon(delta))


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = "rdp") -> float:
    """The smallest σ whose `steps` Poisson-subsampled Gaussian steps at rate q spend at most
    `target_epsilon` at δ (dp-accounting's calibration, Brent's method on ε(σ))."""
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) or not (
            math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    _check_accounting(sample_rate, steps, delta, accountant)
    if steps == 0:
        raise ValueError("steps must be >= 1 to calibrate a noise multiplier")
    import dp_accounting

    low, high = SIGMA_RANGE
    if epsilon(sample_rate, high, steps, delta, accountant) > target_epsilon:
        raise ValueError(f"target_epsilon={target_epsilon:g} is out of reach: even σ = {high:g} spends more "
                         f"(q = {sample_rate:g}, {steps} steps, δ = {delta:g})")
    if epsilon(sample_rate, low, steps, delta, accountant) <= target_epsilon:
        return low
    sigma = float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(accountant), lambda value: _steps_event(sample_rate, value, steps),
        float(target_epsilon), float(delta), bracket_interval=dp_accounting.ExplicitBracketInterval(low, high),
        tol=1e-5))
    while epsilon(sample_rate, sigma, steps, delta, accountant) > target_epsilon:  # Brent's tolerance
        sigma *= 1 + 1e-5
    return sigma


def check_delta(delta: float) -> None:
    """δ must be a real number in (0, 1)."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def privacy_spent(config: DeMemConfig, noisy_batch_sizes: Sequence[int], num_samples: Optional[int],
                  delta: float, accountant: str = "rdp", secure_noise: bool = False,
                  sampling: Sampling = Sampling("shuffle")) -> tuple[Optional[float], str]:
    """(ε, how it was computed) after the noisy steps of sizes `noisy_batch_sizes`, or (None, why not).

    ε is the Poisson-subsampled Gaussian accountant's, reported only for Poisson sampling: the rate q is the
    sampler's, or expected_batch_size / num_samples with sampling="poisson".
    """
    check_delta(delta)
    valid, reason = dp_guarantee(config)
    if not valid:
        return None, f"ε is not guaranteed: {reason}"
    if sampling.kind != "poisson":
        return None, (f"ε is not reported for sampling='{sampling.kind}' (shuffled fixed-size batches): the "
                      "accountant assumes Poisson sampling; draw batches with dx.PoissonBatchSampler and pass "
                      "it as DeMem(..., sampling=sampler)")
    rate = sampling.sample_rate
    if rate is None:
        if num_samples is None or config.expected_batch_size is None:
            return None, ("ε with sampling='poisson' needs the sampling rate q = expected_batch_size / num_samples: "
                          "set both (or pass the PoissonBatchSampler as sampling)")
        rate = config.expected_batch_size / num_samples
        if rate > 1:
            return None, f"sampling rate q = {config.expected_batch_size}/{num_samples} > 1"
    steps = len(noisy_batch_sizes)
    if steps == 0:
        return 0.0, "no noisy steps taken yet"
    eps = epsilon(rate, config.noise_multiplier, steps, delta, accountant)
    notes = [f"{reason}; {accountant.upper()} accountant, Poisson-subsampled Gaussian, "
             f"q = {rate:.4g}, {steps} noisy steps, δ = {delta:g}"]
    if not secure_noise:
        notes.append("noise from a seeded generator (use secure_noise=True for deployment)")
    return eps, "; ".join(notes)
