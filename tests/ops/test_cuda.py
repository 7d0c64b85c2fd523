"""The CUDA kernels against the CPU extension and the reference (skipped without a GPU).

Same comparisons as test_ops.py / test_philox.py, on the device: the noise stream (CUDA == CPU ==
reference to a few float32 ulps: CUDA's logf/sinf/cosf are within 1-2 ulps, like glibc and SLEEF),
the weights (bit-exact thresholds for the quantile and fixed rules), the fused step for every dtype
and for the launch geometries of the kernels (vector and scalar loads, split rows, split columns,
large P), opcheck on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from demem_ext import ops
from demem_ext.ops import loader
from demem_ext.ops import reference

HAVE_CUDA = ops.extension_loaded() and ops.extension_has_cuda() and torch.cuda.is_available()
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device and demem_ext._C built with its CUDA kernels"),
]

if HAVE_CUDA:  # the shared checks of the CPU tests
    from test_ops import check_fused_against_reference, fused_cases, tau_error, unit_roundoff
else:  # keep the module importable (every test is skipped)
    def fused_cases():  # pragma: no cover
        from hypothesis import strategies as st

        return st.nothing()

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
EPS64 = 2.0**-53
NOISE_RTOL = 2e-6  # CUDA vs CPU/reference normals: a few float32 ulps
CUDA = torch.device("cuda")


def cuda_fused(*args):
    args = list(args)
    for i in (0, 1, 2):
        if isinstance(args[i], torch.Tensor):
            args[i] = args[i].to(CUDA)
    args[-2] = loader.to_signed64(args[-2])
    return torch.ops.demem.fused_step(*args)


def cpu_fused(*args):
    args = list(args)
    args[-2] = loader.to_signed64(args[-2])
    return torch.ops.demem.fused_step(*args)


# ------------------------------------------------------------------------------------------------
# Noise
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, seed, offset", [
    (0, 0, 0), (1, 0, 0), (3, 1, 0), (4, 1, 1), (1023, 42, 2**32 - 3), (4099, 2**63, 5),
    (257, 2**64 - 1, 2**40 + 3), (1_000_003, 123456789, 2**62 - 10**6), (10_000_000, 7, 0),
])
def test_philox_cuda_matches_cpu_and_reference(n, seed, offset):
    z_cuda = ops.philox_normal(n, seed, offset, CUDA)
    assert z_cuda.device.type == "cuda" and z_cuda.dtype == torch.float32
    z_cpu = ops.philox_normal(n, seed, offset, torch.device("cpu"))
    z_cuda = z_cuda.cpu().double()
    diff = (z_cuda - z_cpu.double()).abs()
    assert torch.all(diff <= NOISE_RTOL * z_cpu.double().abs() + 1e-12), float(diff.max())
    if n <= 1_000_003:
        z_ref = reference.philox_normal(n, seed, offset).double()
        assert torch.all((z_cuda - z_ref).abs() <= NOISE_RTOL * z_ref.abs() + 1e-12)


def test_philox_cuda_statistics():
    stats = pytest.importorskip("scipy.stats")
    z = ops.philox_normal(4_000_000, 2**64 - 5, 2**33, CUDA).double()
    assert abs(float(z.mean())) < 5 / 2000.0
    assert abs(float(z.std()) - 1) < 5 / (2000.0 * 2**0.5)
    assert stats.kstest(z[:1_000_000].cpu().numpy(), "norm").pvalue > 1e-4


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("selection", ["hard", "soft"])
@pytest.mark.parametrize("rule", ["mean", "quantile", "fixed"])
@pytest.mark.parametrize("batch", [1, 7, 256, 5000])
def test_weights_cuda_matches_cpu(dtype, selection, rule, batch):
    gen = torch.Generator().manual_seed(batch)
    scores = (torch.randint(0, 5, (batch,), generator=gen) * 0.5).to(dtype) if batch == 256 else \
        torch.randn(batch, generator=gen).mul(3).to(dtype)
    args = (0.75, selection, rule, 0.5, 0.8, 0.25, 0.3)
    w_cuda, r_cuda = torch.ops.demem.weights(scores.to(CUDA), *args)
    w_cpu, r_cpu = torch.ops.demem.weights(scores, *args)
    assert w_cuda.dtype == w_cpu.dtype and w_cuda.device.type == "cuda"
    w_cuda, r_cuda = w_cuda.cpu().double(), r_cuda.cpu().double()
    terr = tau_error(scores, rule, 0.5)
    t = reference.threshold(scores, rule, 0.5, 0.8, 0.25)
    away = (scores.double() - t).abs() > 2 * terr
    if selection == "hard":
        mask = away if rule == "mean" else torch.ones_like(away)
        assert torch.equal(r_cuda[mask], r_cpu.double()[mask])
        assert torch.equal(w_cuda[mask], w_cpu.double()[mask])
    else:
        u = unit_roundoff(dtype)
        r_tol = terr / (4 * 0.3) + 4 * u
        assert torch.all((r_cuda - r_cpu.double()).abs() <= r_tol)
        assert torch.all((w_cuda - w_cpu.double()).abs() <= 0.75 * r_tol + 8 * u)


# ------------------------------------------------------------------------------------------------
# Fused step
# ------------------------------------------------------------------------------------------------

CONFIGS = [
    # lam, selection, threshold, k, quantile, tau, temperature, max_grad_norm, noise, scope
    (0.5, "hard", "mean", 1.0, 0.8, 0.0, 1.0, 1.0, 1.0, "all"),
    (1.5, "soft", "quantile", 1.0, 0.7, 0.0, 0.5, 0.3, 0.5, "high_risk"),
    (0.0, "hard", "fixed", 1.0, 0.8, 0.2, 1.0, None, 0.0, "all"),
]
SHAPES = [
    (1, 1), (3, 7), (64, 100_000),     # vector loads, one row split
    (257, 10_003),                     # P % 4 != 0: scalar loads
    (5000, 100),                       # few columns: rows split across blocks + split-finish kernel
    (2, 3_000_001),                    # few rows: columns split in the norm pass
    (128, 1_000_000),                  # large
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_fused_cuda_matches_reference(dtype, shape, config):
    if shape == (128, 1_000_000) and config:
        pytest.skip("one configuration per dtype at this size is enough")
    gen = torch.Generator().manual_seed(shape[0] + 31 * shape[1] + config)
    grads = torch.randn(*shape, generator=gen).to(dtype)
    scores = torch.randn(shape[0], generator=gen)
    weights = torch.rand(shape[0], generator=gen) if config == 2 else None
    case = (grads, scores, weights, *CONFIGS[config], float(shape[0]), 2**63 + 11, 2**32 - 5)
    out = cuda_fused(*case)
    assert all(t.device.type == "cuda" for t in out)
    check_fused_against_reference(case, out, noise_rtol=NOISE_RTOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_cuda_matches_cpu_extension(dtype):
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(96, 200_003, generator=gen).to(dtype)
    scores = torch.randn(96, generator=gen)
    case = (grads, scores, None, 0.5, "hard", "quantile", 1.0, 0.8, 0.0, 1.0, 2.0, 0.8, "all", 128.0, 3, 9)
    gpu = [t.cpu().double() for t in cuda_fused(*case)]
    cpu = [t.double() for t in cpu_fused(*case)]
    u = unit_roundoff(dtype)
    assert torch.equal(gpu[1], cpu[1]) and torch.equal(gpu[2], cpu[2])  # exact τ (quantile), hard risk
    torch.testing.assert_close(gpu[3], cpu[3], rtol=4 * u + 8 * 200_003 * EPS64, atol=0)
    torch.testing.assert_close(gpu[4], cpu[4], rtol=4 * u + 8 * 200_003 * EPS64, atol=0)
    z = reference.philox_normal(200_003, 3, 9).double()
    mass = (cpu[4].abs() @ grads.double().abs()) / 128.0
    tol = 2 * (96 + 4) * u * mass + 2 * NOISE_RTOL * 1.6 * z.abs() / 128.0 + 4 * u * cpu[0].abs()
    assert torch.all((gpu[0] - cpu[0]).abs() <= tol)


def test_fused_cuda_misaligned_and_noncontiguous():
    gen = torch.Generator().manual_seed(2)
    flat = torch.randn(33 * 4096 + 1, generator=gen)
    grads = flat[1:].view(33, 4096)  # contiguous, data pointer not 16-byte aligned: scalar loads
    scores = torch.randn(33, generator=gen)
    case = (grads, scores, None, 0.5, "soft", "mean", 0.5, 0.8, 0.0, 1.0, 1.0, 1.0, "all", 33.0, 5, 0)
    check_fused_against_reference(case, cuda_fused(*case), noise_rtol=NOISE_RTOL)
    t = torch.randn(4096, 33, generator=gen).t()  # non-contiguous input
    case = (t, scores, None, 0.5, "soft", "mean", 0.5, 0.8, 0.0, 1.0, 1.0, 1.0, "all", 33.0, 5, 0)
    check_fused_against_reference(case, cuda_fused(*case), noise_rtol=NOISE_RTOL)


def test_fused_cuda_on_side_stream():
    gen = torch.Generator().manual_seed(4)
    grads = torch.randn(64, 50_000, generator=gen)
    scores = torch.randn(64, generator=gen)
    case = (grads, scores, None, 0.5, "hard", "mean", 1.0, 0.8, 0.0, 1.0, 1.0, 1.0, "all", 64.0, 5, 0)
    expected = cuda_fused(*case)
    stream = torch.cuda.Stream()
    g_dev, s_dev = grads.to(CUDA), scores.to(CUDA)
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        out = torch.ops.demem.fused_step(g_dev, s_dev, *case[2:])
    stream.synchronize()
    for a, b in zip(out, expected):
        assert torch.equal(a, b)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fused_cases())
def test_fused_cuda_property(case):
    check_fused_against_reference(case, cuda_fused(*case), noise_rtol=NOISE_RTOL)


def test_cuda_device_mismatch_is_an_error():
    with pytest.raises(RuntimeError, match="scores"):
        torch.ops.demem.fused_step(torch.rand(2, 3, device=CUDA), torch.rand(2), None, 0.5, "hard", "mean", 1.0,
                                   0.8, 0.0, 1.0, None, 0.0, "all", 2.0, 0, 0)
    with pytest.raises(RuntimeError, match="weights"):
        torch.ops.demem.fused_step(torch.rand(2, 3, device=CUDA), torch.rand(2, device=CUDA), torch.rand(2),
                                   0.5, "hard", "mean", 1.0, 0.8, 0.0, 1.0, None, 0.0, "all", 2.0, 0, 0)


def test_public_api_on_cuda():
    import demem_ext as dx
    from demem_ext.config import DeMemConfig

    assert dx.backend() == "cuda"
    cfg = DeMemConfig(lam=0.5, max_grad_norm=1.0, noise_multiplier=1.0)
    grads = torch.randn(16, 1000, device=CUDA)
    res = dx.fused_step(grads, torch.rand(16, device=CUDA), cfg, seed=3, offset=4)
    assert res.grad.device.type == "cuda"
    z = dx.philox_normal(10, 3, 4, device="cuda")
    assert z.device.type == "cuda"


# ------------------------------------------------------------------------------------------------
# opcheck on CUDA
# ------------------------------------------------------------------------------------------------

def test_opcheck_cuda():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(6, 33, generator=gen).to(CUDA)
    s = torch.randn(6, generator=gen).to(CUDA)
    samples = [
        (g, s, None, 0.5, "hard", "mean", 1.0, 0.8, 0.0, 1.0, None, 0.0, "all", 6.0, 0, 0),
        (g.half(), s.double(), torch.rand(6, device=CUDA), 0.5, "soft", "quantile", 1.0, 0.8, 0.0, 0.5, 1.0, 0.5,
         "high_risk", 10.0, -7, 3),
        (g.bfloat16()[:1], s[:1], None, 0.0, "hard", "fixed", 1.0, 0.8, 0.1, 1.0, 2.0, 1.0, "all", 1.0, 1, 2**40),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.demem.fused_step.default, args)
    torch.library.opcheck(torch.ops.demem.weights.default, (s, 0.5, "soft", "mean", 1.0, 0.8, 0.0, 1.0))
    torch.library.opcheck(torch.ops.demem.weights.default, (s.half(), 0.5, "hard", "quantile", 1.0, 0.3, 0.0, 1.0))
    for args in [(0, 0, 0), (10, 123, 4), (4097, -1, 2**33 - 7)]:
        torch.library.opcheck(torch.ops.demem.philox_normal.default, (*args, CUDA))
