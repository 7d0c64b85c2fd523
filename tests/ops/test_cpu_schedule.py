"""The CPU fused step's plan (schedule and norm rows, calibrated once per shape; DEMEM_CPU_SCHEDULE
and DEMEM_CPU_NORM_ROWS force them) and its two passes as ops (demem::cpu_fused_pass, what the benchmark times against torch's ops).
Every schedule's results are checked against the reference by the property tests of test_ops.py."""

from __future__ import annotations

import pytest
import torch

from demem_ext import ops

needs_ext = pytest.mark.skipif(not ops.extension_loaded(), reason="compiled extension demem_ext._C not loaded")
ARGS = (None, 0.5, "hard", "mean", 1.0, 0.8, 0.0, 1.0, 1.0, 1.0, "all")


def _step(grads: torch.Tensor) -> tuple[torch.Tensor, ...]:
    scores = torch.linspace(0.0, 1.0, grads.shape[0])
    return torch.ops.demem.fused_step(grads, scores, *ARGS, float(grads.shape[0]), 3, 0)


@needs_ext
def test_schedule_is_calibrated_once_then_cached(monkeypatch):
    monkeypatch.delenv("DEMEM_CPU_SCHEDULE", raising=False)
    monkeypatch.delenv("DEMEM_CPU_NORM_ROWS", raising=False)
    grads = torch.randn(13, 4099, generator=torch.Generator().manual_seed(1))
    assert torch.ops.demem.cpu_fused_schedule(grads) == "uncalibrated"
    first = _step(grads)
    chosen = torch.ops.demem.cpu_fused_schedule(grads)
    assert chosen in {"rows", "columns", "mv"}
    again = _step(grads)
    assert torch.ops.demem.cpu_fused_schedule(grads) == chosen
    for a, b in zip(first, again):  # the calibration's runs do not leak into the result
        assert torch.equal(a, b)
    assert torch.ops.demem.cpu_fused_schedule(grads.to(torch.bfloat16)) == "uncalibrated"  # dtype is in the key


@needs_ext
@pytest.mark.parametrize("name", ["rows", "columns", "mv"])
def test_forced_schedule_is_reported(monkeypatch, name):
    monkeypatch.setenv("DEMEM_CPU_SCHEDULE", name)
    assert torch.ops.demem.cpu_fused_schedule(torch.zeros(2, 3)) == name


@needs_ext
def test_unknown_schedule_is_an_error(monkeypatch):
    monkeypatch.setenv("DEMEM_CPU_SCHEDULE", "fastest")
    with pytest.raises(RuntimeError, match="DEMEM_CPU_SCHEDULE"):
        _step(torch.randn(3, 10))


@needs_ext
def test_norm_rows_are_calibrated_once_then_cached(monkeypatch):
    monkeypatch.delenv("DEMEM_CPU_SCHEDULE", raising=False)
    monkeypatch.delenv("DEMEM_CPU_NORM_ROWS", raising=False)
    grads = torch.randn(21, 3001, generator=torch.Generator().manual_seed(2))
    assert torch.ops.demem.cpu_fused_norm_rows(grads) == 0  # uncalibrated
    _step(grads)
    chosen = torch.ops.demem.cpu_fused_norm_rows(grads)
    assert chosen in {4, 16}
    _step(grads)
    assert torch.ops.demem.cpu_fused_norm_rows(grads) == chosen


@needs_ext
def test_forced_norm_rows_are_reported(monkeypatch):
    monkeypatch.setenv("DEMEM_CPU_NORM_ROWS", "5")
    assert torch.ops.demem.cpu_fused_norm_rows(torch.zeros(2, 3)) == 5


@needs_ext
@pytest.mark.parametrize("value", ["0", "17", "many", "4x"])
def test_bad_norm_rows_are_an_error(monkeypatch, value):
    monkeypatch.setenv("DEMEM_CPU_NORM_ROWS", value)
    with pytest.raises(RuntimeError, match="DEMEM_CPU_NORM_ROWS"):
        _step(torch.randn(9, 10))


@needs_ext
@pytest.mark.parametrize("schedule", ["rows", "columns", "mv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(37, 3001), (70, 140_003)])
def test_norm_rows_change_nothing_but_speed(monkeypatch, schedule, dtype, shape):
    """Every output (noise included) is bit for bit the same whatever the rows read side by side, so
    the property tests of test_ops.py hold for every norm_rows the calibration may pick ("rows": the
    most rows of a group; the cache allows all four here)."""
    monkeypatch.setenv("DEMEM_CPU_CACHE_BYTES", str(64 * 2**20))
    monkeypatch.setenv("DEMEM_CPU_SCHEDULE", schedule)
    grads = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])).to(dtype)
    results = []
    for rows in ["1", "3", "4", "16"]:
        monkeypatch.setenv("DEMEM_CPU_NORM_ROWS", rows)
        results.append(_step(grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 7), (19, 1000), (40, 70_001)])
def test_passes_match_torch(dtype, shape):
    gen = torch.Generator().manual_seed(shape[0])
    grads = torch.randn(*shape, generator=gen).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coeff = torch.rand(shape[0], generator=gen, dtype=acc)
    norms = torch.ops.demem.cpu_fused_pass(grads, coeff, "norms")
    g64 = grads.double()
    assert norms.dtype == acc
    # float64 sums for float32/float64; float32 blocks of 64 exact squares for bf16/fp16 (rel. error < 64·2⁻²⁴)
    rtol = 1e-6 if dtype in (torch.float32, torch.float64) else 64 * 2.0**-24
    torch.testing.assert_close(norms.double(), torch.linalg.vector_norm(g64, dim=1), rtol=rtol, atol=0)
    out = torch.ops.demem.cpu_fused_pass(grads, coeff, "accumulate")
    assert out.dtype == acc and out.shape == (shape[1],)
    u = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    bound = (shape[0] + 2) * u * (coeff.double().abs() @ g64.abs())
    assert torch.all((out.double() - coeff.double() @ g64).abs() <= bound)


@needs_ext
def test_cache_bytes_are_those_of_sysfs():
    """The cache budget starts from the cache the cores share (sysfs), not glibc's sysconf, which in a VM
    may report the host socket's whole L3."""
    from pathlib import Path

    from demem_ext import _C

    entries = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        size = (index / "size").read_text().strip()
        value = int(size.rstrip("KM")) << {"K": 10, "M": 20}.get(size[-1], 0)
        entries.append((int((index / "level").read_text()), value))
    if not entries:
        pytest.skip("no cache sizes in sysfs")
    assert _C.cpu_cache_bytes() == max(entries)[1]
