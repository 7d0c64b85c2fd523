"""Screening of memorization proxies against the primary attack's per-sample vulnerability."""

from __future__ import annotations

import math

import torch

from demem_ext.audit import proxies
from demem_ext.training import TrainConfig, train


def _synthetic(m: int = 8, epochs: int = 6, n: int = 400):
    """Samples whose training loss is high are the vulnerable ones (a proxy that works), by construction."""
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(m, n, generator=g) < 0.5
    hardness = torch.rand(n, generator=g)
    record = torch.full((m, epochs, n, 2), math.nan)
    noise = 0.05 * torch.randn(m, epochs, n, 2, generator=g)
    values = hardness.view(1, 1, n, 1) + noise
    record[keep.unsqueeze(1).expand(m, epochs, n)] = values[keep.unsqueeze(1).expand(m, epochs, n)]
    scores = torch.where(keep, hardness, -hardness).expand(m, n) + 0.01 * torch.randn(m, n, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return record, labels, keep, scores


def test_a_proxy_that_tracks_the_vulnerability_ranks_it_and_noise_does_not():
    record, labels, keep, scores = _synthetic()
    columns = torch.ones(keep.shape[1], dtype=torch.bool)
    good = proxies.screen(record, labels, keep, scores, columns)["proxies"]
    assert good["loss (mean z-score)"]["spearman_rho"] > 0.9
    assert good["loss (mean z-score)"]["precision_at_top"] > 0.6
    assert good["natural loss (share of epochs high-risk)"]["spearman_rho"] > 0.5
    shuffled = record[..., torch.randperm(record.shape[2], generator=torch.Generator().manual_seed(1)), :]
    bad = proxies.screen(shuffled, labels, keep, scores, columns)["proxies"]
    assert abs(bad["loss (mean z-score)"]["spearman_rho"]) < 0.2
    assert set(good) == {"loss (share of epochs high-risk)", "loss (mean z-score)",
                         "EMA loss trace (share of epochs high-risk)", "loss-trace IQR (LT-IQR)",
                         "natural loss (share of epochs high-risk)", "class-relative loss (share of epochs high-risk)"}
    lines = proxies.format_screening(proxies.screen(record, labels, keep, scores, columns))
    assert len(lines) == 8 and "chance" in lines[-1]


def test_recording_losses_changes_no_result(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=128, attack_steps=1, seed=2)
    plain = train(cfg, tmp_path / "plain", progress=False, log=lambda _: None, train_subset=torch.arange(300))
    recorded = train(TrainConfig(**{**cfg.to_dict(), "record_losses": True}), tmp_path / "rec", progress=False,
                     log=lambda _: None, train_subset=torch.arange(300))
    for key, value in plain.model.state_dict().items():
        assert torch.equal(recorded.model.state_dict()[key], value)
    record = recorded.loss_record
    assert record.shape == (2, 300, 2) and bool(torch.isfinite(record).all())
    assert bool((record[..., 0] >= record[..., 1] - 1e-4).float().mean() > 0.9)  # adversarial ≥ natural, mostly

