"""Shadow-model audit: end to end on a tiny setting, resume, shards, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from demem_ext.cli import main
from demem_ext.audit import lira, metrics
from demem_ext.audit.shadow import inclusion_masks, load_stats, model_dir, parse_shard, train_shadow_models
from demem_ext.training import TrainConfig

TINY = TrainConfig(epochs=1, attack_steps=1, batch_size=256, demem={"lam": 0.5})
TINY_FLAGS = ["--epochs", "1", "--attack-steps", "1", "--batch-size", "256", "--no-progress"]


def _quiet(_: str) -> None:
    pass


def test_audit_end_to_end_writes_report_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["audit", "--models", "3", *TINY_FLAGS, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["num_models"] == 3 and report["num_samples"] == 1198
    online = report["attacks"]["LiRA online"]
    assert 0.0 <= online["tpr_at_fpr_0.001"] <= 1.0 and 0.0 <= online["auc"] <= 1.0
    assert "LiRA offline (adversarial queries)" in report["attacks"]
    assert report["privacy"]["epsilon"] is None  # batch-relative threshold
    for png in ("roc.png", "memorization_hist.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert "TPR@0.1%" in capsys.readouterr().out
    # merging again: --models, when given, must match the folder's
    assert main(["audit", "--merge-only", "--out", str(tmp_path)]) == 0
    assert main(["audit", "--merge-only", "--models", "5", "--out", str(tmp_path)]) == 2
    assert "holds 3 models, not 5" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--resume", "--final-autoattack=fast"])
def test_audit_refuses_the_run_only_flags_of_train(flag: str, capsys: pytest.CaptureFixture) -> None:
    """Shadow models always resume and get no AutoAttack: audit does not take these train flags."""
    with pytest.raises(SystemExit) as exc:
        main(["audit", flag])
    assert exc.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_finished_models_are_skipped_and_shards_merge_to_the_same_result(tmp_path: Path) -> None:
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    assert train_shadow_models(TINY, one, num_models=2, log=_quiet) == [0, 1]
    assert train_shadow_models(TINY, one, num_models=2, log=_quiet) == []  # resumable: nothing left
    assert train_shadow_models(TINY, sharded, num_models=2, shard=(1, 2), log=_quiet) == [1]
    with pytest.raises(FileNotFoundError, match=r"models \[0\]"):
        load_stats(sharded)
    assert train_shadow_models(TINY, sharded, num_models=2, shard=(0, 2), log=_quiet) == [0]
    a, b = load_stats(one), load_stats(sharded)
    assert torch.equal(a["keep"], b["keep"])
    for key in ("logits", "adv_logits", "correct"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_unfinished_model_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    train_shadow_models(TINY, tmp_path, num_models=2, log=_quiet)
    reference = load_stats(tmp_path)["logits"]
    (model_dir(tmp_path, 1) / "stats.pt").unlink()  # as if killed after training, before its stats
    assert train_shadow_models(TINY, tmp_path, num_models=2, log=_quiet) == [1]
    torch.testing.assert_close(load_stats(tmp_path)["logits"], reference, rtol=0, atol=0)


def test_other_settings_in_the_same_folder_are_refused(tmp_path: Path) -> None:
    train_shadow_models(TINY, tmp_path, num_models=2, shard=(0, 2), log=_quiet)
    with pytest.raises(ValueError, match="other settings"):
        train_shadow_models(TINY, tmp_path, num_models=3, log=_quiet)
    assert not model_dir(tmp_path, 2).exists()


def test_inclusion_masks_are_seeded_halves() -> None:
    keep = inclusion_masks(16, 5000, seed=1)
    assert keep.dtype == torch.bool and keep.shape == (16, 5000)
    assert torch.equal(keep, inclusion_masks(16, 5000, seed=1))
    assert abs(keep.float().mean().item() - 0.5) < 0.01


def test_leave_one_out_on_membership_independent_stats_is_chance() -> None:
    """With independent masks, the shadow IN/OUT counts carry no membership signal."""
    keep = inclusion_masks(8, 4000, seed=0)
    stats = torch.randn(8, 4000, generator=torch.Generator().manual_seed(12345))  # not keep's stream
    scores, labels = lira.leave_one_out(stats, keep, online=True)
    assert abs(metrics.tpr_at_fpr(scores, labels, 0.01) - 0.01) < 0.01
    assert abs(metrics.roc(scores, labels)[2] - 0.5) < 0.02


@pytest.mark.parametrize("text", ["1", "2/2", "a/b", "-1/3"])
def test_bad_shard(text: str) -> None:
    with pytest.raises(ValueError, match="shard"):
        parse_shard(text)


def test_merge_only_without_models_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["audit", "--merge-only", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
