"""Hardening of the CLI and of the run files (issue 21): clear errors, no silent wrong runs."""

from __future__ import annotations

import json
import shutil
import sys
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch

from demem_ext.cli import main
from demem_ext.training import CHECKPOINT_NAME, METRICS_NAME, TrainConfig, train

TINY = ["--epochs", "1", "--attack-steps", "1", "--batch-size", "256", "--schedule", "none", "--no-progress"]
TINY_CFG = TrainConfig(epochs=1, attack_steps=1, batch_size=256, schedule="none")  # the same run as TINY
FEW = torch.arange(64)  # train_subset of tests that only need some epoch to run


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
    assert "--lr 0.1 (the run's: 0.05)" in err and "--lam 2.0 (the run's: 0.75)" in err
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


@pytest.mark.parametrize("argv, flag", [
    (["train", "--device", "bogus"], "--device"),
    (["train", "--threads", "-1"], "--threads"),
    (["train", "--threads", "0"], "--threads"),
    (["train", "--eps", "inf"], "--eps"),
    (["train", "--eps", "nan"], "--eps"),
    (["eval", "x.pt", "--limit", "0"], "--limit"),
    (["eval", "x.pt", "--limit", "-1"], "--limit"),
    (["eval", "x.pt", "--eps", "inf"], "--eps"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--steps", "-1"], "--steps"),
    (["reproduce", "--threads", "0"], "--threads"),
    (["reproduce", "--ensemble", "0"], "--ensemble"),
    (["audit", "--ensemble", "many"], "--ensemble"),
])
def test_bad_values_are_usage_errors_naming_the_flag(argv: list[str], flag: str,
                                                     capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"demem {argv[0]}: error: argument {flag}" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "x.pt", "--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_out_under_a_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    for command in (["train", *TINY], ["audit", "--models", "2", *TINY]):
        assert main([*command, "--out", str(tmp_path / "file" / "run")]) == 2
        assert f"--out {tmp_path / 'file' / 'run'}: cannot create the folder" in capsys.readouterr().err


def test_a_failed_run_leaves_no_folder_behind(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "new" / "run"
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nothing"), *TINY,
                 "--out", str(out)]) == 2
    assert "--download" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_corrupt_dataset_files_are_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"garbage")
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), *TINY,
                 "--out", str(tmp_path / "run")]) == 2
    assert "integrity check" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_eval_checks_its_json_folder_before_evaluating(finished_run: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import demem_ext.training.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("loaded before the check"))
    target = tmp_path / "missing" / "eval.json"
    assert main(["eval", str(finished_run / CHECKPOINT_NAME), "--json", str(target)]) == 2
    assert f"--json {target}: the folder {target.parent} does not exist" in capsys.readouterr().err


def test_missing_torchattacks_is_a_clear_error(finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import torchattacks raises ImportError
    assert main(["eval", str(finished_run / CHECKPOINT_NAME)]) == 2
    err = capsys.readouterr().err
    assert "pip install torchattacks" in err and "--autoattack none" in err
    assert main(["train", *TINY, "--final-autoattack", "fast", "--out", str(tmp_path / "r")]) == 2
    assert "--final-autoattack none" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["eval", str(finished_run / CHECKPOINT_NAME), "--autoattack", "none", "--limit", "8"]) == 0


def test_metrics_log_the_learning_rate_used_during_the_epoch(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=2, batch_size=256, attack_steps=1, lr=0.05)  # cosine: 0.05, then 0.025
    train(cfg, tmp_path, progress=False, log=_quiet, train_subset=FEW)
    rows = [json.loads(line) for line in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.025])


@pytest.mark.parametrize("cfg, shown, hidden", [
    (dict(use_demem=False), [], ["high-risk", "clip"]),
    (dict(), ["high-risk"], ["clip"]),
    (dict(demem={"max_grad_norm": 1.0}), ["high-risk", "clip"], []),
], ids=["no-demem", "weighting", "clipping"])
def test_epoch_line_shows_only_the_fractions_that_apply(tmp_path: Path, cfg: dict, shown: list[str],
                                                        hidden: list[str]) -> None:
    lines: list[str] = []
    train(TrainConfig(epochs=1, batch_size=256, attack_steps=1, **cfg), tmp_path, progress=False,
          log=lines.append, train_subset=FEW)
    epoch_line = next(line for line in lines if line.startswith("epoch 1:"))
    assert all(word in epoch_line for word in shown) and not any(word in epoch_line for word in hidden)


def test_resume_trims_a_torn_last_metrics_line(finished_run: Path, tmp_path: Path) -> None:
    run = _copy(finished_run, tmp_path)
    metrics = run / METRICS_NAME
    good = metrics.read_text()
    metrics.write_text(good + '{"train_loss": 2.3, "ep')  # killed while appending epoch 2's line
    lines: list[str] = []
    cfg = TrainConfig(**{**TINY_CFG.to_dict(), "epochs": 2})
    train(cfg, run, resume=True, progress=False, log=lines.append)
    assert any("torn last line" in line and str(metrics) in line for line in lines)
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1]


def test_json_errors_name_the_file(finished_run: Path, tmp_path: Path) -> None:
    from demem_ext.reproduce.jobs import DIVERGED_NAME, EVAL_NAME, _cached_evaluation, divergence

    run = _copy(finished_run, tmp_path)
    metrics = run / METRICS_NAME
    metrics.write_text("{bad\n" + metrics.read_text())
    with pytest.raises(ValueError, match=f"{metrics}, line 1: not valid JSON"):
        train(TINY_CFG, run, resume=True, progress=False, log=_quiet)
    (tmp_path / EVAL_NAME).write_text("{")
    with pytest.raises(ValueError, match=f"{tmp_path / EVAL_NAME} is not valid JSON"):
        _cached_evaluation(tmp_path, "none", None)
    config = SimpleNamespace(folder="pgd-at", config=TINY_CFG)  # the fields divergence() reads
    (tmp_path / config.folder).mkdir(parents=True)
    (tmp_path / config.folder / DIVERGED_NAME).write_text("not json")
    with pytest.raises(ValueError, match=f"{DIVERGED_NAME} is not valid JSON"):
        divergence(config, tmp_path)


def _largest_entry_offset(path: Path) -> tuple[int, int]:
    """(offset, size) of the largest stored entry's bytes in a torch.save zip file (tensor data)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with path.open("rb") as fh:
        fh.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", fh.read(4))
    return info.header_offset + 30 + name_length + extra_length, info.file_size


def test_checkpoint_checksum_detects_flipped_bytes(finished_run: Path, tmp_path: Path) -> None:
    from demem_ext.training.checkpoint import load_checkpoint

    path = tmp_path / CHECKPOINT_NAME
    shutil.copy(finished_run / CHECKPOINT_NAME, path)
    offset, size = _largest_entry_offset(path)
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + size, max(1, size // 50)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{path}.*fails its checksum"):
        load_checkpoint(path)


def test_checkpoints_without_a_checksum_still_load(finished_run: Path, tmp_path: Path) -> None:
    from demem_ext.training.checkpoint import CHECKSUM_KEY, load_checkpoint

    payload = torch.load(finished_run / CHECKPOINT_NAME, weights_only=True)
    assert CHECKSUM_KEY in payload
    payload["model"][next(k for k, v in payload["model"].items() if v.is_floating_point())] += 1
    torch.save(payload, tmp_path / "tampered.pt")  # changed, old checksum kept
    with pytest.raises(ValueError, match="fails its checksum"):
        load_checkpoint(tmp_path / "tampered.pt")
    del payload[CHECKSUM_KEY]
    torch.save(payload, tmp_path / "old.pt")  # as written before checksums
    assert load_checkpoint(tmp_path / "old.pt")["epoch"] == 1


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    import os

    from demem_ext.training.checkpoint import save_checkpoint, write_text_atomic

    old = os.umask(umask)
    try:
        save_checkpoint({"format": "x"}, tmp_path / "c.pt")
        write_text_atomic("{}", tmp_path / "a.json")
    finally:
        os.umask(old)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == mode
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode


def test_saving_removes_stale_temp_files_of_that_file(tmp_path: Path) -> None:
    from demem_ext.training.checkpoint import save_checkpoint

    (tmp_path / f".{CHECKPOINT_NAME}.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".stats.pt.other.tmp").write_bytes(b"another file's")
    save_checkpoint({"format": "x"}, tmp_path / CHECKPOINT_NAME)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".stats.pt.other.tmp", CHECKPOINT_NAME]


def _set(payload: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        payload = payload[key]
    payload[path[-1]] = value


def _first_weight(payload: dict) -> str:
    return next(k for k, v in payload["model"].items() if v.is_floating_point())


@pytest.mark.parametrize("tamper, match", [
    (lambda p: p.pop("optimizer"), "missing field.*optimizer"),
    (lambda p: _set(p, ("epoch",), -5), "field epoch"),
    (lambda p: _set(p, ("epoch",), 7), "field epoch"),
    (lambda p: _set(p, ("config", "eps"), "0.1"), "field config.eps"),
    (lambda p: _set(p, ("config", "lr"), float("nan")), "field config.lr"),
    (lambda p: _set(p, ("config", "bogus"), 1), "bogus"),
    (lambda p: _set(p, ("model", _first_weight(p)), p["model"][_first_weight(p)].long()), "field model.*int64"),
    (lambda p: p["model"][_first_weight(p)].view(-1).__setitem__(0, float("nan")), "field model.*NaN"),
    (lambda p: p["model"].pop(_first_weight(p)), "field model: does not match"),
    (lambda p: _set(p, ("train_subset",), torch.tensor([0.5, 1.5])), "field train_subset"),
    (lambda p: _set(p, ("train_subset",), torch.tensor([0, 10**6])), "train_subset"),
    (lambda p: _set(p, ("rng", "torch"), p["rng"]["torch"][:100]), "field rng: torch"),
    (lambda p: _set(p, ("optimizer", "param_groups"), []), "field optimizer"),
], ids=["missing-key", "negative-epoch", "epoch-past-the-end", "config-type", "config-nan", "config-unknown",
        "int64-weights", "nan-weights", "missing-weight", "float-subset", "subset-out-of-range", "short-rng",
        "optimizer"])
def test_structural_tampering_is_a_clear_error(finished_run: Path, tmp_path: Path, tamper, match: str) -> None:
    from demem_ext.training import restore
    from demem_ext.training.checkpoint import load_checkpoint, save_checkpoint

    payload = load_checkpoint(finished_run / CHECKPOINT_NAME)
    tamper(payload)
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(payload, path)  # a consistent checksum: only the structure is wrong
    with pytest.raises(ValueError, match=match) as err:
        restore(load_checkpoint(path), str(path))
    assert str(path) in str(err.value)


def test_eval_takes_its_data_source_from_its_own_flags(finished_run: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from demem_ext.training.checkpoint import load_checkpoint, save_checkpoint

    payload = load_checkpoint(finished_run / CHECKPOINT_NAME)
    crafted = tmp_path / "crafted"
    payload["config"].update(dataset="cifar10", download=True, data_dir=str(crafted))
    save_checkpoint(payload, tmp_path / "c.pt")
    monkeypatch.chdir(tmp_path)  # eval's default --data-dir: ./data
    assert main(["eval", str(tmp_path / "c.pt"), "--autoattack", "none"]) == 2
    err = capsys.readouterr().err
    assert "data_dir='data'" in err and "--download" in err and str(crafted) not in err
    assert not crafted.exists()
    assert main(["eval", str(tmp_path / "c.pt"), "--autoattack", "none", "--data-dir", str(tmp_path / "d")]) == 2
    assert str(tmp_path / "d") in capsys.readouterr().err and not crafted.exists()


def test_eval_of_a_cuda_checkpoint_falls_back_to_the_cpu(finished_run: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from demem_ext.training.checkpoint import load_checkpoint, save_checkpoint

    payload = load_checkpoint(finished_run / CHECKPOINT_NAME)
    payload["config"]["device"] = "cuda:7"  # not on this machine
    save_checkpoint(payload, tmp_path / "c.pt")
    assert main(["eval", str(tmp_path / "c.pt"), "--autoattack", "none", "--limit", "8"]) == 0
    assert "evaluating on cpu" in capsys.readouterr().out


def test_a_shadow_model_locked_by_another_process_is_skipped_and_reported(tmp_path: Path) -> None:
    from demem_ext.audit.lock import model_lock
    from demem_ext.audit.shadow import model_dir, train_shadow_models

    lines: list[str] = []
    with model_lock(model_dir(tmp_path, 0)) as locked:  # another open file: the same as another process
        assert locked
        trained = train_shadow_models(TINY_CFG, tmp_path, num_models=2, shard=(0, 2), log=lines.append)
    assert trained == [] and not (model_dir(tmp_path, 0) / CHECKPOINT_NAME).exists()
    assert any("shadow model 1/2: skipped, another process is training it" in line for line in lines)


def test_audit_files_of_the_wrong_shape_or_type_are_clear_errors(tmp_path: Path) -> None:
    from demem_ext.audit.shadow import KEEP_FORMAT, STATS_FORMAT, load_stats, model_dir, prepare_masks
    from demem_ext.training.checkpoint import load_checkpoint, save_checkpoint

    keep = prepare_masks(TINY_CFG, tmp_path, 2, 0)
    for i in range(2):  # stats whose `correct` is not boolean
        save_checkpoint({"format": STATS_FORMAT, "keep": keep[i], "correct": keep[i].float(),
                         "adv_correct": keep[i]}, model_dir(tmp_path, i) / "stats.pt")
    with pytest.raises(ValueError, match="stats.pt: field correct: expected torch.bool"):
        load_stats(tmp_path)
    saved = load_checkpoint(tmp_path / "keep.pt", expected_format=KEEP_FORMAT)
    save_checkpoint({**saved, "keep": saved["keep"][:, :100]}, tmp_path / "keep.pt")  # cut short
    with pytest.raises(ValueError, match="keep.pt: field keep"):
        prepare_masks(TINY_CFG, tmp_path, 2, 0)
    with pytest.raises(ValueError, match="keep.pt: field keep"):
        load_stats(tmp_path)


def test_eval_shows_a_progress_bar_per_attack(finished_run: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = str(finished_run / CHECKPOINT_NAME)
    assert main(["eval", checkpoint, "--autoattack", "none", "--limit", "8"]) == 0
    err = capsys.readouterr().err
    assert "natural" in err and "PGD-20" in err
    assert main(["eval", checkpoint, "--autoattack", "none", "--limit", "8", "--no-progress"]) == 0
    assert "PGD-20" not in capsys.readouterr().err


def test_remaining_time_estimates() -> None:
    from demem_ext.eta import duration, progress_text

    assert progress_text(60.0, 2, 4) == "2/4 done, about 60 s left"
    assert progress_text(600.0, 1, 4) == "1/4 done, about 30 min left"
    assert progress_text(5.0, 4, 4) == "4/4 done" and progress_text(0.0, 0, 3) == "0/3 done"
    assert duration(9000) == "2.5 h"


def test_bench_checks_its_json_folder_before_benchmarking(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "missing" / "bench.json"
    assert main(["bench", "--quick", "--json", str(target)]) == 2
    assert f"--json {target}: the folder {target.parent} does not exist" in capsys.readouterr().err
