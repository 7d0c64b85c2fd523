"""Hardening of the CLI and of the run files (issue 21): clear errors, no silent wrong runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from demem_ext.cli import main
from demem_ext.training import CHECKPOINT_NAME, METRICS_NAME, TrainConfig, train

TINY = ["--epochs", "1", "--attack-steps", "1", "--batch-size", "256", "--schedule", "none", "--no-progress"]
TINY_CFG = TrainConfig(epochs=1, attack_steps=1, batch_size=256, schedule="none")  # the same run as TINY


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run of TINY_CFG; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("hardening") / "run"
    train(TINY_CFG, out, progress=False, log=_quiet)
    return out


@pytest.fixture
def no_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    """`demem train` without its final test-split evaluation (seconds of PGD-20 the tests do not need)."""
    import demem_ext.adversarial.robustness as robustness

    monkeypatch.setattr(robustness, "evaluate", lambda *args, **kwargs: {"natural_acc": 0.0})


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_resume_without_a_checkpoint_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "typo"
    assert main(["train", *TINY, "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and str(out / CHECKPOINT_NAME) in err
    assert not out.exists()


def test_resume_names_each_ignored_flag(finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                        no_eval: None) -> None:
    run = _copy(finished_run, tmp_path)
    assert main(["train", "--resume", "--out", str(run), "--lr", "0.1", "--lam", "2", "--batch-size", "256",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "--lr 0.1 (the run's: 0.05)" in err and "--lam 2.0 (the run's: 0.5)" in err
    assert "--batch-size" not in err  # the same as the run's: not ignored


def test_resume_with_more_epochs_extends_a_finished_run_exactly(finished_run: Path, tmp_path: Path,
                                                                no_eval: None) -> None:
    run = _copy(finished_run, tmp_path)
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (run / METRICS_NAME).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    straight = train(TrainConfig(**{**TINY_CFG.to_dict(), "epochs": 2}), tmp_path / "straight", progress=False,
                     log=_quiet)
    extended = torch.load(run / CHECKPOINT_NAME, weights_only=True)["model"]
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(extended[key], value, rtol=0, atol=0)


def test_resume_refuses_an_inexact_extension_or_shortening(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, batch_size=256, attack_steps=1)  # cosine schedule
    train(cfg, tmp_path, progress=False, log=_quiet)
    with pytest.raises(ValueError, match="cosine learning-rate schedule"):
        train(cfg, tmp_path, resume=True, progress=False, log=_quiet, epochs=2)
    with pytest.raises(ValueError, match="cannot be shortened"):
        train(TrainConfig(epochs=2, batch_size=256, attack_steps=1, schedule="none"), tmp_path / "b",
              progress=False, log=_quiet)
        train(cfg, tmp_path / "b", resume=True, progress=False, log=_quiet, epochs=1)
