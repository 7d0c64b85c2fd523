"""The DeMem middleware against independently computed updates (docs/design.md, "The rule" and "The API")."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import demem_ext as dx
from demem_ext import middleware
from demem_ext.ops import reference
from demem_ext.config import DeMemConfig
from demem_ext.training.models import build_model
from demem_ext.grad_sample import FlatBuffer, flatten_into
from demem_ext import accounting
from conftest import B, flat, loss_fn, make_data, make_model, per_sample_reference

def expected_grad(model, x, y, cfg: DeMemConfig, seed: int = 0, offset: int = 0, denom=None,
                  fn=loss_fn) -> torch.Tensor:
    grads, losses = per_sample_reference(model, x, y, fn)
    denom = denom or cfg.expected_batch_size or x.shape[0]
    return reference.fused_step(
        grads, losses, None, cfg.lam, cfg.selection, cfg.threshold, cfg.k, cfg.quantile, cfg.tau,
        cfg.temperature, cfg.max_grad_norm, cfg.noise_multiplier, cfg.clip_scope, float(denom), seed, offset)[0]


def sgd_update(model, batches, cfg: DeMemConfig, steps: int = 1, **kwargs) -> torch.Tensor:
    """-Δθ of `steps` SGD(lr=1) steps, each over `batches` accumulated with backward_per_sample."""
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = flat(model)
    with dx.DeMem(model, opt, cfg, **kwargs) as dm:
        for _ in range(steps):
            for batch in batches:
                dm.backward_per_sample(loss_fn, *batch)
            opt.step()
    return before - flat(model)


CONFIGS = {
    "clip_all": dict(lam=0.5, max_grad_norm=0.3),
    "high_risk_quantile": dict(lam=1.0, max_grad_norm=0.5, clip_scope="high_risk", threshold="quantile",
                               quantile=0.5),
    "soft_high_risk": dict(lam=0.7, selection="soft", temperature=0.5, max_grad_norm=1.0, clip_scope="high_risk"),
    "noise": dict(lam=0.5, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=10),
    "unlearn_no_clip": dict(lam=1.5, threshold="fixed", tau=1.0),
}


# ---------------------------------------------------------------- the per-sample path
@pytest.mark.parametrize("name", CONFIGS)
def test_per_sample_update_matches_reference(name):
    cfg = DeMemConfig(**CONFIGS[name])
    model, (x, y) = make_model(), make_data()
    expected = expected_grad(model, x, y, cfg, seed=1234)
    got = sgd_update(model, [(x, y)], cfg, seed=1234)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_second_noisy_step_advances_offset():
    cfg = DeMemConfig(**CONFIGS["noise"])
    model, (x, y) = make_model(), make_data()
    size = flat(model).numel()
    mid = copy.deepcopy(model)
    first = sgd_update(mid, [(x, y)], cfg, seed=7)
    expected_second = expected_grad(mid, x, y, cfg, seed=7, offset=math.ceil(size / 4))
    both = sgd_update(model, [(x, y)], cfg, steps=2, seed=7)
    torch.testing.assert_close(both - first, expected_second, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["clip_all", "high_risk_quantile", "soft_high_risk", "noise"])
def test_chunks_match_one_chunk(name):
    cfg = DeMemConfig(**CONFIGS[name])
    x, y = make_data()
    one = sgd_update(make_model(), [(x, y)], cfg, seed=3)
    chunked = sgd_update(make_model(), [(x, y)], cfg, seed=3, chunk_size=3)
    torch.testing.assert_close(chunked, one, rtol=1e-5, atol=1e-6)


def test_automatic_chunk_size_from_memory_budget(monkeypatch):
    cfg = DeMemConfig(**CONFIGS["clip_all"])
    x, y = make_data()
    one = sgd_update(make_model(), [(x, y)], cfg)
    size = flat(make_model()).numel()
    monkeypatch.setattr(middleware, "CHUNK_BUDGET_BYTES", 2 * size * 4)  # two rows per chunk
    torch.testing.assert_close(sgd_update(make_model(), [(x, y)], cfg), one, rtol=1e-5, atol=1e-6)


def test_default_chunk_rows():
    """A quarter of the batch (at least 8 rows), at most CHUNK_BUDGET_BYTES of per-sample gradients."""
    assert middleware.default_chunk_rows(64, 208_000) == 16
    assert middleware.default_chunk_rows(65, 208_000) == 17
    assert middleware.default_chunk_rows(8, 208_000) == 8
    assert middleware.default_chunk_rows(3, 4) == 8  # small batches: one chunk
    assert middleware.default_chunk_rows(64, 44_700_000) == middleware.CHUNK_BUDGET_BYTES // 44_700_000
    assert middleware.default_chunk_rows(64, 2**40) == 1


def test_flat_buffer_is_reused():
    buf = FlatBuffer()
    a = buf.rows(4, 10, torch.float32, torch.device("cpu"))
    assert a.shape == (4, 10) and a.is_contiguous()
    assert buf.rows(3, 10, torch.float32, torch.device("cpu")).data_ptr() == a.data_ptr()  # smaller: same memory
    assert buf.rows(5, 10, torch.float32, torch.device("cpu")).shape == (5, 10)  # larger: reallocated
    assert buf.rows(2, 10, torch.float64, torch.device("cpu")).dtype == torch.float64
    pieces = [torch.randn(3, 2, 2), torch.randn(3, 5)]
    expected = torch.cat([p.reshape(3, -1) for p in pieces], dim=1)
    assert torch.equal(flatten_into(pieces, 3, torch.float32, buf), expected)
    assert torch.equal(flatten_into(pieces, 3, torch.float32, None), expected)
    buf.release()
    assert buf._matrix is None


def test_per_sample_buffer_released_on_exit():
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dx.DeMem(model, opt, max_grad_norm=1.0) as dm:
        for _ in range(2):  # the second step writes into the first step's buffer
            dm.backward_per_sample(loss_fn, x, y)
            opt.step()
        assert dm._flat._matrix is not None
    assert dm._flat._matrix is None


def test_matches_opacus_dp_sgd_with_lam_zero():
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    clip = 0.4
    model, (x, y) = make_model(), make_data()
    gsm = GradSampleModule(copy.deepcopy(model))
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=clip,
                      expected_batch_size=B)
    before = flat(gsm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F.cross_entropy(gsm(x), y).backward()
    opt.step()
    opacus_update = before - flat(gsm)
    got = sgd_update(model, [(x, y)], DeMemConfig(lam=0.0, max_grad_norm=clip, expected_batch_size=B))
    torch.testing.assert_close(got, opacus_update, rtol=1e-5, atol=1e-6)


def test_loss_fn_may_use_submodules_and_frozen_parameters():
    def by_parts(model, x, y):
        return F.cross_entropy(model[2](torch.tanh(model[0](x))), y, reduction="none")

    cfg = DeMemConfig(lam=0.5, max_grad_norm=0.3)
    model, (x, y) = make_model(), make_data()
    model[0].weight.requires_grad_(False)
    expected = expected_grad(model, x, y, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    frozen, before = model[0].weight.detach().clone(), flat(model)
    with dx.DeMem(model, opt, cfg) as dm:
        dm.backward_per_sample(by_parts, x, y)
        opt.step()
    torch.testing.assert_close(before - flat(model), expected, rtol=1e-5, atol=1e-6)
    assert model[0].weight.grad is None and torch.equal(model[0].weight, frozen)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_channels_last_conv_model(chunk_size):
    """A CNN in channels_last (NHWC) memory: the same update, and .grad in the parameter's layout."""
    cfg = DeMemConfig(lam=0.5, max_grad_norm=1.0)
    torch.manual_seed(0)
    model = build_model("cnn", 10, 1, "none").to(memory_format=torch.channels_last)
    x = torch.rand(6, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (6,))
    expected = expected_grad(model, x, y, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with dx.DeMem(model, opt, cfg, chunk_size=chunk_size) as dm:
        dm.backward_per_sample(loss_fn, x, y)
        opt.step()
    grads = [p.grad for p in model.parameters()]  # what the wrapped step wrote (lr 1)
    assert all(g.is_contiguous(memory_format=torch.channels_last) for g in grads if g.dim() == 4)
    torch.testing.assert_close(torch.cat([g.flatten() for g in grads]), expected, rtol=1e-5, atol=1e-6)


def test_float64_model():
    cfg = DeMemConfig(lam=0.5, max_grad_norm=0.3)
    model, (x, y) = make_model(dtype=torch.float64), make_data(dtype=torch.float64)
    expected = expected_grad(model, x, y, cfg)
    torch.testing.assert_close(sgd_update(model, [(x, y)], cfg), expected)


def test_per_sample_leaves_grad_alone_until_step():
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for p in model.parameters():
        p.grad = torch.full_like(p, 5.0)
    with dx.DeMem(model, opt, lam=0.5, max_grad_norm=0.3) as dm:
        dm.backward_per_sample(loss_fn, x, y)
        assert all(torch.all(p.grad == 5.0) for p in model.parameters())
        opt.step()
        assert not any(torch.all(p.grad == 5.0) for p in model.parameters())


def test_stats_per_sample_path():
    cfg = DeMemConfig(lam=0.5, max_grad_norm=0.3)
    model, (x, y) = make_model(), make_data()
    grads, losses = per_sample_reference(model, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with dx.DeMem(model, opt, cfg) as dm:
        assert dm.stats is None
        dm.backward_per_sample(loss_fn, x, y)
        stats = dm.stats
        assert stats.num_samples == B and stats.num_skipped == 0 and stats.steps == 0
        torch.testing.assert_close(stats.norms, grads.norm(dim=1), rtol=1e-5, atol=1e-6)
        weights, risk = reference.demem_weights(losses, 0.5, "hard", "mean", 1.0, 0.8, 0.0, 1.0)
        torch.testing.assert_close(stats.weights, weights)
        assert stats.high_risk_fraction == pytest.approx(float((risk > 0.5).float().mean()))
        assert stats.clip_fraction == pytest.approx(float((grads.norm(dim=1) + 1e-6 > 0.3).float().mean()))
        opt.step()
        assert dm.stats.steps == 1 and dm.stats.num_samples == B


# ---------------------------------------------------------------- the weighting path
@pytest.mark.parametrize("expected_batch_size", [None, 20])
def test_weighting_path_is_gradient_of_weighted_mean(expected_batch_size):
    cfg = DeMemConfig(lam=0.8, threshold="quantile", quantile=0.6, expected_batch_size=expected_batch_size)
    model, (x, y) = make_model(), make_data()
    losses = loss_fn(model, x, y)
    weights, _ = reference.demem_weights(losses.detach(), cfg.lam, cfg.selection, cfg.threshold, cfg.k,
                                         cfg.quantile, cfg.tau, cfg.temperature)
    expected = torch.autograd.grad((weights * losses).sum() / (expected_batch_size or B), list(model.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with dx.DeMem(model, opt, cfg) as dm:
        dm.backward(loss_fn(model, x, y))
        assert dm.stats.norms is None and dm.stats.clip_fraction is None
        torch.testing.assert_close(dm.stats.weights, weights)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)


def test_weighting_path_lam_zero_is_plain_mean_and_accumulates():
    model, (x, y) = make_model(), make_data()
    plain = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with dx.DeMem(model, opt, lam=0.0) as dm:
        dm.backward(loss_fn(model, x, y))
        for p, g in zip(model.parameters(), plain):
            torch.testing.assert_close(p.grad, g)
        with pytest.raises(ValueError, match="expected_batch_size"):  # D = B per call: 2x the gradient
            dm.backward(loss_fn(model, x, y))
    opt.zero_grad()
    with dx.DeMem(model, opt, lam=0.0, expected_batch_size=2 * B) as dm:
        dm.backward(loss_fn(model, x, y))  # two micro-batches of one step: (1/D)·Σ over both
        dm.backward(loss_fn(model, x, y))
        assert dm.stats.num_samples == 2 * B
    for p, g in zip(model.parameters(), plain):
        torch.testing.assert_close(p.grad, g)


def test_weighting_path_refuses_clipping_and_noise():
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for overrides in (dict(max_grad_norm=1.0), dict(noise_multiplier=1.0)):
        with dx.DeMem(model, opt, **overrides) as dm, pytest.raises(ValueError, match="backward_per_sample"):
            dm.backward(loss_fn(model, x, y))


def test_weighting_path_validation():
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with dx.DeMem(model, opt) as dm:
        with pytest.raises(ValueError, match="per_sample_losses"):
            dm.backward(loss_fn(model, x, y).reshape(2, 4))
        with pytest.raises(ValueError, match="requires? grad"):
            dm.backward(loss_fn(model, x, y).detach())
        with pytest.raises(ValueError, match="indices"):
            dm.backward(loss_fn(model, x, y), indices=torch.arange(3))


# ---------------------------------------------------------------- wrapping the optimizer
class PlainSGD(torch.optim.Optimizer):
    """A user's own optimizer subclass."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01),
    "custom": lambda ps: PlainSGD(ps),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("path", ["weighting", "per_sample"])
def test_optimizer_step_restored_exactly(name, path):
    model, (x, y) = make_model(), make_data()
    opt = OPTIMIZERS[name](model.parameters())
    assert "step" not in vars(opt)
    before = flat(model)
    with dx.DeMem(model, opt, lam=0.5, max_grad_norm=1.0 if path == "per_sample" else None) as dm:
        assert "step" in vars(opt)
        if path == "weighting":
            dm.backward(loss_fn(model, x, y))
        else:
            dm.backward_per_sample(loss_fn, x, y)
        opt.step()
    assert not torch.equal(before, flat(model))
    assert "step" not in vars(opt)
    assert opt.step.__func__ is type(opt).step


def test_lr_scheduler_wrapper_restored_and_still_works():
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    saved = vars(opt)["step"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would fail
        with dx.DeMem(model, opt, lam=0.5) as dm:
            dm.backward(loss_fn(model, x, y))
            opt.step()
            sched.step()
    assert vars(opt)["step"] is saved
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_lr_scheduler_created_inside_block():
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dx.DeMem(model, opt, lam=0.5, max_grad_norm=1.0) as dm:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        dm.backward_per_sample(loss_fn, x, y)
        opt.step()
        sched.step()
        assert dm.stats.steps == 1
    assert "step" not in vars(opt)


def test_context_misuse_is_a_runtime_error():
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dm = dx.DeMem(model, opt, lam=0.5)
    with pytest.raises(RuntimeError, match="inside"):
        dm.backward(loss_fn(model, x, y))
    with pytest.raises(RuntimeError, match="inside"):
        dm.backward_per_sample(loss_fn, x, y)
    with dm:
        with pytest.raises(RuntimeError, match="already active"):
            dm.__enter__()
        with pytest.raises(RuntimeError, match="another active DeMem"):
            dx.DeMem(model, opt).__enter__()
        stale_step = opt.step
    with pytest.raises(RuntimeError, match="exited"):
        stale_step()
    with dm:  # a DeMem can be used again in a later block
        dm.backward(loss_fn(model, x, y))
        opt.step()
    assert "step" not in vars(opt)


def test_mixing_paths_before_a_step_is_a_runtime_error():
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dx.DeMem(model, opt, lam=0.5) as dm:
        dm.backward(loss_fn(model, x, y))
        with pytest.raises(RuntimeError, match="mix"):
            dm.backward_per_sample(loss_fn, x, y)
        opt.step()
        dm.backward_per_sample(loss_fn, x, y)
        with pytest.raises(RuntimeError, match="mix"):
            dm.backward(loss_fn(model, x, y))
        opt.step()


def test_exit_with_pending_sums_warns():
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="discarded"):
        with dx.DeMem(model, opt, max_grad_norm=1.0) as dm:
            dm.backward_per_sample(loss_fn, x, y)


# ---------------------------------------------------------------- accumulation
def test_accumulation_equals_one_call_and_adds_noise_once():
    cfg = DeMemConfig(lam=0.5, threshold="fixed", tau=1.0, max_grad_norm=0.5, noise_multiplier=1.0)
    model, (x, y) = make_model(), make_data()
    expected = expected_grad(model, x, y, cfg, seed=11)  # D = 8 samples accumulated, noise once
    halves = [(x[:4], y[:4]), (x[4:], y[4:])]
    got = sgd_update(copy.deepcopy(model), halves, cfg, seed=11)
    one = sgd_update(copy.deepcopy(model), [(x, y)], cfg, seed=11)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, one, rtol=1e-5, atol=1e-6)


def test_changed_trainable_parameters_while_pending():
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dx.DeMem(model, opt, max_grad_norm=1.0) as dm:
        dm.backward_per_sample(loss_fn, x, y)
        model[0].bias.requires_grad_(False)
        with pytest.raises(RuntimeError, match="changed"):
            dm.backward_per_sample(loss_fn, x, y)
        model[0].bias.requires_grad_(True)
        opt.step()


# ---------------------------------------------------------------- the trace proxy
def test_trace_is_an_ema_and_needs_indices():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="num_samples"):
        dx.DeMem(model, opt, proxy="trace")
    cfg = DeMemConfig(lam=1.0, proxy="trace", trace_decay=0.5, threshold="fixed", tau=2.0)
    first = torch.tensor([1.0, 3.0, 0.5])
    second = torch.tensor([3.0, 3.0, 0.5])
    idx = torch.tensor([4, 0, 9])
    with dx.DeMem(model, opt, cfg, num_samples=10) as dm:
        with pytest.raises(ValueError, match="indices"):
            dm.backward(first.clone().requires_grad_())
        with pytest.raises(ValueError, match="indices"):
            dm.backward(first.clone().requires_grad_(), indices=torch.tensor([4, 0, 10]))
        with pytest.raises(ValueError, match="unique"):
            dm.backward(first.clone().requires_grad_(), indices=torch.tensor([4, 4, 9]))
        dm.backward(first.clone().requires_grad_(), indices=idx)
        opt.step()
        trace = dm.state_dict()["trace"]
        torch.testing.assert_close(trace[idx], first.double())
        losses = second.clone().requires_grad_()
        dm.backward(losses, indices=idx)
        ema = 0.5 * first + 0.5 * second  # [2.0, 3.0, 0.5]: sample 4 is not above tau = 2 any more
        torch.testing.assert_close(dm.state_dict()["trace"][idx], ema.double())
        torch.testing.assert_close(losses.grad, torch.tensor([1.0, 0.0, 1.0]) / 3)
        assert dm.state_dict()["visited"].sum() == 3


def test_ztrace_is_an_ema_of_batch_z_scores():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="ztrace"):
        dx.DeMem(model, opt, proxy="ztrace")
    cfg = DeMemConfig(lam=1.0, proxy="ztrace", trace_decay=0.5, threshold="fixed", tau=0.5)
    first = torch.tensor([1.0, 3.0, 0.5, 2.0])
    second = 0.1 * torch.tensor([4.0, 3.0, 1.0, 2.0])  # every loss falls; the ranks move
    idx = torch.tensor([4, 0, 9, 2])

    def z(v):
        return (v - v.mean()) / v.std(correction=0)

    with dx.DeMem(model, opt, cfg, num_samples=10) as dm:
        with pytest.raises(ValueError, match="ztrace"):
            dm.backward(first.clone().requires_grad_())
        dm.backward(first.clone().requires_grad_(), indices=idx)
        opt.step()
        torch.testing.assert_close(dm.state_dict()["trace"][idx], z(first.double()))
        losses = second.clone().requires_grad_()
        dm.backward(losses, indices=idx)
        ema = 0.5 * z(first.double()) + 0.5 * z(second.double())  # [0.35, 0.94, -1.26, -0.03]
        torch.testing.assert_close(dm.state_dict()["trace"][idx], ema)
        torch.testing.assert_close(losses.grad, torch.tensor([1.0, 0.0, 1.0, 1.0]) / 4)  # above τ: sample 0
        opt.step()
        dm.backward(torch.ones(3, requires_grad=True), indices=torch.tensor([1, 3, 5]))  # std 0: z = 0
        assert torch.equal(dm.state_dict()["trace"][torch.tensor([1, 3, 5])], torch.zeros(3, dtype=torch.float64))


def test_iqr_is_the_interquartile_range_of_the_last_losses():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="iqr"):
        dx.DeMem(model, opt, proxy="iqr")
    cfg = DeMemConfig(lam=1.0, proxy="iqr", trace_window=3, threshold="fixed", tau=0.5)
    visits = [[1.0, 3.0, 0.5], [3.0, 3.0, 0.5], [2.0, 3.0, 5.0], [1.0, 1.0, 1.0]]
    # windows after each visit (oldest first) and their IQRs (linear interpolation):
    # [1], [3], [.5] -> 0, 0, 0; [1 3], [3 3], [.5 .5] -> 1, 0, 0;
    # [1 3 2], [3 3 3], [.5 .5 5] -> 1, 0, 2.25; the oldest dropped: [3 2 1], [3 3 1], [.5 5 1] -> 1, 1, 2.25
    iqrs = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 2.25], [1.0, 1.0, 2.25]]
    idx = torch.tensor([4, 0, 9])
    with dx.DeMem(model, opt, cfg, num_samples=10) as dm:
        with pytest.raises(ValueError, match="indices"):
            dm.backward(torch.ones(3, requires_grad=True))
        for visit, iqr in zip(visits, iqrs):
            losses = torch.tensor(visit, requires_grad=True)
            dm.backward(losses, indices=idx)
            high = torch.tensor(iqr) > 0.5
            torch.testing.assert_close(losses.grad, (~high).float() / 3)
            opt.step()
        window = dm.state_dict()["trace"]
        assert window.shape == (10, 3) and bool(window[1].isnan().all())  # sample 1: never visited
        torch.testing.assert_close(window[idx], torch.tensor(visits[1:], dtype=torch.float64).T)
        state = dm.state_dict()
    with dx.DeMem(model, opt, cfg, num_samples=10) as resumed:
        resumed.load_state_dict(state)
        torch.testing.assert_close(resumed.state_dict()["trace"], window, equal_nan=True)
        with pytest.raises(ValueError, match="trace"):
            resumed.load_state_dict({**state, "trace": window[:, :2]})  # another window
    with pytest.raises(ValueError, match="trace_window"):
        DeMemConfig(proxy="iqr", trace_window=1)


def test_trace_on_per_sample_path():
    model, (x, y) = make_model(), make_data()
    _, losses = per_sample_reference(model, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with dx.DeMem(model, opt, proxy="trace", num_samples=20, max_grad_norm=1.0, chunk_size=3) as dm:
        dm.backward_per_sample(loss_fn, x, y, indices=torch.arange(10, 18))
        opt.step()
        torch.testing.assert_close(dm.state_dict()["trace"][10:18], losses.double(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- bad input changes nothing
def _snapshot(model, opt, dm):
    return (flat(model), [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            copy.deepcopy(opt.state_dict()), dm.state_dict())


def _assert_same(a, b):
    assert torch.equal(a[0], b[0])
    assert all((g is None and h is None) or torch.equal(g, h) for g, h in zip(a[1], b[1]))
    assert str(a[2]) == str(b[2])
    for key in a[3]:
        assert torch.equal(torch.as_tensor(a[3][key]), torch.as_tensor(b[3][key]))


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_nonfinite_error_changes_nothing(chunk_size):
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    bad_x = x.clone()
    bad_x[5, 1] = float("nan")
    with dx.DeMem(model, opt, proxy="trace", num_samples=B, max_grad_norm=1.0, chunk_size=chunk_size) as dm:
        dm.backward_per_sample(loss_fn, x, y, indices=torch.arange(B))
        opt.step()
        dm.backward_per_sample(loss_fn, x[:4], y[:4], indices=torch.arange(4))  # pending
        state = _snapshot(model, opt, dm)
        with pytest.raises(ValueError, match=r"non-finite.*\[1\]"):
            dm.backward_per_sample(loss_fn, bad_x[4:], y[4:], indices=torch.arange(4, B))
        _assert_same(state, _snapshot(model, opt, dm))
        assert dm.stats.num_samples == 4  # the failed call left no trace in the stats either
        opt.step()


def test_nonfinite_loss_on_weighting_path_changes_nothing():
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dx.DeMem(model, opt, lam=0.5, expected_batch_size=2 * B) as dm:
        dm.backward(loss_fn(model, x, y))
        state = _snapshot(model, opt, dm)
        losses = loss_fn(model, x, y) * torch.tensor([1.0] * 7 + [float("inf")])
        with pytest.raises(ValueError, match="per_sample_losses has non-finite"):
            dm.backward(losses)
        _assert_same(state, _snapshot(model, opt, dm))


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_skip_drops_and_counts(chunk_size):
    cfg = DeMemConfig(lam=0.5, max_grad_norm=0.3)
    model, (x, y) = make_model(), make_data()
    keep = torch.tensor([True, True, False, True, True, True, True, True])
    expected = expected_grad(model, x[keep], y[keep], cfg)  # threshold and D over the 7 kept samples
    bad_x = x.clone()
    bad_x[2] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = flat(model)
    with dx.DeMem(model, opt, cfg, nonfinite="skip", chunk_size=chunk_size) as dm:
        dm.backward_per_sample(loss_fn, bad_x, y)
        assert (dm.stats.num_samples, dm.stats.num_skipped) == (7, 1)
        opt.step()
    torch.testing.assert_close(before - flat(model), expected, rtol=1e-5, atol=1e-6)


def sqrt_loss(model, x, y):
    """Finite loss 0 for a zero input, but its gradient is NaN (d sqrt(u)/du = inf at u = 0, times 0)."""
    return model(x).abs().sum(dim=1).sqrt()


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_nonfinite_gradients_with_finite_losses(chunk_size):
    cfg = DeMemConfig(lam=0.5, max_grad_norm=0.3)
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    x, y = make_data()
    x[3] = 0.0
    keep = torch.arange(B) != 3
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with dx.DeMem(model, opt, cfg, chunk_size=chunk_size) as dm:
        with pytest.raises(ValueError, match=r"non-finite per-sample gradients.*\[3\]"):
            dm.backward_per_sample(sqrt_loss, x, y)
    grads, losses = per_sample_reference(model, x[keep], y[keep], sqrt_loss)
    if chunk_size is None:  # one chunk: the sample is dropped before the threshold
        expected = expected_grad(model, x[keep], y[keep], cfg, fn=sqrt_loss)
    else:  # several chunks: the batch threshold, from the finite losses, was fixed before the gradients
        _, all_losses = per_sample_reference(model, x, y, sqrt_loss)
        tau = reference.threshold(all_losses, "mean", cfg.k, cfg.quantile, cfg.tau)
        expected = reference.fused_step(grads, losses, None, cfg.lam, "hard", "fixed", 0.0, 0.5, tau, 1.0,
                                        0.3, 0.0, "all", 7.0, 0, 0)[0]
    before = flat(model)
    with dx.DeMem(model, opt, cfg, chunk_size=chunk_size, nonfinite="skip") as dm:
        dm.backward_per_sample(sqrt_loss, x, y)
        assert (dm.stats.num_samples, dm.stats.num_skipped) == (7, 1)
        opt.step()
    torch.testing.assert_close(before - flat(model), expected, rtol=1e-5, atol=1e-6)


def test_skip_on_weighting_path_excludes_from_threshold():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = torch.tensor([1.0, 2.0, float("nan"), 3.0, 10.0], requires_grad=True)
    finite = torch.tensor([1.0, 2.0, 3.0, 10.0])
    weights, _ = reference.demem_weights(finite, 1.0, "hard", "mean", 1.0, 0.8, 0.0, 1.0)
    with dx.DeMem(model, opt, lam=1.0, nonfinite="skip") as dm:
        dm.backward(losses)
        assert (dm.stats.num_samples, dm.stats.num_skipped) == (4, 1)
    expected = torch.zeros(5)
    expected[[0, 1, 3, 4]] = weights / 4
    torch.testing.assert_close(losses.grad, expected)


def test_per_sample_validation():
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dx.DeMem(model, opt, max_grad_norm=1.0) as dm:
        with pytest.raises(ValueError, match=r"batch\[1\]"):
            dm.backward_per_sample(loss_fn, x, y[:7])
        with pytest.raises(TypeError, match=r"batch\[1\]"):
            dm.backward_per_sample(loss_fn, x, [0] * B)
        with pytest.raises(ValueError, match="per-sample losses"):
            dm.backward_per_sample(lambda m, x, y: loss_fn(m, x, y).mean(), x, y)
        with pytest.raises(ValueError, match="indices"):
            dm.backward_per_sample(loss_fn, x, y, indices=torch.arange(B) - 1)
        with pytest.raises(TypeError, match="loss_fn"):
            dm.backward_per_sample("not callable", x, y)
        assert dm.stats is None


def test_batchnorm_refused_in_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    x, y = make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dx.DeMem(model, opt, max_grad_norm=1.0) as dm:
        with pytest.raises(ValueError, match="BatchNorm.*GroupNorm"):
            dm.backward_per_sample(loss_fn, x, y)
        model.eval()
        dm.backward_per_sample(loss_fn, x, y)
        opt.step()


# ---------------------------------------------------------------- noise seeds
def test_noise_reproducible_under_manual_seed():
    cfg = DeMemConfig(lam=0.0, max_grad_norm=1.0, noise_multiplier=1.0)
    x, y = make_data()
    runs = []
    for torch_seed in (5, 5, 6):
        model = make_model()
        torch.manual_seed(torch_seed)
        runs.append(sgd_update(model, [(x, y)], cfg))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_secure_noise_uses_a_fresh_os_seed_per_step(monkeypatch):
    cfg = DeMemConfig(lam=0.5, max_grad_norm=1.0, noise_multiplier=1.0)
    model, (x, y) = make_model(), make_data()
    with pytest.raises(ValueError, match="secure_noise"):
        dx.DeMem(model, torch.optim.SGD(model.parameters(), lr=1.0), cfg, seed=1, secure_noise=True)
    x_, y_ = make_data()
    unpatched = [sgd_update(make_model(), [(x_, y_)], cfg, secure_noise=True) for _ in range(2)]
    assert not torch.equal(unpatched[0], unpatched[1])

    draws = iter([bytes(range(8)), bytes(range(8, 16))])
    monkeypatch.setattr(middleware.noise.os, "urandom", lambda n: next(draws))
    mid = copy.deepcopy(model)
    expected_first = expected_grad(model, x, y, cfg, seed=int.from_bytes(bytes(range(8)), "little"))
    got_both = sgd_update(model, [(x, y)], cfg, steps=2, secure_noise=True)
    mid_first = sgd_update(mid, [(x, y)], cfg, seed=int.from_bytes(bytes(range(8)), "little"))
    torch.testing.assert_close(mid_first, expected_first, rtol=1e-5, atol=1e-6)
    expected_second = expected_grad(mid, x, y, cfg, seed=int.from_bytes(bytes(range(8, 16)), "little"))
    torch.testing.assert_close(got_both - mid_first, expected_second, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- state_dict
def test_state_dict_round_trip(tmp_path):
    cfg = DeMemConfig(lam=0.5, proxy="trace", max_grad_norm=1.0, noise_multiplier=0.5, threshold="fixed", tau=1.0)
    x, y = make_data()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dx.DeMem(model, opt, cfg, num_samples=B, seed=21) as dm:
        dm.backward_per_sample(loss_fn, x, y, indices=torch.arange(B))
        opt.step()
    path = tmp_path / "demem.pt"
    torch.save(dm.state_dict(), path)
    state = torch.load(path, weights_only=True)

    clone = copy.deepcopy(model)
    clone_opt = torch.optim.SGD(clone.parameters(), lr=0.1)
    restored = dx.DeMem(clone, clone_opt, cfg, num_samples=B, seed=99)
    restored.load_state_dict(state)
    for demem, m, o in ((dm, model, opt), (restored, clone, clone_opt)):
        with demem:
            demem.backward_per_sample(loss_fn, x, y, indices=torch.arange(B))
            o.step()
    assert torch.equal(flat(model), flat(clone))
    assert restored.stats.steps == dm.stats.steps == 2
    assert restored.privacy_spent(1e-5) == dm.privacy_spent(1e-5)

    with pytest.raises(ValueError, match="keys"):
        restored.load_state_dict({"trace": state["trace"]})
    with pytest.raises(ValueError, match="trace"):
        restored.load_state_dict({**state, "trace": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="offset"):
        restored.load_state_dict({**state, "offset": -1})
    buffer = io.BytesIO()
    torch.save(restored.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["steps"] == 2


# ---------------------------------------------------------------- privacy accounting
def _noisy_run(cfg: DeMemConfig, steps: int = 2, num_samples=100, sampling="poisson"):
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dx.DeMem(model, opt, cfg, num_samples=num_samples, num_classes=3, seed=0, sampling=sampling) as dm:
        assert dm.privacy_spent(1e-5)[0] in (0.0, None)
        for _ in range(steps):
            dm.backward_per_sample(loss_fn, x, y, labels=y)
            opt.step()
    return dm


@pytest.mark.parametrize("overrides, sampling", [
    (dict(lam=0.0), "poisson"), (dict(lam=1.0, threshold="fixed", tau=1.0), "poisson"),
    (dict(lam=0.0, expected_batch_size=None), dx.PoissonBatchSampler(100, 0.08))])
def test_privacy_spent_valid(overrides, sampling):
    cfg = DeMemConfig(**{**dict(max_grad_norm=1.0, noise_multiplier=1.1, expected_batch_size=8), **overrides})
    eps, reason = _noisy_run(cfg, sampling=sampling).privacy_spent(1e-5)
    assert eps == pytest.approx(accounting.epsilon(8 / 100, 1.1, 2, 1e-5)) and eps > 0
    assert "RDP" in reason
    pld, _ = _noisy_run(cfg, sampling=sampling).privacy_spent(1e-5, accountant="pld")
    assert 0 < pld <= eps * 1.05


@pytest.mark.parametrize("overrides, why", [
    (dict(lam=0.5), "batch-relative"),
    (dict(lam=0.5, threshold="class"), "class-relative"),
    (dict(lam=0.5, threshold="quantile"), "batch-relative"),
    (dict(clip_scope="high_risk", lam=0.0), "high_risk"),
    (dict(noise_multiplier=0.0, lam=0.0), "noise"),
    (dict(max_grad_norm=None, lam=0.0), "clipping"),
    (dict(lam=3.0, threshold="fixed"), "lam"),
])
def test_privacy_spent_invalid(overrides, why):
    cfg = DeMemConfig(**{**dict(max_grad_norm=1.0, noise_multiplier=1.0), **overrides})
    eps, reason = _noisy_run(cfg, steps=1, sampling="shuffle").privacy_spent(1e-5)
    assert eps is None and why in reason


def test_privacy_spent_needs_num_samples_and_valid_delta():
    cfg = DeMemConfig(lam=0.0, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=8)
    dm = _noisy_run(cfg, steps=1, num_samples=None)
    eps, reason = dm.privacy_spent(1e-5)
    assert eps is None and "num_samples" in reason
    with pytest.raises(ValueError, match="delta"):
        dm.privacy_spent(1.5)
    ok, reason = accounting.dp_guarantee(DeMemConfig(lam=0.5, proxy="trace", threshold="fixed",
                                                      max_grad_norm=1.0, noise_multiplier=1.0))
    assert not ok and "trace" in reason


def test_epsilon_validation():
    assert accounting.epsilon(0.1, 1.0, 0, 1e-5) == 0.0
    for kwargs, name in [(dict(sample_rate=0.0), "sample_rate"), (dict(noise_multiplier=0.0), "noise_multiplier"),
                         (dict(steps=-1), "steps"), (dict(delta=1.0), "delta"), (dict(accountant="x"), "accountant")]:
        args = {**dict(sample_rate=0.1, noise_multiplier=1.0, steps=10, delta=1e-5), **kwargs}
        with pytest.raises(ValueError, match=name):
            accounting.epsilon(**args)


# ---------------------------------------------------------------- constructor validation
@pytest.mark.parametrize("kwargs, error, name", [
    (dict(model="nope"), TypeError, "model"),
    (dict(optimizer="nope"), TypeError, "optimizer"),
    (dict(config="nope"), TypeError, "config"),
    (dict(bogus=1), ValueError, "bogus"),
    (dict(lam=-1.0), ValueError, "lam"),
    (dict(num_samples=0), ValueError, "num_samples"),
    (dict(nonfinite="ignore"), ValueError, "nonfinite"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.5), ValueError, "chunk_size"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(secure_noise="yes"), ValueError, "secure_noise"),
])
def test_constructor_validation(kwargs, error, name):
    model = make_model()
    args = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    args.update(kwargs)
    with pytest.raises(error, match=name):
        dx.DeMem(**args)


def test_overrides_apply_to_config():
    model = make_model()
    dm = dx.DeMem(model, torch.optim.SGD(model.parameters(), lr=0.1), DeMemConfig(lam=0.2), k=2.0)
    assert dm.config == DeMemConfig(lam=0.2, k=2.0)
