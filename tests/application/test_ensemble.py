"""Vectorized ensembles: K models trained at once equal K sequential `train` runs (fp32, 1e-5), per-model
checkpoints and metrics, exact resume, the sequential fallback, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import demem_ext.training.ensemble as ensemble
from demem_ext.training import CHECKPOINT_NAME, METRICS_NAME, TrainConfig, train
from demem_ext.training.checkpoint import load_checkpoint
from demem_ext.training.ensemble import train_ensemble

TOL = dict(rtol=0, atol=1e-5)
SEEDS = [3, 4, 5]


def _quiet(_: str) -> None:
    pass


def _config(**changes) -> TrainConfig:
    values = dict(epochs=1, batch_size=16, attack_steps=3, precision="fp32", demem={"lam": 0.5})
    return TrainConfig(**{**values, **changes})


def _subsets(sizes: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randperm(1198, generator=g)[:n].sort().values for n in sizes]


def _sequential(cfg: TrainConfig, root: Path, subsets: list[torch.Tensor], seeds: list[int] = SEEDS):
    return [train(TrainConfig(**{**cfg.to_dict(), "seed": s}), root / f"seq{i}", progress=False, log=_quiet,
                  train_subset=sub) for i, (s, sub) in enumerate(zip(seeds, subsets))]


def _ensemble(cfg: TrainConfig, root: Path, subsets: list[torch.Tensor], seeds: list[int] = SEEDS, **kwargs):
    dirs = [root / f"ens{i}" for i in range(len(seeds))]
    return train_ensemble(cfg, seeds, dirs, subsets, log=_quiet, **kwargs)


def _assert_same_parameters(ours, theirs, atol: float = TOL["atol"]) -> None:
    for a, b in zip(ours, theirs):
        for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["grouped", "vmap"])
@pytest.mark.parametrize("memory_format", ["channels_last", "contiguous"])
def test_one_step_of_pgd_at_with_demem_equals_sequential_training(tmp_path: Path, backend: str,
                                                                 memory_format: str) -> None:
    cfg = _config(batch_size=64, memory_format=memory_format)
    subsets = _subsets([40, 50, 64])  # one batch each, of three sizes (padded rows)
    ours = _ensemble(cfg, tmp_path, subsets, backend=backend)
    _assert_same_parameters(ours, _sequential(cfg, tmp_path, subsets))
    assert all(s.demem.state_dict()["steps"] == 1 for s in ours)


# TRADES' attack starts at x + 0.001·randn where KL(p_nat || p_adv) ≈ 0: its first input gradient has entries at
# rounding level, whose sign() flips with any change in summation order. The sequential loop alone flips 8 of
# 5,120 pixels of an 80-sample batch between 1 and 2 threads, or between one batch and five of 16 (PGD-AT and
# MART: none). So TRADES matches to the spread of such flips (measured 1.9e-5), not to 1e-5.
@pytest.mark.parametrize("at, atol", [("pgd", 1e-5), ("mart", 1e-5), ("trades", 1e-4)])
def test_five_steps_with_demem_equal_sequential_training(tmp_path: Path, at: str, atol: float) -> None:
    cfg = _config(at=at, demem={"lam": 0.5, "proxy": "trace"})
    subsets = _subsets([70, 75, 80])  # five batches each; the last ones of 6, 11 and 16 rows
    ours = _ensemble(cfg, tmp_path, subsets)
    theirs = _sequential(cfg, tmp_path, subsets)
    _assert_same_parameters(ours, theirs, atol)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.demem.state_dict()["trace"], b.demem.state_dict()["trace"], rtol=0, atol=atol)
        assert a.demem.state_dict()["steps"] == b.demem.state_dict()["steps"] == 5


def test_ragged_epochs_checkpoints_metrics_and_loss_records_match(tmp_path: Path) -> None:
    cfg = _config(epochs=2, record_losses=True)
    subsets = _subsets([48, 80, 60])  # 3, 5 and 4 batches: the models leave and join the stack
    ours = _ensemble(cfg, tmp_path, subsets, ensemble_size=2)  # two ensembles: of 2 models, then 1
    theirs = _sequential(cfg, tmp_path, subsets)
    _assert_same_parameters(ours, theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a.loss_record, b.loss_record, **TOL, equal_nan=True)
        mine, seq = (load_checkpoint(tmp_path / f"{kind}{i}" / CHECKPOINT_NAME) for kind in ("ens", "seq"))
        assert mine.keys() == seq.keys() and mine["epoch"] == seq["epoch"] == 2
        assert torch.equal(mine["rng"]["torch"], seq["rng"]["torch"])  # the attack drew what it drew alone
        assert mine["config"] == seq["config"] and mine["scheduler"] == seq["scheduler"]
        for key, buf in seq["optimizer"]["state"].items():
            torch.testing.assert_close(mine["optimizer"]["state"][key]["momentum_buffer"], buf["momentum_buffer"],
                                       **TOL)
        lines = [[json.loads(line) for line in (tmp_path / f"{kind}{i}" / METRICS_NAME).read_text().splitlines()]
                 for kind in ("ens", "seq")]
        assert [sorted(m) for m in lines[0]] == [sorted(m) for m in lines[1]]
        for m, s in zip(*lines):
            for key in ("train_loss", "train_adv_acc", "high_risk_fraction", "lr", "epoch"):
                assert m[key] == pytest.approx(s[key], abs=1e-5)


def test_resume_continues_each_model_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(epochs=2)
    subsets = _subsets([48, 80])
    full = _ensemble(cfg, tmp_path / "full", subsets, seeds=SEEDS[:2])
    real_end = ensemble._end_epoch
    ended = {"n": 0}

    def end_then_die(member, log) -> None:
        real_end(member, log)
        ended["n"] += 1
        if ended["n"] == 2:  # model 0 finished epoch 1 ... and model 1 too: killed
            raise KeyboardInterrupt

    monkeypatch.setattr(ensemble, "_end_epoch", end_then_die)
    with pytest.raises(KeyboardInterrupt):
        _ensemble(cfg, tmp_path / "killed", subsets, seeds=SEEDS[:2])
    monkeypatch.setattr(ensemble, "_end_epoch", real_end)
    with pytest.raises(FileExistsError):
        _ensemble(cfg, tmp_path / "killed", subsets, seeds=SEEDS[:2])
    resumed = _ensemble(cfg, tmp_path / "killed", subsets, seeds=SEEDS[:2], resume=True)
    assert [s.epoch for s in resumed] == [2, 2]
    _assert_same_parameters(resumed, full)
    for i in range(2):
        lines = (tmp_path / "killed" / f"ens{i}" / METRICS_NAME).read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_the_per_sample_path_trains_one_model_after_another(tmp_path: Path) -> None:
    cfg = _config(attack_steps=1, demem={"lam": 0.5, "max_grad_norm": 1.0})
    subsets = _subsets([20, 24])
    messages: list[str] = []
    ours = train_ensemble(cfg, SEEDS[:2], [tmp_path / "a", tmp_path / "b"], subsets, log=messages.append)
    assert any("one after another" in m and "per-sample" in m for m in messages)
    _assert_same_parameters(ours, _sequential(cfg, tmp_path, subsets, SEEDS[:2]))


@pytest.mark.parametrize("kwargs, argument", [
    (dict(ensemble_size=0), "ensemble_size"),
    (dict(ensemble_size=4), "ensemble_size"),
    (dict(seeds=[]), "seeds"),
    (dict(seeds=[1, 2]), "out_dirs"),
    (dict(subsets=[None]), "subsets"),
    (dict(out_dirs=["same", "same", "same"]), "out_dirs"),
    (dict(backend="loops"), "backend"),
])
def test_bad_input_is_a_value_error_naming_the_argument(tmp_path: Path, kwargs: dict, argument: str) -> None:
    args = dict(seeds=SEEDS, out_dirs=[tmp_path / str(i) for i in range(3)], subsets=None)
    args.update(kwargs)
    args["out_dirs"] = [tmp_path / str(d) for d in args["out_dirs"]]
    with pytest.raises(ValueError, match=argument):
        train_ensemble(_config(), log=_quiet, **args)
    assert not any(tmp_path.iterdir())  # nothing built or written


def test_the_audit_benchmark_runs_in_quick_mode(capsys: pytest.CaptureFixture) -> None:
    from demem_ext.bench.audit import main

    assert main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "CPU:" in out and "bf16" in out and "models/h" in out and "peak RSS" in out
    assert len([line for line in out.splitlines() if "contiguous" in line]) == 2  # K = 1 and 2


def test_an_ensemble_trained_audit_gives_the_sequential_statistics(tmp_path: Path) -> None:
    """8 shadow models trained 4 at a time give the statistics of 8 trained one after another (fp32, 1e-4
    relative and 5e-4 absolute: the stacked forward sums in another order, the thread count changes oneDNN's
    reductions, and the audit reads logits after a whole training; one logit in 95,840 differed by 1.4e-4)."""
    from demem_ext.audit.shadow import load_stats, train_shadow_models

    cfg = TrainConfig(epochs=1, attack_steps=1, batch_size=256, demem={"lam": 0.5})
    assert train_shadow_models(cfg, tmp_path / "seq", num_models=8, log=lambda _: None, ensemble=1) == list(range(8))
    assert train_shadow_models(cfg, tmp_path / "ens", num_models=8, log=lambda _: None, ensemble=4) == list(range(8))
    sequential, vectorized = load_stats(tmp_path / "seq"), load_stats(tmp_path / "ens")
    assert torch.equal(sequential["keep"], vectorized["keep"])
    for key in ("logits", "adv_logits", "loss", "adv_loss", "test_natural_acc"):
        torch.testing.assert_close(vectorized[key], sequential[key], rtol=1e-4, atol=5e-4)
    # the Python audit API on the same folders: the models are found trained, the reports agree
    from demem_ext.audit import audit_config

    alone = audit_config(cfg, tmp_path / "seq", num_models=8, log=lambda _: None)
    together = audit_config(cfg, tmp_path / "ens", num_models=8, ensemble=4, log=lambda _: None)
    assert (tmp_path / "ens" / "audit.json").exists() and alone["attacks"].keys() == together["attacks"].keys()
    assert together["training_peak_memory_mib"] > 0  # the shadow models' training peak, reported
    for attack, row in alone["attacks"].items():
        assert together["attacks"][attack]["auc"] == pytest.approx(row["auc"], abs=1e-4)


@pytest.mark.parametrize("ensemble", [0, 9, True])
def test_the_audit_refuses_an_ensemble_size_outside_one_to_the_number_of_models(tmp_path: Path, ensemble) -> None:
    from demem_ext.audit.shadow import train_shadow_models

    with pytest.raises(ValueError, match=r"ensemble must be .auto. or an integer in \[1, 8\]"):
        train_shadow_models(TrainConfig(epochs=1), tmp_path, num_models=8, ensemble=ensemble)
