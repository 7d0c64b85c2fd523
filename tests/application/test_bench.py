"""The benchmarks run and measure the right thing (tiny shapes, seconds; no timing assertions)."""

from __future__ import annotations

import json
import math
import pathlib
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT

from demem_ext import bench, ops
from demem_ext.bench import fused, opacus_version, training
from demem_ext.cli import main

pytestmark = pytest.mark.skipif(not ops.extension_loaded(), reason="compiled extension demem_ext._C not loaded")
HAS_OPACUS = opacus_version() is not None
needs_opacus = pytest.mark.skipif(not HAS_OPACUS, reason="opacus not installed (dev extra)")
CPU = torch.device("cpu")


def _grads(batch: int, size: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients with norms from 1e-3 to 10 (some rows clipped at C = 1, some not) and scores."""
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(batch, size, generator=gen) / math.sqrt(size)
    grads = grads * torch.logspace(-3, 1, batch)[torch.randperm(batch, generator=gen)].unsqueeze(1)
    return grads.to(dtype), torch.rand(batch, generator=gen)


def _ext(grads: torch.Tensor, scores: torch.Tensor, lam: float, noise: float) -> torch.Tensor:
    return torch.ops.demem.fused_step(grads, scores, None, lam, "hard", "mean", 1.0, 0.8, 0.0, 1.0, 1.0, noise, "all",
                                      float(grads.shape[0]), 7, 0)[0]


def test_fused_benchmark_rows_have_every_column_and_json(tmp_path, capsys) -> None:
    path = tmp_path / "fused.json"
    argv = ["--shapes", "4x300,8x1000", "--dtype", "fp32", "bf16", "--warmup", "0", "--repeats", "2", "--json", str(path)]
    assert fused.main(argv) == 0
    data = json.loads(path.read_text())
    assert [(r["B"], r["P"], r["dtype"]) for r in data["rows"]] == [
        (4, 300, "fp32"), (8, 1000, "fp32"), (4, 300, "bf16"), (8, 1000, "bf16")]
    for row in data["rows"]:
        for col in ("ext", "ref", "exact", "copy") + (("opacus",) if HAS_OPACUS else ()):
            assert row[f"{col}_ms"] > 0 and row[f"{col}_GBps"] > 0, col
        for col in ("ref", "exact") + (("opacus",) if HAS_OPACUS else ()):
            assert row[f"{col}_over_ext"] == pytest.approx(row[f"{col}_ms"] / row["ext_ms"])
        itemsize = 2 if row["dtype"] == "bf16" else 4
        assert row["bytes_moved"] == row["B"] * row["P"] * itemsize + 4 * row["P"]
        assert row["copy_bytes"] == 2 * row["B"] * row["P"] * itemsize
        assert row["ext_pct_of_copy"] == pytest.approx(100 * row["ext_GBps"] / row["copy_GBps"])
        two_reads = row["bytes_moved"] + row["B"] * row["P"] * itemsize
        assert row["ext_two_pass_pct_of_copy"] == pytest.approx(
            100 * two_reads / (row["ext_ms"] / 1e3) / 1e9 / row["copy_GBps"])
    assert data["env"]["threads"] >= 1 and data["config"]["repeats"] == 2
    out = capsys.readouterr().out
    assert "ext%copy" in out and "opacus/ext" in out and out.count(" fp32 |") == 2
    assert "2pass%copy" not in out  # a CUDA column
    data["env"]["device"] = "cuda"
    assert "2pass%copy" in fused.format_table(data)


def test_default_cases_cover_the_issue_grid() -> None:
    cpu = {(c.batch, c.size, c.dtype) for c in fused.default_cases(CPU)}
    assert {(b, p, "fp32") for b in (64, 256) for p in (100_000, 1_000_000, 4_000_000)} <= cpu
    assert {(64, 4_000_000, "bf16"), (256, 4_000_000, "bf16")} <= cpu
    gpu = {(c.batch, c.size, c.dtype) for c in fused.default_cases(torch.device("cuda"))}
    assert cpu <= gpu and {(1024, 1_000_000, "fp32"), (64, 16_000_000, "fp32"), (64, 16_000_000, "bf16")} <= gpu
    assert fused.parse_shapes("64x1e5, 2x7") == [(64, 100_000), (2, 7)]
    with pytest.raises(ValueError, match="BxP"):
        fused.parse_shapes("64by10")


def test_exact_reference_is_skipped_above_its_limit() -> None:
    result = fused.benchmark(CPU, [fused.Case(4, 300, "fp32")], warmup=0, repeats=1, exact_max_elements=100,
                             opacus=False)
    row = result["rows"][0]
    assert row["exact_ms"] is None and row["exact_over_ext"] is None and row["opacus_ms"] is None
    assert row["ext_ms"] > 0 and row["ref_ms"] > 0
    table = fused.format_table(result)
    assert "n/a" in table and "--exact-max-elements" in table and "--no-opacus" in table


def test_without_opacus_its_columns_are_na_and_nothing_crashes(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "opacus", None)  # `import opacus` raises ImportError
    monkeypatch.setitem(sys.modules, "opacus.optimizers", None)
    assert opacus_version() is None
    result = fused.benchmark(CPU, [fused.Case(4, 300, "fp32")], warmup=0, repeats=1)
    assert result["rows"][0]["opacus_ms"] is None and result["rows"][0]["opacus_over_ext"] is None
    assert "Opacus is not installed" in fused.format_table(result)
    train = training.benchmark("cnn", CPU, batch=4, attack_steps=1, steps=1, warmup=0, memory=False)
    opacus_row = [r for r in train["rows"] if r["key"] == "opacus"][0]
    assert opacus_row["median_s"] is None and opacus_row["ratio"] is None
    assert "Opacus is not installed" in training.format_table(train)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_torch_composition_equals_the_extension_without_noise(dtype: torch.dtype, tol: float) -> None:
    grads, scores = _grads(16, 777, dtype)
    ours = fused.torch_step(grads, scores, noise_multiplier=0.0)
    ext = _ext(grads, scores, fused.LAM, 0.0)
    assert ours.dtype == ext.dtype == torch.float32
    torch.testing.assert_close(ours, ext, rtol=tol, atol=tol * ext.abs().max().item())
    # the weights matter here: λ = 0 gives a different result
    assert not torch.allclose(fused.torch_step(grads, scores, lam=0.0, noise_multiplier=0.0), ext, rtol=1e-3)


def test_torch_composition_noise_has_std_sigma_c_over_d() -> None:
    grads, scores = _grads(8, 20_000)
    gen = torch.Generator().manual_seed(1)
    diff = fused.torch_step(grads, scores, generator=gen, denom=8.0) - fused.torch_step(grads, scores, noise_multiplier=0.0)
    assert diff.std().item() == pytest.approx(fused.NOISE * fused.MAX_GRAD_NORM / 8.0, rel=0.05)


@needs_opacus
def test_opacus_peer_gives_the_extensions_clipped_sum() -> None:
    grads, scores = _grads(12, 5000)
    peer = fused.OpacusPeer(grads, max_grad_norm=1.0, noise_multiplier=0.0, denom=12)
    assert sum(p.numel() for p in peer.params) == 5000 and len(peer.params) > 1
    ext = _ext(grads, scores, 0.0, 0.0)  # λ = 0: plain DP-SGD clipping, mean over D = B
    for _ in range(2):  # prepare() resets the optimizer: repeated runs give the same update
        peer.prepare()
        peer.run()
        torch.testing.assert_close(peer.grad(), ext, rtol=1e-5, atol=1e-7)


@needs_opacus
def test_opacus_peer_noise_is_added_once_per_run() -> None:
    grads, _ = _grads(4, 30_000)
    peer = fused.OpacusPeer(grads, max_grad_norm=1.0, noise_multiplier=1.0, denom=4)
    quiet = fused.OpacusPeer(grads, max_grad_norm=1.0, noise_multiplier=0.0, denom=4)
    for p in (peer, quiet):
        p.prepare()
        p.run()
    assert (peer.grad() - quiet.grad()).std().item() == pytest.approx(1.0 / 4, rel=0.05)


@pytest.mark.parametrize("size", [7, 1000, 123_457])
def test_opacus_param_shapes_sum_to_p(size: int) -> None:
    shapes = fused.opacus_param_shapes(size)
    assert sum(math.prod(s) for s in shapes) == size


def test_training_benchmark_runs_one_step_of_each_variant_on_the_cnn() -> None:
    result = training.benchmark("cnn", CPU, batch=8, attack_steps=1, steps=1, warmup=0, memory=False)
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == list(training.VARIANTS)
    measured = [k for k in training.VARIANTS if k != "opacus" or HAS_OPACUS]
    for key in measured:
        assert rows[key]["median_s"] > 0 and len(rows[key]["times_s"]) == 1
    assert rows["pgd"]["ratio"] == 1.0
    assert result["params"] > 10_000 and result["attack_steps"] == 1
    table = training.format_table(result)
    assert all(name in table for name in training.VARIANTS.values()) and "PGD-1" in table


def test_training_benchmark_channels_last_runs_the_same_model_in_nhwc_memory() -> None:
    model, x, y = training._setup("cnn", 4, CPU, channels_last=True)
    ref_model, ref_x, ref_y = training._setup("cnn", 4, CPU)
    assert x.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, ref_x) and torch.equal(y, ref_y)
    assert model.features[3].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_model(ref_x))
    result = training.benchmark("cnn", CPU, batch=4, attack_steps=1, steps=1, warmup=0, memory=False, opacus=False,
                                channels_last=True)
    assert result["memory_format"] == "channels_last"
    assert "memory format channels_last" in training.format_table(result)
    out = training._memory_cpu(["demem_dp"], "cnn", 8, 1, channels_last=True)["demem_dp"]
    assert "error" not in out, out


def test_tables_record_the_allocator_settings(monkeypatch) -> None:
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "2147483647")
    assert bench.allocator_settings() == {"MALLOC_TRIM_THRESHOLD_": "2147483647"}
    result = training.benchmark("cnn", CPU, batch=4, attack_steps=0, steps=1, warmup=0, memory=False, opacus=False)
    assert result["env"]["allocator"] == {"MALLOC_TRIM_THRESHOLD_": "2147483647"}
    assert "allocator MALLOC_TRIM_THRESHOLD_=2147483647" in training.format_table(result)


def test_memory_probe_runs_in_a_fresh_process() -> None:
    out = training._memory_cpu(["demem_dp"], "cnn", 8, 1)["demem_dp"]
    assert "error" not in out, out
    assert out["peak_increase_MB"] >= 0 and out["peak_MB"] >= out["baseline_MB"] > 0
    assert out["method"] in ("VmHWM after clear_refs", "ru_maxrss")


def test_demem_bench_quick_prints_both_tables(tmp_path, capsys) -> None:
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--no-memory", "--json", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "B=" in err and "cnn: timed steps" in err  # progress on stderr
    assert "fused step" in out and "ref/ext" in out and "ext%copy" in out
    assert "training step: cnn" in out and "PGD-AT + DeMem (weighting)" in out
    data = json.loads(path.read_text())
    assert len(data["fused"]["rows"]) == len(fused.default_cases(CPU, quick=True))
    assert [t["model"] for t in data["training"]] == ["cnn"]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None,
                    reason="benchmarks/cpu_probe.cpp is x86-64 AVX2 code built with g++")
def test_cpu_probe_builds_and_runs(tmp_path) -> None:
    """The probes behind docs/benchmarks.md keep building (with the command in their header) and running."""
    root = REPO_ROOT
    torch_dir = pathlib.Path(torch.__file__).parent
    exe = tmp_path / "cpu_probe"
    build = subprocess.run(["g++", "-O3", "-mavx2", "-mfma", f"-I{torch_dir / 'include'}",
                            str(root / "benchmarks" / "cpu_probe.cpp"), f"-L{torch_dir / 'lib'}", "-ltorch_cpu",
                            "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        pytest.skip("this CPU has no AVX2: built, not run")
    for args, expect in ((["cache", "65536"], "ms per row"), (["stream", "8", "65536"], "norm pass"),
                         (["normals"], "ns per normal")):
        run = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and expect in run.stdout, run.stderr
    assert subprocess.run([str(exe)], capture_output=True, text=True).returncode == 2  # usage


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh"])
def test_gpu_scripts_parse(script: str) -> None:
    """The GPU scripts run only on a lent GPU machine: here at least they must be valid bash."""
    path = REPO_ROOT / "benchmarks" / script
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_cuda_pass_times_come_from_device_rows_only() -> None:
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from demem_ext.bench import cuda_passes

    def row(key: str, us: float, device=DeviceType.CUDA) -> SimpleNamespace:
        return SimpleNamespace(key=key, self_device_time_total=us, device_type=device)

    events = [row("void demem::(anonymous namespace)::row_sumsq_kernel<float, true>(...)", 300.0),
              row("void demem::(anonymous namespace)::prologue_kernel<float>(...)", 30.0),
              row("void demem::(anonymous namespace)::weighted_sum_kernel<float, float, true>(...)", 330.0),
              row("demem::fused_step", 660.0, DeviceType.CPU),  # repeats its kernels' time: not counted
              row("Memcpy DtoD (Device -> Device)", 600.0)]
    times = cuda_passes.kernel_times(events, calls=3)
    assert times == {"norms": 100.0, "prologue": 10.0, "sum": 110.0, "split_sum": None, "copy": 200.0}
    table = cuda_passes.format_table({"env": {"gpu": "a GPU", "torch": torch.__version__}, "rows": [{
        "B": 64, "P": 1000, "dtype": "fp32", "repeats": 3, "norms_us": 100.0, "prologue_us": 10.0, "sum_us": 110.0,
        "split_sum_us": None, "copy_us": 200.0, "norms_GBps": 2.56, "sum_GBps": 2.33, "copy_GBps": 2.56,
        "norms_pct_of_copy": 100.0, "sum_pct_of_copy": 91.0, "two_pass_pct_of_copy": 91.0}]})
    assert "2pass%cp" in table and "     91%" in table and "a GPU" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_cuda_passes_without_a_gpu_says_so(capsys) -> None:
    from demem_ext.bench import cuda_passes

    assert cuda_passes.main(["--shapes", "4x100"]) == 2
    assert "cuda" in capsys.readouterr().err.lower()
