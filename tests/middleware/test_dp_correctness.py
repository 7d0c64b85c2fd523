"""DP correctness of the DeMem block: how batches are drawn and what ε that earns, empty Poisson batches,
one accumulation rule for both paths, closures, refused optimizers and wrappers, non-finite gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import loss_fn, make_data, make_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import demem_ext as dx
from demem_ext import accounting
from demem_ext.ops import philox_normal

B = 8


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


# ---------------------------------------------------------------- sampling and ε
def test_shuffled_batches_report_no_epsilon_and_name_the_sampling():
    cfg = dx.DeMemConfig(lam=0.0, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=B)
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dx.DeMem(model, opt, cfg, num_samples=100, seed=0) as dm:  # sampling="shuffle" by default
        dm.backward_per_sample(loss_fn, x, y)
        opt.step()
    eps, reason = dm.privacy_spent(1e-5)
    assert eps is None and "sampling='shuffle'" in reason and "PoissonBatchSampler" in reason


def test_poisson_sampling_needs_expected_batch_size_or_the_sampler():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = dx.DeMemConfig(lam=0.0, max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="expected_batch_size"):
        dx.DeMem(model, opt, cfg, num_samples=100, sampling="poisson")
    sampler = dx.PoissonBatchSampler(100, 0.05)
    dm = dx.DeMem(model, opt, cfg, sampling=sampler)
    assert dm.num_samples == 100 and dm.config.expected_batch_size == pytest.approx(5.0)
    with pytest.raises(ValueError, match="num_samples"):
        dx.DeMem(model, opt, cfg, num_samples=99, sampling=sampler)
    with pytest.raises(ValueError, match="sampling"):
        dx.DeMem(model, opt, cfg, sampling="fixed")


def test_poisson_batch_sampler_includes_each_sample_independently():
    sampler = dx.PoissonBatchSampler(200, 0.1, steps=400, generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 400
    counts = torch.zeros(200)
    for batch in batches:
        assert batch == sorted(set(batch))
        counts[batch] += 1
    assert counts.mean() == pytest.approx(40, rel=0.05)  # q·steps
    assert math.isclose(sum(map(len, batches)) / 400, sampler.expected_batch_size, rel_tol=0.05)
    again = list(dx.PoissonBatchSampler(200, 0.1, steps=400, generator=torch.Generator().manual_seed(0)))
    assert again == batches
    assert len(dx.PoissonBatchSampler(64, 0.25)) == 4  # one pass in expectation
    for bad in (dict(num_samples=0), dict(sample_rate=0.0), dict(sample_rate=1.5), dict(steps=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            dx.PoissonBatchSampler(**{**dict(num_samples=10, sample_rate=0.5), **bad})


def test_empty_poisson_batch_is_a_noise_only_step_and_is_counted():
    torch.manual_seed(0)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    sampler = dx.PoissonBatchSampler(4, 0.05, steps=20, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(x, y), batch_sampler=sampler,
                        collate_fn=dx.collate_allowing_empty(TensorDataset(x, y)))
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = dx.DeMemConfig(lam=0.0, max_grad_norm=1.0, noise_multiplier=2.0)
    sizes = []
    with dx.DeMem(model, opt, cfg, sampling=sampler, seed=3) as dm:
        for xb, yb in loader:
            assert xb.shape[1:] == (6,) and yb.dtype == torch.int64
            sizes.append(len(yb))
            offset = dm.state_dict()["offset"]
            dm.backward_per_sample(lambda m, a, b: F.cross_entropy(m(a), b, reduction="none"), xb, yb)
            opt.step()
            if len(yb) == 0:  # .grad = σ·C·ξ / D
                noise = philox_normal(sum(p.numel() for p in model.parameters()), 3, offset)
                flat = torch.cat([p.grad.flatten() for p in model.parameters()])
                torch.testing.assert_close(flat, noise * 2.0 / 0.2)
    assert 0 in sizes
    eps, reason = dm.privacy_spent(1e-5)
    assert eps == pytest.approx(accounting.epsilon(0.05, 2.0, 20, 1e-5)) and "20 noisy steps" in reason


def test_skipped_step_warns_that_no_noise_was_added():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dx.DeMem(model, opt, lam=0.0, max_grad_norm=1.0, noise_multiplier=1.0) as dm:
        with pytest.warns(RuntimeWarning, match="no noise"):
            opt.step()
    assert dm.privacy_spent(1e-5)[0] is None


def test_noise_multiplier_for_matches_opacus_within_two_percent():
    opacus_utils = pytest.importorskip("opacus.accountants.utils")
    for target, q, steps in ((1.0, 0.01, 1000), (8.0, 0.05, 3000)):
        sigma = dx.noise_multiplier_for(target, 1e-5, q, steps)
        assert accounting.epsilon(q, sigma, steps, 1e-5) <= target
        theirs = opacus_utils.get_noise_multiplier(target_epsilon=target, target_delta=1e-5, sample_rate=q,
                                                   steps=steps)
        assert sigma == pytest.approx(theirs, rel=0.02)
    with pytest.raises(ValueError, match="target_epsilon"):
        dx.noise_multiplier_for(-1.0, 1e-5, 0.01, 100)
    with pytest.raises(ValueError, match="out of reach"):
        dx.noise_multiplier_for(1e-9, 1e-5, 0.01, 1000)


# ---------------------------------------------------------------- one accumulation rule
@pytest.mark.parametrize("expected_batch_size", [None, 2 * B])
def test_both_paths_give_the_same_grad_for_micro_batches_and_one_batch(expected_batch_size):
    model = make_model()
    x, y = make_data(n=2 * B)
    plain = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    results = {}
    for path in ("weighting", "per_sample"):
        for micro in (1, 2):
            if path == "weighting" and micro == 2 and expected_batch_size is None:
                continue  # refused: tested below
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            opt.zero_grad()
            with dx.DeMem(model, opt, lam=0.0, expected_batch_size=expected_batch_size) as dm:
                for xb, yb in zip(x.chunk(micro), y.chunk(micro)):
                    if path == "weighting":
                        dm.backward(loss_fn(model, xb, yb))
                    else:
                        dm.backward_per_sample(loss_fn, xb, yb)
                opt.step()
            results[path, micro] = _grads(model)
    for grads in results.values():
        for g, want in zip(grads, plain):
            torch.testing.assert_close(g, want)


def test_weighting_path_accumulation_without_expected_batch_size_is_refused():
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with dx.DeMem(model, opt, lam=0.0) as dm:
        dm.backward(loss_fn(model, x, y))
        with pytest.raises(ValueError, match="expected_batch_size"):
            dm.backward(loss_fn(model, x, y))
        with pytest.raises(ValueError, match="expected_batch_size"):
            dm.weighted_loss(loss_fn(model, x, y))


def test_weighted_loss_is_the_backward_of_dm_backward():
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with dx.DeMem(model, opt, lam=0.5) as dm:
        dm.backward(loss_fn(model, x, y))
        want = _grads(model)
        opt.step()
        opt.zero_grad()
        dm.weighted_loss(loss_fn(model, x, y)).backward()
        assert dm.stats.num_samples == B
        opt.step()
    for g, w in zip(_grads(model), want):
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------- closures
def test_closure_applies_the_per_sample_sum():
    model, (x, y) = make_model(), make_data()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = dx.DeMemConfig(lam=0.5, max_grad_norm=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with dx.DeMem(model, opt, cfg) as dm:
        dm.backward_per_sample(loss_fn, x, y)
        opt.step()
    without = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(start)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with dx.DeMem(model, opt, cfg) as dm:
        def closure():
            opt.zero_grad()
            dm.backward_per_sample(loss_fn, x, y)
            return loss_fn(model, x, y).mean()

        opt.step(closure)
    for k, v in model.state_dict().items():
        assert not torch.equal(v, start[k])
        torch.testing.assert_close(v, without[k])


@pytest.mark.parametrize("per_sample", [False, True])
def test_lbfgs_runs_on_both_paths(per_sample):
    model, (x, y) = make_model(), make_data()
    before = float(loss_fn(model, x, y).mean().detach())
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    cfg = dx.DeMemConfig(lam=0.0, max_grad_norm=100.0 if per_sample else None)
    with dx.DeMem(model, opt, cfg) as dm:
        def closure():
            opt.zero_grad()
            if per_sample:
                dm.backward_per_sample(loss_fn, x, y)
            else:
                dm.backward(loss_fn(model, x, y))
            return loss_fn(model, x, y).mean().detach()

        for _ in range(3):
            opt.step(closure)
    assert float(loss_fn(model, x, y).mean().detach()) < before


# ---------------------------------------------------------------- optimizers and wrappers
def test_optimizer_of_another_model_is_refused_and_frozen_parameters_are_allowed():
    model, other = make_model(), make_model()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*not a parameter of the model"):
        dx.DeMem(model, torch.optim.SGD(other.parameters(), lr=0.1))
    first = next(model.parameters())
    first.requires_grad_(False)
    dx.DeMem(model, torch.optim.SGD(model.parameters(), lr=0.1))  # a frozen parameter in the optimizer: fine


def test_opacus_wrappers_are_refused_with_the_migration():
    opacus = pytest.importorskip("opacus")
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    private_model, private_opt, _ = opacus.PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    for m, o, what in ((private_model, opt, "GradSampleModule"), (model, private_opt, "DPOptimizer")):
        with pytest.raises(ValueError, match=what) as err:
            dx.DeMem(m, o)
        assert "engine='opacus'" in str(err.value) and "README" in str(err.value)


# ---------------------------------------------------------------- non-finite gradients, overflow
class NaNGradient(nn.Module):
    """A finite loss whose gradient is NaN: 0·sqrt(w − w) has the value 0 and the derivative 0·∞."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.linear.weight
        return self.linear(x) + 0.0 * torch.sqrt(w - w).sum()


@pytest.mark.parametrize("via", ["backward", "weighted_loss"])
def test_nan_gradient_on_the_weighting_path_raises_before_anything_changes(via):
    model, x, y = NaNGradient(), torch.randn(B, 4), torch.randint(0, 3, (B,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with dx.DeMem(model, opt, lam=0.5) as dm:
        losses = F.cross_entropy(model(x), y, reduction="none")
        assert bool(torch.isfinite(losses).all())
        with pytest.raises(dx.NonFiniteError, match="non-finite"):
            if via == "backward":
                dm.backward(losses)
            else:
                dm.weighted_loss(losses).backward()
                opt.step()
        if via == "backward":
            assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, start[k])


def test_nan_gradient_with_skip_drops_the_batch():
    model, x, y = NaNGradient(), torch.randn(B, 4), torch.randint(0, 3, (B,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dx.DeMem(model, opt, lam=0.5, nonfinite="skip") as dm:
        dm.backward(F.cross_entropy(model(x), y, reduction="none"))
        assert dm.stats.num_skipped == B and dm.stats.num_samples == 0
        assert all(p.grad is None for p in model.parameters())


def test_finite_input_never_gives_a_silent_inf():
    cfg = dx.DeMemConfig(lam=0.0)
    result = dx.fused_step(torch.full((64, 10), 1e37), torch.rand(64), cfg)  # Σ overflows float32, the mean not
    torch.testing.assert_close(result.grad, torch.full((10,), 1e37))
    torch.testing.assert_close(result.norms, torch.full((64,), 1e37 * math.sqrt(10)))
    clipped = dx.fused_step(torch.full((4, 1), 3e38), torch.rand(4), cfg.replace(max_grad_norm=1.0))
    torch.testing.assert_close(clipped.grad, torch.ones(1))  # ‖g‖² overflows float32, ‖g‖ not
    with pytest.raises(ValueError, match="exceeds the range of torch.float32"):  # ‖g‖ ≈ 5.2e38
        dx.fused_step(torch.full((4, 3), 3e38), torch.rand(4), cfg.replace(max_grad_norm=1.0))
    with pytest.raises(ValueError, match="lam"):
        dx.DeMemConfig(lam=1e39)
    weights, risk = dx.demem_weights(torch.tensor([1e300, -1e300, 0.0, 0.0], dtype=torch.float64),
                                     dx.DeMemConfig(lam=0.5))
    assert risk.tolist() == [1.0, 0.0, 0.0, 0.0] and weights.tolist() == [0.5, 1.0, 1.0, 1.0]


def test_rescaled_update_matches_the_unscaled_one_with_noise_and_clipping():
    torch.manual_seed(0)
    g = torch.randn(16, 40, dtype=torch.float64)
    scores = torch.rand(16)
    cfg = dx.DeMemConfig(lam=0.5, max_grad_norm=2.0, noise_multiplier=0.7, expected_batch_size=16)
    want = dx.fused_step(g, scores, cfg, seed=5, offset=2)
    big = 2.0**1000
    got = dx.fused_step(g * big, scores, cfg.replace(max_grad_norm=2.0 * big), seed=5, offset=2)
    torch.testing.assert_close(got.grad / big, want.grad, rtol=1e-5, atol=1e-9)  # c_i = C/(‖g_i‖ + 1e-6)
    torch.testing.assert_close(got.coeff, want.coeff, rtol=1e-5, atol=1e-9)
    f32 = dx.fused_step((g * 2.0**120).float(), scores, cfg.replace(max_grad_norm=2.0 * 2.0**120), seed=5, offset=2)
    torch.testing.assert_close(f32.grad.double() / 2.0**120, want.grad, rtol=1e-5, atol=1e-5)
