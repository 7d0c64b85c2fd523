"""DeMem inside Lightning 2.x (the callback) and Hugging Face Accelerate (gradient accumulation)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import demem_ext as dx

pl = pytest.importorskip("lightning.pytorch")
accelerate = pytest.importorskip("accelerate")

from demem_ext.integrations.lightning import DeMemCallback  # noqa: E402


def _data(n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


class Classifier(pl.LightningModule):
    def __init__(self, per_sample: bool) -> None:
        super().__init__()
        self.net, self.per_sample = _net(), per_sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.per_sample:
            self.demem.backward_per_sample(_losses, x, y)
            return None
        return self.demem.weighted_loss(_losses(self, x, y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _manual(config: dx.DeMemConfig, per_sample: bool, steps: int, **options) -> nn.Module:
    """The same training in a plain loop: the reference for the framework runs."""
    module = Classifier(per_sample)
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    loader = DataLoader(_data(), batch_size=8)
    with dx.DeMem(module, opt, config, **options) as dm:
        for (x, y), _ in zip(loader, range(steps)):
            opt.zero_grad()
            if per_sample:
                dm.backward_per_sample(_losses, x, y)
            else:
                dm.backward(_losses(module, x, y))
            opt.step()
    return module


@pytest.mark.parametrize("per_sample", [False, True])
def test_lightning_callback_trains_like_the_plain_loop_and_logs(per_sample):
    config = dx.DeMemConfig(lam=0.5) if not per_sample else dx.DeMemConfig(
        lam=0.0, max_grad_norm=1.0, noise_multiplier=0.5, expected_batch_size=8)
    options = {"seed": 3} if per_sample else {}
    module = Classifier(per_sample)
    callback = DeMemCallback(config, num_samples=16, sampling="poisson" if per_sample else "shuffle", delta=1e-5,
                             **options)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, callbacks=[callback], logger=False,
                         enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning) if per_sample else _nothing():  # Lightning: training_step returned None
        trainer.fit(module, DataLoader(_data(), batch_size=8))
    want = _manual(config, per_sample, steps=2, num_samples=16,
                   sampling="poisson" if per_sample else "shuffle", **options)
    for p, q in zip(module.parameters(), want.parameters()):
        torch.testing.assert_close(p, q)
    assert not callback.demem.active and callback.demem.stats.steps == 2
    assert 0.0 <= float(trainer.callback_metrics["demem/high_risk_fraction"]) <= 1.0
    assert ("demem/epsilon" in trainer.callback_metrics) == per_sample


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_accelerate_accumulation_applies_every_micro_batch_once():
    from accelerate import Accelerator

    data = _data()
    config = dx.DeMemConfig(lam=0.0, max_grad_norm=1.0, noise_multiplier=0.5, expected_batch_size=16)
    one = _net()
    opt = torch.optim.SGD(one.parameters(), lr=0.5)
    with dx.DeMem(one, opt, config, seed=1, num_samples=16, sampling="poisson") as dm:
        dm.backward_per_sample(_losses, *data.tensors)  # one step on all 16 samples
        opt.step()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, inner = _net(), None
    inner = torch.optim.SGD(model.parameters(), lr=0.5)
    model, accelerated = accelerator.prepare(model, inner)
    with pytest.raises(ValueError, match="AcceleratedOptimizer"):
        dx.DeMem(model, accelerated, config)
    with dx.DeMem(model, accelerated.optimizer, config, seed=1, num_samples=16, sampling="poisson") as dm:
        for x, y in DataLoader(data, batch_size=8):  # two micro-batches, one update
            with accelerator.accumulate(model):
                dm.backward_per_sample(_losses, x, y)
                accelerated.step()
                accelerated.zero_grad()
    assert dm.stats.steps == 1 and len(dm.state_dict()["noisy_batch_sizes"]) == 1
    for p, q in zip(model.parameters(), one.parameters()):
        torch.testing.assert_close(p, q)
