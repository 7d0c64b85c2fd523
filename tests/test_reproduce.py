"""`demem reproduce`: end to end on a tiny setting (2 models, 1 epoch, 1 attack step), resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from demem_ext.cli import main
from demem_ext.reproduce import SLUGS, choose_lambda, configurations, parse_configs, reproduce
from demem_ext.training import TrainConfig

CONFIGS = ["pgd-at", "pgd-dp-s1", "pgd-demem-l1", "pgd-demem-trace"]
TINY_FLAGS = ["--models", "2", "--epochs", "1", "--attack-steps", "1", "--batch-size", "256",
              "--autoattack", "fast", "--eval-limit", "16", "--configs", ",".join(CONFIGS), "--no-progress"]
PLOTS = ("roc_lira_online.png", "privacy_robustness.png", "accuracy_by_memorization.png")


def _quiet(_: str) -> None:
    pass


def test_reproduce_end_to_end_then_rerun_trains_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    summary = reproduce(out, models=2, epochs=1, configs=CONFIGS, jobs=2, autoattack="fast", eval_limit=16,
                        base_overrides={"attack_steps": 1, "batch_size": 256}, log=_quiet)
    lam = summary["lambda_choice"]["lam"]
    assert lam in (1.0, 0.5) and "lowest LiRA online TPR at 1% FPR" in summary["lambda_choice"]["rule"]
    folders = ["pgd-at", "pgd-dp-s1", "pgd-demem-l1", f"pgd-demem-trace-l{lam:g}"]
    assert summary["trained"] == {f: [0, 1] for f in folders}
    for folder in folders:
        report = json.loads((out / folder / "audit.json").read_text())
        assert report["num_models"] == 2
        assert json.loads((out / folder / "eval_model0.json").read_text())["autoattack_version"] == "fast"
    rows = {r["slug"]: r for r in summary["rows"]}
    assert rows["pgd-dp-s1"]["epsilon"] is not None and rows["pgd-at"]["epsilon"] is None
    assert rows["pgd-demem-trace"]["config"]["demem"] == {"lam": lam, "proxy": "trace"}
    for png in PLOTS:
        assert (out / png).stat().st_size > 1000
    text = (out / "results.md").read_text()
    for needle in ("| configuration | natural | PGD-20 | AutoAttack | LiRA TPR@0.1% | TPR@1% | AUC", "## Reading",
                   "torchattacks", "Choice of λ", *(f"]({png})" for png in PLOTS)):
        assert needle in text
    eval_mtime = (out / "pgd-at" / "eval_model0.json").stat().st_mtime_ns

    # rerun through the CLI: every model and evaluation is reused; the report also goes to --results
    docs = tmp_path / "docs" / "results.md"
    assert main(["reproduce", *TINY_FLAGS, "--out", str(out), "--results", str(docs)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["trained"] == {f: [] for f in folders}
    assert [r["lira_online"] for r in again["rows"]] == [r["lira_online"] for r in summary["rows"]]
    assert (out / "pgd-at" / "eval_model0.json").stat().st_mtime_ns == eval_mtime
    assert again["command"].startswith("demem reproduce --dataset digits --out")
    assert "## Reading" in docs.read_text() and all((docs.parent / png).exists() for png in PLOTS)
    capsys.readouterr()


def test_unknown_configuration_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="unknown configuration.*'nope'.*pgd-at"):
        parse_configs("pgd-at,nope")
    assert main(["reproduce", "--configs", "pgd-at,nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and ", ".join(SLUGS) in err
    assert not (tmp_path / "x").exists()


def test_configurations_cover_the_comparison() -> None:
    base = TrainConfig(epochs=3, batch_size=32)
    configs = {c.slug: c for c in configurations(base, trace_lam=2.0)}
    assert tuple(configs) == SLUGS and len(set(SLUGS)) == len(SLUGS)
    assert not configs["pgd-at"].config.use_demem and configs["trades"].config.at == "trades"
    dp = configs["pgd-dp-s0.5"].config
    assert dp.per_sample() and dp.demem == {"lam": 0.0, "max_grad_norm": 1.0, "noise_multiplier": 0.5,
                                            "clip_scope": "all", "expected_batch_size": 32}
    assert [configs[f"pgd-demem-l{x}"].lam for x in ("0.25", "0.5", "1", "2")] == [0.25, 0.5, 1.0, 2.0]
    assert configs["pgd-demem-trace"].folder == "pgd-demem-trace-l2"
    assert all(c.config.epochs == 3 for c in configs.values())
    assert [s for s, c in configs.items() if c.report_epsilon] == ["pgd-dp-s0.5", "pgd-dp-s1", "trades-dp-s1"]


def test_lambda_choice_rule() -> None:
    def row(method: str, lam, pgd20: float, tpr: float) -> dict:
        return {"method": method, "family": "PGD-AT", "lam": lam, "mean_test_pgd20_acc": pgd20,
                "lira_online": {"tpr_at_fpr_0.01": tpr}}

    rows = {"pgd-at": row("baseline", None, 0.80, 0.10),
            "a": row("demem", 0.25, 0.80, 0.08), "b": row("demem", 1.0, 0.785, 0.05),
            "c": row("demem", 2.0, 0.70, 0.01)}  # lowest TPR but 10 points less robust
    assert choose_lambda(rows)["lam"] == 1.0
    rows["b"]["mean_test_pgd20_acc"] = 0.75
    assert choose_lambda(rows)["lam"] == 0.25
    del rows["a"], rows["b"]
    assert choose_lambda(rows)["lam"] == 0.5  # none qualifies
    assert choose_lambda({})["lam"] == 0.5 and "fallback" in choose_lambda({})["reason"]
