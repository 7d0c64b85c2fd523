"""`--ensemble auto`: the fastest measured ensemble size that fits a memory budget (training/ensemble_size.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from demem_ext.training import TrainConfig
from demem_ext.training import ensemble_size, precision
from demem_ext.training.ensemble_size import (CPU_MAX_ENSEMBLE, check_ensemble, member_bytes,
                                              resolve_ensemble)

MIB = 2**20


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda device: (True, "test: native bf16"))


def test_auto_is_one_model_at_a_time_on_a_cpu_in_fp32() -> None:
    k, why = resolve_ensemble("auto", 16, TrainConfig(precision="fp32"))
    assert k == 1 and "fp32" in why


def test_a_requested_size_is_kept() -> None:
    assert resolve_ensemble(4, 16, TrainConfig()) == (4, "requested")


@pytest.mark.parametrize("value", [0, 17, True, 2.0, "many"])
def test_sizes_outside_one_to_the_number_of_models_are_refused(value) -> None:
    with pytest.raises(ValueError, match=r"ensemble must be 'auto' or an integer in \[1, 16\]"):
        check_ensemble(value, 16)


def test_auto_in_bf16_on_a_cpu_takes_the_measured_best_when_memory_allows(native_bf16) -> None:
    cfg = TrainConfig(precision="bf16")
    k, why = resolve_ensemble("auto", 16, cfg, budget_bytes=10**12)
    assert k == CPU_MAX_ENSEMBLE and "measured best" in why
    assert resolve_ensemble("auto", 4, cfg, budget_bytes=10**12)[0] == 4  # never more than the models


def test_auto_is_limited_by_the_memory_budget_shared_by_the_processes(native_bf16) -> None:
    cfg = TrainConfig(precision="bf16")
    per_model = member_bytes(cfg)
    k, why = resolve_ensemble("auto", 16, cfg, budget_bytes=3 * per_model + 1)
    assert k == 3 and "memory budget" in why
    assert resolve_ensemble("auto", 16, cfg, processes=3, budget_bytes=3 * per_model + 1)[0] == 1
    assert resolve_ensemble("auto", 16, cfg, budget_bytes=1)[0] == 1  # one model always runs


def test_auto_on_cuda_takes_as_many_models_as_the_budget_holds() -> None:
    cfg = TrainConfig(device="cuda", precision="fp32")
    per_model = member_bytes(cfg)
    assert resolve_ensemble("auto", 16, cfg, budget_bytes=10**12)[0] == 16
    assert resolve_ensemble("auto", 16, cfg, budget_bytes=12 * per_model)[0] == 12


def test_auto_is_one_where_training_is_not_vectorized(native_bf16) -> None:
    cfg = TrainConfig(precision="bf16", path="per_sample")
    k, why = resolve_ensemble("auto", 16, cfg, budget_bytes=10**12)
    assert k == 1 and "per-sample" in why


def test_the_memory_estimate_counts_parameters_and_grows_with_the_batch() -> None:
    small, large = member_bytes(TrainConfig(batch_size=32)), member_bytes(TrainConfig(batch_size=256))
    assert 0 < small < large
    # the measured ensemble memory of the digits CNN is about 10 MiB per model (docs/benchmarks.md): an upper estimate
    assert 5 * MIB < member_bytes(TrainConfig(batch_size=64)) < 100 * MIB


def test_the_memory_available_and_the_peak_so_far_are_positive() -> None:
    assert ensemble_size.available_bytes("cpu") > 0
    assert ensemble_size.peak_memory_mib("cpu") > 10  # MiB: this process has imported torch


def test_the_audit_logs_its_automatic_choice(tmp_path: Path) -> None:
    from demem_ext.audit.shadow import train_shadow_models

    class FirstLine(Exception):
        pass

    def log(line: str) -> None:
        raise FirstLine(line)

    with pytest.raises(FirstLine, match=r"^ensemble of 1 \(auto: on the CPU in fp32"):
        train_shadow_models(TrainConfig(precision="fp32"), tmp_path, num_models=2, log=log)
