"""ε from dp-accounting against an independent implementation: Opacus's RDP analysis."""

from __future__ import annotations

import pytest

from demem_ext import accounting

opacus_rdp = pytest.importorskip("opacus.accountants.analysis.rdp")

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


@pytest.mark.parametrize("q, sigma, steps, delta", [
    (0.01, 1.0, 1000, 1e-5),
    (0.05, 0.8, 500, 1e-5),
    (64 / 1198, 1.1, 570, 1e-5),
    (0.001, 2.0, 10_000, 1e-6),
    (0.2, 5.0, 100, 1e-3),
])
def test_rdp_epsilon_matches_opacus(q: float, sigma: float, steps: int, delta: float) -> None:
    rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
    expected, _ = opacus_rdp.get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    ours = accounting.epsilon(q, sigma, steps, delta, accountant="rdp")
    assert ours == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("q, sigma, steps", [(0.01, 1.0, 1000), (64 / 1198, 1.1, 570)])
def test_pld_is_tighter_than_rdp(q: float, sigma: float, steps: int) -> None:
    rdp = accounting.epsilon(q, sigma, steps, 1e-5, accountant="rdp")
    pld = accounting.epsilon(q, sigma, steps, 1e-5, accountant="pld")
    assert 0.5 * rdp < pld <= rdp * 1.01
