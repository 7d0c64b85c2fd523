"""Training loop: resume equals an uninterrupted run, checkpoints, metrics, bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from demem_ext.training.checkpoint import load_checkpoint, save_checkpoint
from demem_ext.training import CHECKPOINT_NAME, METRICS_NAME, TrainConfig, train

TINY = dict(epochs=3, batch_size=128, attack_steps=2, seed=3)


def _quiet(_: str) -> None:
    pass


def _params(state) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.model.state_dict().items()}


@pytest.mark.parametrize("demem", [
    {"lam": 0.5},
    {"lam": 1.0, "proxy": "trace"},
    {"lam": 0.5, "max_grad_norm": 1.0, "noise_multiplier": 0.5},
], ids=["weighting", "trace", "per_sample"])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path: Path, demem: dict) -> None:
    cfg = TrainConfig(**TINY, demem=demem)
    full = train(cfg, tmp_path / "full", progress=False, log=_quiet)

    killed_dir = tmp_path / "killed"
    _train_epochs_then_stop(cfg, killed_dir, stop_after=1)
    resumed = train(cfg, killed_dir, resume=True, progress=False, log=_quiet)
    assert resumed.epoch == 3
    for key, value in _params(full).items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)
    lines = (killed_dir / METRICS_NAME).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def _train_epochs_then_stop(cfg: TrainConfig, out: Path, stop_after: int) -> None:
    """Run `cfg` but stop (as if killed) right after epoch `stop_after`'s checkpoint was written."""
    import demem_ext.training.loop as training

    calls = {"n": 0}
    real_save = training.save_checkpoint

    def save_then_maybe_die(payload, path):
        real_save(payload, path)
        calls["n"] += 1
        if calls["n"] == stop_after:
            raise KeyboardInterrupt

    training.save_checkpoint = save_then_maybe_die
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, out, progress=False, log=_quiet)
    finally:
        training.save_checkpoint = real_save


def test_metrics_and_checkpoint_contents(tmp_path: Path) -> None:
    cfg = TrainConfig(**{**TINY, "epochs": 2})
    train(cfg, tmp_path, progress=False, log=_quiet)
    payload = load_checkpoint(tmp_path / CHECKPOINT_NAME, expected_format="demem-ext/train-v1")
    assert payload["epoch"] == 2 and payload["config"] == cfg.with_resolved_precision()[0].to_dict()
    assert {"model", "optimizer", "scheduler", "demem", "rng"} <= set(payload)
    rows = [json.loads(line) for line in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(0.0 <= r["high_risk_fraction"] <= 1.0 for r in rows)


def test_existing_run_needs_resume(tmp_path: Path) -> None:
    cfg = TrainConfig(**{**TINY, "epochs": 1})
    train(cfg, tmp_path, progress=False, log=_quiet)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, tmp_path, progress=False, log=_quiet)


def test_checkpoint_is_atomic_and_loading_rejects_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint({"format": "x", "v": torch.ones(2)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(tmp_path / "corrupt.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a demem-ext checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="format"):
        load_checkpoint(path, expected_format="demem-ext/train-v1")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_loading_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    torch.save({"format": "demem-ext/train-v1", "x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="corrupt or not"):
        load_checkpoint(tmp_path / "evil.pt")


@pytest.mark.parametrize("bad, match", [
    ({"optimizer": "lbfgs"}, "optimizer"),
    ({"epochs": 0}, "epochs"),
    ({"lr": -1.0}, "lr"),
    ({"demem": {"lam": -1.0}}, "lam"),
    ({"demem": {"bogus": 1}}, "bogus"),
])
def test_bad_training_options(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_demem_score_cross_entropy_is_the_loss_for_pgd_at_and_the_ce_part_for_trades(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    from demem_ext.middleware import DeMem

    tiny = {**TINY, "epochs": 1}
    runs = {}
    for score in ("loss", "cross_entropy"):
        state = train(TrainConfig(**tiny, demem_score=score), tmp_path / f"pgd-{score}", progress=False, log=_quiet)
        runs[score] = torch.cat([p.detach().flatten() for p in state.model.parameters()])
    torch.testing.assert_close(runs["cross_entropy"], runs["loss"], rtol=0, atol=0)

    seen = []
    real_backward = DeMem.backward

    def spy(self, losses, indices=None, scores=None, labels=None):
        seen.append((losses.detach().clone(), None if scores is None else scores.clone()))
        return real_backward(self, losses, indices=indices, scores=scores, labels=labels)

    monkeypatch.setattr(DeMem, "backward", spy)
    train(TrainConfig(**tiny, at="trades", beta=6.0, demem_score="cross_entropy"), tmp_path / "trades",
          progress=False, log=_quiet)
    assert seen and all(scores is not None and scores.shape == losses.shape for losses, scores in seen)
    # TRADES' loss is CE + β·KL with KL ≥ 0: the CE score is never above the loss, and below it somewhere
    assert all(bool((scores <= losses + 1e-5).all()) for losses, scores in seen)
    assert any(bool((scores < losses - 1e-6).any()) for losses, scores in seen)


def test_demem_score_natural_trains_and_bad_scores_are_refused(tmp_path: Path) -> None:
    state = train(TrainConfig(**{**TINY, "epochs": 1}, demem_score="natural"), tmp_path, progress=False, log=_quiet)
    assert state.epoch == 1
    with pytest.raises(ValueError, match="demem_score must be one of"):
        TrainConfig(demem_score="margin")
    with pytest.raises(ValueError, match="only supported on the weighting path"):
        TrainConfig(demem_score="natural", demem={"max_grad_norm": 1.0})


def test_stored_configs_pin_every_demem_field_and_old_ones_keep_their_lambda() -> None:
    from demem_ext.config import DeMemConfig
    from demem_ext.training.config import LEGACY_DEMEM_DEFAULTS

    cfg = TrainConfig(demem={"k": 2.0})
    stored = cfg.to_dict()
    assert stored["demem"] == dataclasses.asdict(DeMemConfig(k=2.0))  # every field spelled out, not only k
    assert TrainConfig.from_dict(stored) == cfg and cfg.matches(stored)
    # written before the fields were pinned: only k was stored, and λ had its default of that time
    old = {**stored, "demem": {"k": 2.0}}
    assert TrainConfig.from_dict(old).demem_config().lam == LEGACY_DEMEM_DEFAULTS["lam"] == 0.5
    assert not cfg.matches(old)  # the default is now 0.75: the old run is a different configuration
    # DeMem off: the fields stay as given, so a stored baseline still matches
    baseline = TrainConfig(use_demem=False)
    assert baseline.demem == {} and baseline.matches({**baseline.to_dict()})
