"""Training precision and memory format: the auto choice, bad input, bf16 training, fp32 everywhere else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import demem_ext.training.precision as precision
from demem_ext.training import TrainConfig, train
from demem_ext.training.checkpoint import load_checkpoint
from demem_ext.training.loop import build, train_epoch

TINY = dict(epochs=2, batch_size=128, attack_steps=2, seed=5)
NATIVE = precision.native_bf16("cpu")[0]


def _quiet(_: str) -> None:
    pass


@pytest.mark.parametrize("flags, expected", [({"amx_bf16", "avx512f"}, "bf16"), ({"avx512_bf16"}, "bf16"),
                                             ({"avx2", "avx512f"}, "fp32"), (set(), "fp32")])
def test_auto_picks_bf16_only_where_the_cpu_has_it(monkeypatch, flags: set, expected: str) -> None:
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset(flags))
    chosen, reason = precision.resolve_precision("auto", "cpu")
    assert chosen == expected and reason.startswith("auto: ")
    if expected == "fp32":
        with pytest.raises(ValueError, match="precision 'bf16' is not supported here"):
            precision.resolve_precision("bf16", "cpu")


@pytest.mark.parametrize("bad, match", [({"precision": "fp16"}, "precision must be one of"),
                                        ({"memory_format": "nhwc"}, "memory_format must be one of")])
def test_bad_precision_options(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_the_default_is_fp32_contiguous() -> None:  # bf16 failed the parity check (docs/benchmarks.md)
    assert (TrainConfig().precision, TrainConfig().memory_format) == ("fp32", "contiguous")


def test_checkpoints_from_before_the_option_resume_in_fp32() -> None:
    values = TrainConfig().to_dict()
    del values["precision"], values["memory_format"]
    cfg = TrainConfig.from_dict(values)
    assert (cfg.precision, cfg.memory_format) == ("fp32", "contiguous")


def test_the_resolved_choice_is_stored_in_the_checkpoint(tmp_path: Path) -> None:
    state = train(TrainConfig(**{**TINY, "epochs": 1}, precision="auto", memory_format="auto"), tmp_path,
                  progress=False, log=_quiet)
    stored = load_checkpoint(tmp_path / "checkpoint.pt")["config"]
    assert stored["precision"] == ("bf16" if NATIVE else "fp32")
    assert stored["memory_format"] == "channels_last"
    assert state.precision_reason.startswith("auto: ")


def test_channels_last_changes_nothing_but_the_layout() -> None:
    results = []
    for layout in ("contiguous", "channels_last"):
        state = build(TrainConfig(**TINY, precision="fp32", memory_format=layout))
        with state.demem:
            train_epoch(state, progress=False)
        results.append({k: v.contiguous() for k, v in state.model.state_dict().items()})
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not NATIVE, reason="this CPU has no native bf16 (amx_bf16 / avx512_bf16)")
@pytest.mark.parametrize("demem", [{"lam": 0.5}, {"lam": 0.5, "max_grad_norm": 1.0, "noise_multiplier": 0.5}],
                         ids=["weighting", "per_sample"])
def test_bf16_trains_fp32_parameters_and_resumes_exactly(tmp_path: Path, monkeypatch, demem: dict) -> None:
    import demem_ext.training.loop as loop

    cfg = TrainConfig(**TINY, demem=demem, precision="bf16")
    full = train(cfg, tmp_path / "full", progress=False, log=_quiet)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in full.model.parameters())
    real_save = loop.save_checkpoint

    def save_then_die(payload, path):
        real_save(payload, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "killed", progress=False, log=_quiet)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed = train(cfg, tmp_path / "killed", resume=True, progress=False, log=_quiet)
    for a, b in zip(resumed.model.parameters(), full.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    fp32 = train(TrainConfig(**TINY, demem=demem, precision="fp32"), tmp_path / "fp32", progress=False, log=_quiet)
    pairs = zip(full.model.state_dict().values(), fp32.model.state_dict().values())
    assert max(float((a - b).abs().max()) for a, b in pairs) > 0  # bf16 did change the arithmetic
