"""`demem train` and ε: Poisson batches by default with noise, ε in every metrics line and in eval.json,
σ calibrated to --target-epsilon, shuffled batches reporting no ε."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT

from demem_ext import accounting
from demem_ext.training import METRICS_NAME, TrainConfig, train

TINY = dict(epochs=2, batch_size=128, attack_steps=1, seed=3)
NOISY = {"lam": 0.0, "max_grad_norm": 1.0, "noise_multiplier": 1.0}


def _quiet(_: str) -> None:
    pass


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]


def test_noisy_run_draws_poisson_batches_and_logs_epsilon_every_epoch(tmp_path: Path) -> None:
    state = train(TrainConfig(**TINY, demem=NOISY), tmp_path, progress=False, log=_quiet)
    n = len(state.train_set)
    steps = len(state.config.sampler(n))
    lines = _metrics(tmp_path)
    assert [m["sampling"] for m in lines] == ["poisson", "poisson"]
    for epoch, m in enumerate(lines, 1):
        assert m["epsilon"] == pytest.approx(accounting.epsilon(128 / n, 1.0, epoch * steps, 1e-5))
    sizes = state.demem.state_dict()["noisy_batch_sizes"]
    assert len(sizes) == 2 * steps and len(set(sizes.tolist())) > 1  # Poisson: the sizes vary


def test_shuffled_batches_report_no_epsilon(tmp_path: Path) -> None:
    train(TrainConfig(**TINY, demem=NOISY, sampling="shuffle"), tmp_path, progress=False, log=_quiet)
    last = _metrics(tmp_path)[-1]
    assert last["epsilon"] is None and "sampling='shuffle'" in last["epsilon_reason"]


def test_empty_poisson_batches_are_noise_only_steps(tmp_path: Path) -> None:
    cfg = TrainConfig(**{**TINY, "batch_size": 1}, demem=NOISY)  # q = 1/8: a batch is empty with p ≈ 0.34
    state = train(cfg, tmp_path, progress=False, log=_quiet, train_subset=torch.arange(8))
    sizes = state.demem.state_dict()["noisy_batch_sizes"].tolist()
    assert len(sizes) == 2 * 8 and 0 in sizes  # every drawn batch is a counted, noised step


def test_target_epsilon_is_reached_at_the_end(tmp_path: Path) -> None:
    cfg = TrainConfig(**TINY, demem={"lam": 0.0, "max_grad_norm": 1.0}, target_epsilon=4.0)
    state = train(cfg, tmp_path, progress=False, log=_quiet)
    assert state.config.demem_config().noise_multiplier > 0
    assert _metrics(tmp_path)[-1]["epsilon"] == pytest.approx(4.0, rel=1e-3)
    assert _metrics(tmp_path)[-1]["epsilon"] <= 4.0


@pytest.mark.parametrize("bad, match", [
    (dict(target_epsilon=1.0, demem={"lam": 0.5, "max_grad_norm": 1.0}), "batch-relative"),
    (dict(target_epsilon=1.0, demem={"lam": 0.0}), "clipping"),
    (dict(target_epsilon=1.0, demem={"lam": 0.0, "max_grad_norm": 1.0}, sampling="shuffle"), "poisson"),
    (dict(target_epsilon=-1.0, demem={"lam": 0.0, "max_grad_norm": 1.0}), "target_epsilon"),
    (dict(sampling="uniform"), "sampling"),
    (dict(delta=2.0), "delta"),
])
def test_bad_privacy_options(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_checkpoints_written_before_the_sampling_option_resume_with_shuffled_batches() -> None:
    old = TrainConfig(demem=NOISY).to_dict()
    for key in ("sampling", "target_epsilon", "delta"):
        del old[key]
    assert TrainConfig.from_dict(old).sampling_kind() == "shuffle"


def test_cli_writes_epsilon_into_eval_json(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "demem_ext.cli", "train", "--epochs", "1", "--batch-size", "128",
           "--attack-steps", "1", "--lam", "0", "--max-grad-norm", "1", "--target-epsilon", "2",
           "--no-progress", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    result = json.loads((out / "eval.json").read_text())
    assert result["sampling"] == "poisson" and result["epsilon"] == pytest.approx(2.0, rel=1e-3)
    bad = subprocess.run(cmd[:-2] + ["--lam", "0.5", "--out", str(tmp_path / "bad")], capture_output=True,
                         text=True, cwd=REPO_ROOT, timeout=600)
    assert bad.returncode != 0 and "target_epsilon" in bad.stderr and "Traceback" not in bad.stderr
