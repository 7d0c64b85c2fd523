"""The compiled operators (torch.ops.demem.*) against the pure-PyTorch reference.

Property tests (hypothesis) draw the batch size, the number of parameters, the dtype and every
branch of the configuration; the tensors come from a seeded torch generator. What is compared, and
why the tolerances are what they are:

- The threshold τ is computed in float64 by both sides, but the mean rule sums in a different order,
  so τ may differ by a few ulps (bounded by `tau_error`). A score within that distance of τ can
  legitimately land on either side of a hard selection, so risks and weights are compared exactly
  (hard) or to `tau_error`/(4T) + rounding (soft) only for samples away from τ. The quantile and
  fixed rules compute τ bit for bit like torch.quantile, so their hard risks must match everywhere.
- The norms are float64 sums of squares (different order): relative error ≤ P·2⁻⁵³ on each side,
  then one rounding to the output dtype.
- The update is checked against the extension's own coefficients, in float64, with the error bound
  of a length-B accumulation in the accumulation dtype (float32 for fp16/bf16/fp32, float64 for
  fp64) plus a few ulps of the noise; and against the reference update when no sample sits on the
  threshold.
The reference-only invariants at the bottom run even when the extension is not built.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demem_ext import ops
from demem_ext.ops import loader
from demem_ext.ops import reference

EXT = ops.extension_loaded()
needs_ext = pytest.mark.skipif(not EXT, reason="compiled extension demem_ext._C not loaded")
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
EPS64 = 2.0**-53
NOISE_RTOL = 1e-6  # |ξ_ext − ξ_ref| ≤ NOISE_RTOL·|ξ_ref|: a few float32 ulps (Box–Muller transcendentals)
MAX_ELEMENTS = 1_200_000  # B·P cap per example, to keep the suite fast
PROPS = settings(max_examples=200, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.function_scoped_fixture])


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of the accumulation/output dtype of `dtype`."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


IMPLS = ["reference"] + (["extension"] if EXT else [])


def run_fused(impl: str, *args):
    if impl == "extension":
        return torch.ops.demem.fused_step(*args[:-2], loader.to_signed64(args[-2]), args[-1])
    return reference.fused_step(*args)


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

@st.composite
def fused_cases(draw):
    """A random fused_step call: tensors, configuration, seed, offset."""
    size = draw(st.one_of(st.sampled_from([1, 3, 4, 7, 64, 100, 2047, 2048, 2049, 5003, 16385, 65537, 100_000]),
                          st.integers(1, 100_000)))
    batch = draw(st.one_of(st.sampled_from([1, 2, 3, 8, 33, 128, 300]), st.integers(1, 300)))
    batch = max(1, min(batch, MAX_ELEMENTS // size))
    dtype = draw(st.sampled_from(DTYPES))
    score_dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    grads = torch.randn(batch, size, generator=gen, dtype=torch.float64)
    grads *= torch.exp(torch.randn(batch, 1, generator=gen, dtype=torch.float64))  # spread of norms
    if batch > 1 and draw(st.booleans()):  # zero rows
        grads[torch.rand(batch, generator=gen) < 0.2] = 0.0
    if draw(st.booleans()):  # huge rows
        scale = 300.0 if dtype == torch.float16 else 1e15
        grads[torch.rand(batch, generator=gen) < 0.2] *= scale
    if dtype == torch.float16:
        grads = grads.clamp(-6e4, 6e4)
    grads = grads.to(dtype)
    if draw(st.booleans()):  # ties: scores on a coarse grid
        scores = torch.randint(0, 4, (batch,), generator=gen).to(torch.float64) * 0.5
    else:
        scores = torch.randn(batch, generator=gen, dtype=torch.float64) * draw(st.sampled_from([0.01, 1.0, 100.0]))
    scores = scores.to(score_dtype)
    weights = None
    if draw(st.integers(0, 4)) == 0:
        weights = (torch.rand(batch, generator=gen, dtype=torch.float64) * 3 - 1).to(draw(st.sampled_from(DTYPES)))
    selection = draw(st.sampled_from(["hard", "soft"]))
    rule = draw(st.sampled_from(["mean", "quantile", "fixed"]))
    lam = draw(st.sampled_from([0.0, 0.5, 1.0, 2.5]))
    k = draw(st.sampled_from([-0.5, 0.0, 1.0, 2.0]))
    quantile = draw(st.sampled_from([0.05, 0.5, 0.8, 0.999]))
    tau = draw(st.sampled_from([-1.0, 0.0, 0.5, 1.0]))
    temperature = draw(st.sampled_from([0.05, 1.0, 5.0]))
    max_grad_norm = draw(st.one_of(st.none(), st.sampled_from([1e-3, 0.5, 1.0, 100.0])))
    noise = draw(st.sampled_from([0.0, 0.0, 0.7, 2.0]))
    scope = draw(st.sampled_from(["all", "high_risk"]))
    denom = float(draw(st.one_of(st.just(batch), st.integers(1, 1000))))
    seed = draw(st.one_of(st.integers(0, 2**32), st.integers(2**63, 2**64 - 1)))
    offset = draw(st.one_of(st.just(0), st.integers(0, 2**40)))
    args = (grads, scores, weights, lam, selection, rule, k, quantile, tau, temperature, max_grad_norm, noise,
            scope, denom, seed, offset)
    return args


def tau_error(scores: torch.Tensor, rule: str, k: float) -> float:
    """Bound on |τ_extension − τ_reference| (different summation orders for the mean rule)."""
    if rule != "mean":
        return 0.0
    s = scores.double()
    return 16.0 * (s.numel() + 2) * EPS64 * (1.0 + abs(k)) * float(s.abs().max()) + 1e-300


def away_from_threshold(scores, rule, k, quantile, tau, terr):
    t = reference.threshold(scores, rule, k, quantile, tau)
    return (scores.double() - t).abs() > 2 * terr


# ------------------------------------------------------------------------------------------------
# Extension vs reference
# ------------------------------------------------------------------------------------------------

def check_fused_against_reference(case, ext, noise_rtol=None):
    """Asserts that the outputs `ext` of an implementation agree with the reference on `case` (CPU
    tensors). Also used by test_cuda.py for the CUDA kernels."""
    if noise_rtol is None:
        noise_rtol = NOISE_RTOL
    (grads, scores, weights, lam, selection, rule, k, quantile, tau, temperature, max_grad_norm, noise,
     scope, denom, seed, offset) = case
    ext = tuple(t.cpu() for t in ext)
    ref = run_fused("reference", *case)
    acc = reference.accumulation_dtype(grads.dtype)
    u = unit_roundoff(grads.dtype)
    batch, size = grads.shape
    for name, x, y in zip(("grad", "weights", "risk", "norms", "coeff"), ext, ref):
        assert x.dtype == y.dtype == acc, (name, x.dtype, y.dtype)
        assert x.shape == y.shape, name
    g_ext, w_ext, r_ext, n_ext, c_ext = (t.double() for t in ext)
    g_ref, w_ref, r_ref, n_ref, c_ref = (t.double() for t in ref)

    terr = tau_error(scores, rule, k)
    away = away_from_threshold(scores, rule, k, quantile, tau, terr)
    # w and r are rounded to the scores' output dtype, then to the grads' one
    score_u = max(unit_roundoff(scores.dtype), u)
    # risk
    if selection == "hard":
        assert torch.equal(r_ext[away], r_ref[away])
        r_tol = torch.zeros_like(r_ref)
        r_tol[~away] = 1.0
    else:
        r_tol = terr / (4 * temperature) + 4 * score_u + torch.zeros_like(r_ref)
        assert torch.all((r_ext - r_ref).abs() <= r_tol)
    # weights (an override is copied exactly)
    if weights is not None:
        assert torch.equal(w_ext, weights.double().to(acc).double())
        w_tol = torch.zeros_like(w_ref)
    else:
        w_tol = lam * r_tol + 4 * score_u * (1 + lam)
        mask = away if selection == "hard" else torch.ones_like(away)
        assert torch.all((w_ext - w_ref).abs()[mask] <= w_tol[mask])
    # norms
    n_rtol = 2 * u + 4 * size * EPS64
    assert torch.all((n_ext - n_ref).abs() <= n_rtol * n_ref.abs())
    # coefficients: w·c, c ∈ [0, 1]; c changes with the norm (relative n_rtol) and, for scope
    # "high_risk", with the risk.
    w_abs = torch.maximum(w_ext.abs(), w_ref.abs())
    c_tol = (n_rtol + 4 * u) * c_ref.abs() + w_tol + (w_abs * r_tol if scope == "high_risk" else 0.0) + 1e-300
    mask = away if selection == "hard" else torch.ones_like(away)
    assert torch.all((c_ext - c_ref).abs()[mask] <= c_tol[mask])

    # update vs the extension's own coefficients, in float64
    g64 = grads.double()
    std = noise * (max_grad_norm if max_grad_norm is not None else 1.0)
    z = reference.philox_normal(size, seed, offset).double() if noise > 0 else torch.zeros(size, dtype=torch.float64)
    expected = (c_ext @ g64 + std * z) / denom
    mass = (c_ext.abs() @ g64.abs() + std * z.abs()) / denom
    # the normals are float32 on both sides and agree to a few float32 ulps (test_philox.py)
    tol = (batch + 4) * u * mass + noise_rtol * std * z.abs() / denom + 4 * u * expected.abs() + 1e-300
    bad = (g_ext - expected).abs() > tol
    worst = float(((g_ext - expected).abs() / tol).max()) if size else 0.0
    assert not bool(bad.any()), f"{int(bad.sum())} columns off, worst {worst}x the tolerance"
    # update vs the reference, when no sample is on the threshold: both accumulation errors plus
    # the effect of the coefficient differences
    if selection == "soft" or bool(away.all()):
        mass_ref = (c_ref.abs() @ g64.abs() + std * z.abs()) / denom
        tol_ref = tol + (batch + 4) * u * mass_ref + 4 * u * expected.abs() + (c_tol @ g64.abs()) / denom
        assert torch.all((g_ext - g_ref).abs() <= tol_ref)


# DEMEM_CPU_SCHEDULE (read at every call): unset (calibrated once per shape), or one schedule forced.
SCHEDULES = [None, "rows", "columns", "mv"]


@pytest.fixture(params=SCHEDULES, ids=["auto", "rows", "columns", "mv"])
def cpu_schedule(request, monkeypatch):
    if request.param is None:
        monkeypatch.delenv("DEMEM_CPU_SCHEDULE", raising=False)
    else:
        monkeypatch.setenv("DEMEM_CPU_SCHEDULE", request.param)
    return request.param


@needs_ext
@PROPS
@given(case=fused_cases())
def test_fused_step_matches_reference(cpu_schedule, case):
    check_fused_against_reference(case, run_fused("extension", *case))


@needs_ext
@PROPS
@given(st.integers(1, 400), st.sampled_from(DTYPES), st.sampled_from(["hard", "soft"]),
       st.sampled_from(["mean", "quantile", "fixed"]), st.booleans(), st.integers(0, 2**31 - 1))
def test_weights_match_reference(batch, dtype, selection, rule, ties, gen_seed):
    gen = torch.Generator().manual_seed(gen_seed)
    if ties:
        scores = (torch.randint(0, 3, (batch,), generator=gen) * 0.25).to(dtype)
    else:
        scores = torch.randn(batch, generator=gen, dtype=torch.float64).mul(3).to(dtype)
    lam, k, q, tau, temp = 0.75, 0.5, 0.8, 0.25, 0.3
    args = (lam, selection, rule, k, q, tau, temp)
    w_ext, r_ext = torch.ops.demem.weights(scores, *args)
    w_ref, r_ref = reference.demem_weights(scores, *args)
    assert w_ext.dtype == w_ref.dtype == reference.accumulation_dtype(dtype)
    assert r_ext.dtype == r_ref.dtype
    u = unit_roundoff(dtype)
    terr = tau_error(scores, rule, k)
    away = away_from_threshold(scores, rule, k, q, tau, terr)
    if selection == "hard":
        mask = torch.ones_like(away) if rule != "mean" else away
        assert torch.equal(r_ext[mask], r_ref[mask])
        assert torch.equal(w_ext[mask], w_ref[mask])
    else:
        r_tol = terr / (4 * temp) + 4 * u
        assert torch.all((r_ext.double() - r_ref.double()).abs() <= r_tol)
        assert torch.all((w_ext.double() - w_ref.double()).abs() <= lam * r_tol + 4 * u * (1 + lam))


@needs_ext
@pytest.mark.parametrize("quantile", [0.0, 0.1, 0.25, 0.5, 0.8, 0.999, 1.0])
def test_quantile_threshold_is_exact(quantile):
    """Hard selection with the quantile rule: τ is computed exactly like torch.quantile."""
    gen = torch.Generator().manual_seed(7)
    for batch in [1, 2, 3, 10, 97, 256]:
        scores = torch.randn(batch, generator=gen, dtype=torch.float64)
        scores[batch // 2:] = scores[: batch - batch // 2].clone()  # duplicates
        _, r_ext = torch.ops.demem.weights(scores, 1.0, "hard", "quantile", 0.0, quantile, 0.0, 1.0)
        _, r_ref = reference.demem_weights(scores, 1.0, "hard", "quantile", 0.0, quantile, 0.0, 1.0)
        assert torch.equal(r_ext, r_ref)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 2049), (300, 7), (5, 100_003), (64, 20_000),
                                   (3, 70_001), (1, 300_007)])
def test_fused_schedules_and_tails(cpu_schedule, dtype, shape):
    """Row/column schedules, vector tails, chunk and noise-slice edges, with noise, clipping and high-risk scope."""
    gen = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    grads = torch.randn(*shape, generator=gen).to(dtype)
    scores = torch.randn(shape[0], generator=gen)
    args = (grads, scores, None, 0.5, "soft", "mean", 1.0, 0.8, 0.0, 0.5, 0.7, 1.3, "high_risk",
            float(shape[0]), 99, 12345)
    ext = run_fused("extension", *args)
    ref = run_fused("reference", *args)
    u = unit_roundoff(dtype)
    c = ext[4].double()
    z = reference.philox_normal(shape[1], 99, 12345).double()
    g64 = grads.double()
    expected = (c @ g64 + 1.3 * 0.7 * z) / shape[0]
    mass = (c.abs() @ g64.abs() + 0.91 * z.abs()) / shape[0]
    tol = (shape[0] + 4) * u * mass + NOISE_RTOL * 0.91 * z.abs() / shape[0] + 4 * u * expected.abs()
    assert torch.all((ext[0].double() - expected).abs() <= tol)
    torch.testing.assert_close(ext[3].double(), ref[3].double(), rtol=4 * u + 8 * shape[1] * EPS64, atol=0)
    torch.testing.assert_close(ext[4].double(), ref[4].double(), rtol=1e-5 if u > 1e-10 else 1e-12, atol=1e-12)


@needs_ext
def test_fused_step_empty_parameters():
    grads = torch.zeros(3, 0)
    out = torch.ops.demem.fused_step(grads, torch.rand(3), None, 0.5, "hard", "mean", 1.0, 0.8, 0.0, 1.0, 1.0,
                                     1.0, "all", 3.0, 0, 0)
    assert out[0].shape == (0,)
    assert torch.equal(out[3], torch.zeros(3))


@needs_ext
def test_fused_step_is_deterministic_and_thread_count_is_respected():
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(64, 30_000, generator=gen)
    scores = torch.rand(64, generator=gen)
    args = (grads, scores, None, 0.5, "hard", "quantile", 1.0, 0.8, 0.0, 1.0, 1.0, 1.0, "all", 64.0, 5, 0)
    first = run_fused("extension", *args)
    second = run_fused("extension", *args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_fused("extension", *args)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(single[0], first[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(single[3], first[3], rtol=1e-6, atol=0)


@needs_ext
@pytest.mark.parametrize("forced", ["default", "avx2"])
def test_narrower_isa_builds_match(tmp_path, forced):
    """The portable build of the CPU kernel and its AVX2 build, forced in a subprocess, agree with the build
    this CPU runs (the AVX-512 one where it has AVX-512).

    The inputs are made here and passed by file: ATEN_CPU_CAPABILITY also switches torch's own
    kernels (conversions, reductions) in the subprocess.
    """
    gen = torch.Generator().manual_seed(11)
    cases = {}
    for dt in DTYPES:
        cases[str(dt)] = (torch.randn(37, 5003, generator=gen).to(dt), torch.randn(37, generator=gen))
    torch.save(cases, tmp_path / "in.pt")
    args = "None, 0.5, 'hard', 'fixed', 1.0, 0.8, 0.3, 1.0, 1.0, 0.5, 'all', 37.0, 3, 4"
    code = (
        "import sys, torch\n"
        "import demem_ext.ops\n"
        "import demem_ext._C as C\n"
        "cases = torch.load(sys.argv[1])\n"
        f"out = {{k: torch.ops.demem.fused_step(g, s, {args}) for k, (g, s) in cases.items()}}\n"
        "z = torch.ops.demem.philox_normal(100_003, 7, 5, torch.device('cpu'))\n"
        "torch.save((C.cpu_capability(), out, z), sys.argv[2])\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY=forced)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    capability, other, other_z = torch.load(tmp_path / "out.pt")
    assert capability == forced or (forced == "avx2" and capability == "default")  # a CPU without AVX2
    if capability == "avx2":  # the AVX-512 noise (sixteen Philox blocks a call) is the AVX2 one, bit for bit
        assert torch.equal(torch.ops.demem.philox_normal(100_003, 7, 5, torch.device("cpu")), other_z)
    for key, (g, s) in cases.items():
        mine = torch.ops.demem.fused_step(g, s, *eval(f"({args})"))
        u = unit_roundoff(g.dtype)
        # weights, risk, norms, coeff; float64 norms are sums of 5,003 squares whose order follows the vector
        # width (8 lanes in the AVX-512 build, 4 in the others): a few float64 ulps apart, 1e-13 relative
        rtol = 1e-13 if g.dtype == torch.float64 else 2 * u
        for a, b in zip(mine[1:], other[key][1:]):
            torch.testing.assert_close(a, b, rtol=rtol, atol=0)
        # same coefficients; the accumulation differs (FMA or not) and so do the normals, by a few
        # float32 ulps (SLEEF's log/sincos in the vector builds, the C library's in the default one)
        mass = (mine[4].double().abs() @ g.double().abs()) / 37.0
        z = reference.philox_normal(g.shape[1], 3, 4).double()
        tol = 2 * (37 + 4) * u * mass + 4 * u * mine[0].double().abs() + NOISE_RTOL * 0.5 * z.abs() / 37.0
        assert torch.all((mine[0].double() - other[key][0].double()).abs() <= tol)


# ------------------------------------------------------------------------------------------------
# opcheck
# ------------------------------------------------------------------------------------------------

def _opcheck_fused_samples():
    gen = torch.Generator().manual_seed(0)
    g32 = torch.randn(6, 33, generator=gen)
    s = torch.randn(6, generator=gen)
    return [
        (g32, s, None, 0.5, "hard", "mean", 1.0, 0.8, 0.0, 1.0, None, 0.0, "all", 6.0, 0, 0),
        (g32, s, None, 0.5, "soft", "quantile", 1.0, 0.8, 0.0, 0.5, 1.0, 0.5, "high_risk", 10.0, 7, 3),
        (g32.half(), s.double(), torch.rand(6, generator=gen), 1.0, "hard", "fixed", 1.0, 0.8, 0.1, 1.0, 0.3,
         1.0, "all", 6.0, -5, 2**40),
        (g32.double()[:1], s[:1], None, 0.0, "hard", "mean", 1.0, 0.8, 0.0, 1.0, 2.0, 0.0, "all", 1.0, 1, 1),
        (g32.bfloat16(), s.half(), None, 2.0, "soft", "fixed", 0.0, 0.5, 0.0, 2.0, None, 1.0, "all", 3.0, 9, 0),
    ]


@needs_ext
@pytest.mark.parametrize("sample", range(5))
def test_opcheck_fused_step(sample):
    torch.library.opcheck(torch.ops.demem.fused_step.default, _opcheck_fused_samples()[sample])


@needs_ext
@pytest.mark.parametrize("args", [
    (torch.tensor([0.1, 0.5, 0.2]), 0.5, "hard", "mean", 1.0, 0.8, 0.0, 1.0),
    (torch.tensor([0.1, 0.5, 0.2], dtype=torch.float64), 1.5, "soft", "quantile", 1.0, 0.3, 0.0, 0.1),
    (torch.tensor([3.0], dtype=torch.float16), 1.0, "hard", "fixed", 1.0, 0.8, 2.0, 1.0),
])
def test_opcheck_weights(args):
    torch.library.opcheck(torch.ops.demem.weights.default, args)


@needs_ext
@pytest.mark.parametrize("args", [(0, 0, 0), (1, 5, 0), (10, 123, 4), (4097, -1, 2**33 - 7)])
def test_opcheck_philox_normal(args):
    torch.library.opcheck(torch.ops.demem.philox_normal.default, (*args, torch.device("cpu")))


# ------------------------------------------------------------------------------------------------
# Argument checks inside the C++ ops
# ------------------------------------------------------------------------------------------------

def _fused(grads, scores, weights=None, selection="hard", threshold="mean", max_grad_norm=1.0, scope="all",
           denom=2.0, offset=0):
    return torch.ops.demem.fused_step(grads, scores, weights, 0.5, selection, threshold, 1.0, 0.8, 0.0, 1.0,
                                      max_grad_norm, 0.0, scope, denom, 0, offset)


@needs_ext
@pytest.mark.parametrize("call, word", [
    (lambda: _fused(torch.rand(4), torch.rand(4)), "grads"),
    (lambda: _fused(torch.rand(0, 3), torch.rand(0)), "grads"),
    (lambda: _fused(torch.rand(2, 3).int(), torch.rand(2)), "grads"),
    (lambda: _fused(torch.rand(2, 3), torch.rand(3)), "scores"),
    (lambda: _fused(torch.rand(2, 3), torch.rand(2, 1)), "scores"),
    (lambda: _fused(torch.rand(2, 3), torch.rand(2), weights=torch.rand(3)), "weights"),
    (lambda: _fused(torch.rand(2, 3), torch.rand(2), selection="medium"), "selection"),
    (lambda: _fused(torch.rand(2, 3), torch.rand(2), threshold="median"), "threshold"),
    (lambda: _fused(torch.rand(2, 3), torch.rand(2), scope="some"), "clip_scope"),
    (lambda: _fused(torch.rand(2, 3), torch.rand(2), max_grad_norm=0.0), "max_grad_norm"),
    (lambda: _fused(torch.rand(2, 3), torch.rand(2), denom=0.0), "denom"),
    (lambda: _fused(torch.rand(2, 3), torch.rand(2), offset=-1), "offset"),
    (lambda: torch.ops.demem.weights(torch.rand(2, 2), 0.5, "hard", "mean", 1.0, 0.8, 0.0, 1.0), "scores"),
    (lambda: torch.ops.demem.weights(torch.rand(3), -0.5, "hard", "mean", 1.0, 0.8, 0.0, 1.0), "lam"),
    (lambda: torch.ops.demem.weights(torch.rand(3), 0.5, "soft", "mean", 1.0, 0.8, 0.0, 0.0), "temperature"),
    (lambda: torch.ops.demem.philox_normal(-1, 0, 0, torch.device("cpu")), "n"),
    (lambda: torch.ops.demem.philox_normal(4, 0, -2, torch.device("cpu")), "offset"),
])
def test_cpp_argument_checks(call, word):
    with pytest.raises(RuntimeError, match=word):
        call()


# ------------------------------------------------------------------------------------------------
# Invariants (reference always; extension when built)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 200), st.integers(1, 5000), st.sampled_from(DTYPES), st.sampled_from([1e-3, 0.5, 3.0]),
       st.sampled_from([0.0, 0.5, 1.0, 2.5]), st.integers(0, 2**31 - 1))
def test_clipped_contribution_is_bounded(impl, batch, size, dtype, clip, lam, gen_seed):
    """‖w_i·c_i·g_i‖ ≤ |w_i|·C (scope "all")."""
    gen = torch.Generator().manual_seed(gen_seed)
    grads = (torch.randn(batch, size, generator=gen) * torch.rand(batch, 1, generator=gen) * 10).to(dtype)
    scores = torch.randn(batch, generator=gen)
    out = run_fused(impl, grads, scores, None, lam, "hard", "mean", 1.0, 0.8, 0.0, 1.0, clip, 0.0, "all",
                    float(batch), 0, 0)
    contribution = out[4].double().abs() * grads.double().norm(dim=1)
    bound = out[1].double().abs() * clip
    assert torch.all(contribution <= bound * (1 + 8 * unit_roundoff(dtype)) + 1e-300)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lam_zero_is_plain_mean_gradient(impl, dtype):
    gen = torch.Generator().manual_seed(5)
    for batch, size in [(1, 10), (17, 3000), (128, 4096)]:
        grads = torch.randn(batch, size, generator=gen).to(dtype)
        scores = torch.randn(batch, generator=gen)
        out = run_fused(impl, grads, scores, None, 0.0, "hard", "mean", 1.0, 0.8, 0.0, 1.0, None, 0.0, "all",
                        float(batch), 0, 0)
        expected = grads.double().mean(0)
        u = unit_roundoff(dtype)
        tol = (batch + 4) * u * grads.double().abs().mean(0) + 4 * u * expected.abs()
        assert torch.all((out[0].double() - expected).abs() <= tol)
        assert torch.equal(out[4].double(), torch.ones(batch, dtype=torch.float64))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("clip, sigma, denom", [(None, 1.0, 1.0), (2.0, 0.5, 8.0), (0.1, 3.0, 32.0)])
def test_noise_std(impl, clip, sigma, denom):
    """With zero gradients the update is σ·C·ξ/D: mean 0 and std σ·C/D (σ/D without clipping)."""
    size = 200_000
    grads = torch.zeros(4, size)
    out = run_fused(impl, grads, torch.rand(4), None, 0.5, "hard", "mean", 1.0, 0.8, 0.0, 1.0, clip, sigma,
                    "all", denom, 2024, 77)
    target = sigma * (clip if clip is not None else 1.0) / denom
    sample = out[0].double()
    se_mean = target / math.sqrt(size)
    se_std = target / math.sqrt(2 * size)
    assert abs(float(sample.mean())) < 5 * se_mean
    assert abs(float(sample.std()) - target) < 5 * se_std


def test_reference_fused_dtypes_follow_grads():
    """All per-sample outputs are in the accumulation dtype of grads, whatever the scores dtype."""
    grads = torch.randn(3, 5, dtype=torch.float64)
    out = reference.fused_step(grads, torch.rand(3), None, 0.5, "soft", "mean", 1.0, 0.8, 0.0, 1.0, 1.0, 0.0,
                               "all", 3.0, 0, 0)
    assert all(t.dtype == torch.float64 for t in out)
    out = reference.fused_step(grads.half(), torch.rand(3, dtype=torch.float64), None, 0.5, "soft", "mean", 1.0,
                               0.8, 0.0, 1.0, 1.0, 0.0, "all", 3.0, 0, 0)
    assert all(t.dtype == torch.float32 for t in out)
