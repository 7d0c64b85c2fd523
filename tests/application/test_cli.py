"""The `demem` command: train, eval, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from demem_ext.cli import build_parser, main, train_config_from_args

FAST = ["--epochs", "2", "--attack-steps", "2", "--batch-size", "256", "--no-progress"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reasonably trained PGD-AT + DeMem digits model (about 96% natural, 75% PGD-20 accuracy)."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--epochs", "10", "--attack-steps", "5", "--no-progress", "--out", str(out)]) == 0
    return out


def test_train_writes_checkpoint_metrics_and_eval(trained_run: Path) -> None:
    result = json.loads((trained_run / "eval.json").read_text())
    assert 0.0 <= result["pgd20_acc"] <= result["natural_acc"] <= 1.0
    assert result["natural_acc"] > 0.85
    assert len((trained_run / "metrics.jsonl").read_text().splitlines()) == 10


def test_our_pgd_is_not_weaker_than_autoattack(trained_run: Path, capsys: pytest.CaptureFixture) -> None:
    """PGD-20 must not report a robust accuracy above torchattacks' AutoAttack by more than noise."""
    out = trained_run / "aa.json"
    assert main(["eval", str(trained_run / "checkpoint.pt"), "--autoattack", "fast", "--limit", "300",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["autoattack_acc"] <= result["pgd20_acc"] + 0.01
    # 300 samples: a few points of sampling noise at most between two strong attacks
    assert result["pgd20_acc"] <= result["autoattack_acc"] + 0.03, "our PGD is weaker than AutoAttack"
    assert "autoattack_acc" in capsys.readouterr().out


def test_every_demem_field_is_a_flag() -> None:
    args = build_parser().parse_args(["train", "--lam", "1.5", "--proxy", "iqr", "--threshold", "quantile",
                                      "--quantile", "0.9", "--max-grad-norm", "2", "--noise-multiplier",
                                      "0.3", "--clip-scope", "high_risk", "--expected-batch-size", "64",
                                      "--selection", "soft", "--temperature", "0.5", "--k", "2",
                                      "--tau", "1", "--trace-decay", "0.5", "--trace-window", "5"])
    cfg = train_config_from_args(args)
    demem = cfg.demem_config()
    assert (demem.lam, demem.proxy, demem.threshold, demem.quantile) == (1.5, "iqr", "quantile", 0.9)
    assert (demem.max_grad_norm, demem.noise_multiplier, demem.clip_scope) == (2.0, 0.3, "high_risk")
    assert (demem.expected_batch_size, demem.selection, demem.temperature) == (64, "soft", 0.5)
    assert (demem.k, demem.tau, demem.trace_decay, demem.trace_window) == (2.0, 1.0, 0.5, 5)
    assert cfg.per_sample()


@pytest.mark.parametrize("argv", [
    ["train", "--dataset", "mnist"],
    ["train", "--optimizer", "lbfgs"],
    ["train", "--lam", "abc"],
    ["train", "--proxy", "gradient"],
])
def test_bad_flags_exit_with_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_invalid_values_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--lam", "-1", "--out", str(tmp_path / "a"), *FAST]) == 2
    assert "lam must be in [0, 1000]" in capsys.readouterr().err
    assert main(["train", "--model", "resnet18", "--norm", "batch", "--max-grad-norm", "1",
                 "--out", str(tmp_path / "b"), *FAST]) == 2
    assert "--norm group" in capsys.readouterr().err


def test_missing_dataset_files_say_where_they_go(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r"),
                 *FAST]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "--download" in err


def test_eval_rejects_corrupt_and_missing_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    assert main(["eval", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_nan_loss_policy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A diverging run (huge learning rate) stops with a clear error under nonfinite=error."""
    code = main(["train", "--lr", "1e30", "--optimizer", "sgd", "--epochs", "2", "--out", str(tmp_path / "n"),
                 "--attack-steps", "1", "--batch-size", "256", "--no-progress"])
    if code == 0:
        pytest.skip("this seed did not diverge")
    assert code == 2 and "non-finite" in capsys.readouterr().err
