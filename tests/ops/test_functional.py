"""Validation of the public functional ops: every error names its argument."""

from __future__ import annotations

import pytest
import torch

import demem_ext as dx
from demem_ext.config import DeMemConfig

CFG = DeMemConfig(lam=0.5, max_grad_norm=1.0)


@pytest.mark.parametrize("scores, error", [
    (torch.rand(2, 3), ValueError),
    (torch.zeros(0), ValueError),
    (torch.arange(4), ValueError),
    (torch.tensor([0.1, float("nan")]), ValueError),
    (torch.tensor([0.1, float("-inf")]), ValueError),
    ([0.1, 0.2], TypeError),
])
def test_demem_weights_bad_scores(scores, error):
    with pytest.raises(error, match="scores"):
        dx.demem_weights(scores, CFG)


def test_demem_weights_bad_config():
    with pytest.raises(TypeError, match="config"):
        dx.demem_weights(torch.rand(3), {"lam": 0.5})  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs, name", [
    (dict(n=-1), "n"), (dict(n=2.0), "n"), (dict(n=True), "n"),
    (dict(seed=-1), "seed"), (dict(seed=2**64), "seed"), (dict(seed=1.5), "seed"),
    (dict(offset=-1), "offset"), (dict(offset=2**63), "offset"),
    (dict(dtype=torch.int32), "dtype"),
])
def test_philox_normal_bad_arguments(kwargs, name):
    args = {**dict(n=8, seed=1, offset=0), **kwargs}
    with pytest.raises(ValueError, match=name):
        dx.philox_normal(**args)


def test_philox_normal_good_arguments():
    z = dx.philox_normal(10, 2**64 - 1, 2**62, dtype=torch.float64)
    assert z.shape == (10,) and z.dtype == torch.float64 and bool(torch.isfinite(z).all())
    assert dx.philox_normal(0, 0, 0).shape == (0,)


def _grads(b: int = 4, p: int = 6, **kw) -> torch.Tensor:
    return torch.randn(b, p, **kw)


@pytest.mark.parametrize("grads, scores, name", [
    (torch.rand(4), torch.rand(4), "per_sample_grads"),
    (torch.rand(2, 3, 4), torch.rand(2), "per_sample_grads"),
    (torch.zeros(0, 5), torch.zeros(0), "per_sample_grads"),
    (torch.ones(4, 6, dtype=torch.int64), torch.rand(4), "per_sample_grads"),
    (_grads(), torch.rand(3), "scores"),
    (_grads(), torch.rand(4, 1), "scores"),
    (_grads(), torch.tensor([0.1, float("nan"), 0.2, 0.3]), "scores"),
    (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), torch.rand(2), "per_sample_grads"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), torch.rand(2), "per_sample_grads"),
])
def test_fused_step_bad_shapes_and_values(grads, scores, name):
    with pytest.raises(ValueError, match=name):
        dx.fused_step(grads, scores, CFG)


def test_fused_step_bad_types():
    with pytest.raises(TypeError, match="per_sample_grads"):
        dx.fused_step([[1.0]], torch.rand(1), CFG)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="scores"):
        dx.fused_step(_grads(), [0.1] * 4, CFG)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config"):
        dx.fused_step(_grads(), torch.rand(4), "config")  # type: ignore[arg-type]


def test_fused_step_bad_weights_seed_offset():
    g, s = _grads(), torch.rand(4)
    with pytest.raises(ValueError, match="weights"):
        dx.fused_step(g, s, CFG, weights=torch.rand(3))
    with pytest.raises(ValueError, match="weights"):
        dx.fused_step(g, s, CFG, weights=torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(ValueError, match="seed"):
        dx.fused_step(g, s, CFG, seed=-5)
    with pytest.raises(ValueError, match="offset"):
        dx.fused_step(g, s, CFG, offset=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_step_device_mismatch():
    g = _grads(device="cuda")
    with pytest.raises(ValueError, match="scores"):
        dx.fused_step(g, torch.rand(4), CFG)
    with pytest.raises(ValueError, match="weights"):
        dx.fused_step(g, torch.rand(4, device="cuda"), CFG, weights=torch.ones(4))


def test_fused_step_device_mismatch_meta():
    """Device checks run before any kernel, so a meta tensor exercises them without a GPU."""
    g = torch.empty(4, 6, device="meta")
    with pytest.raises(ValueError, match="scores"):
        dx.fused_step(g, torch.rand(4), CFG)


def test_fused_step_accepts_every_float_dtype():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        result = dx.fused_step(_grads(dtype=dtype), torch.rand(4), CFG)
        assert result.grad.shape == (6,) and result.weights.shape == (4,)
