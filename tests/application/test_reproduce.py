"""`demem reproduce`: end to end on a tiny setting (2 models, 1 epoch, 1 attack step), resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from demem_ext.cli import main
from demem_ext.config import DeMemConfig
from demem_ext.reproduce import (ALL_SLUGS, DP_MATCH_SLUGS, SLUGS, VARIANT_SLUGS, choose_lambda, configurations, demem_fields,
                                 parse_configs, reproduce)
from demem_ext.audit.attacks import PRIMARY_ATTACK
from demem_ext.training import TrainConfig

CONFIGS = ["pgd-at", "pgd-dp-s1", "pgd-demem-l1", "pgd-demem-trace"]
TINY_FLAGS = ["--models", "2", "--epochs", "1", "--attack-steps", "1", "--batch-size", "256",
              "--autoattack", "fast", "--eval-limit", "16", "--configs", ",".join(CONFIGS), "--no-progress"]
PLOTS = ("roc_primary.png", "privacy_robustness.png", "accuracy_by_memorization.png")


def _quiet(_: str) -> None:
    pass


def test_reproduce_end_to_end_then_rerun_trains_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    summary = reproduce(out, models=2, epochs=1, configs=CONFIGS, jobs=2, autoattack="fast", eval_limit=16,
                        base_overrides={"attack_steps": 1, "batch_size": 256}, log=_quiet)
    lam = summary["lambda_choice"]["lam"]
    assert lam in (1.0, 0.5) and "lowest TPR at 1% FPR under the primary attack" in summary["lambda_choice"]["rule"]
    folders = ["pgd-at", "pgd-dp-s1", "pgd-demem-l1", f"pgd-demem-trace-l{lam:g}"]
    assert summary["trained"] == {f: [0, 1] for f in folders}
    for folder in folders:
        report = json.loads((out / folder / "audit.json").read_text())
        assert report["num_models"] == 2
        assert json.loads((out / folder / "eval_model0.json").read_text())["autoattack_version"] == "fast"
    rows = {r["slug"]: r for r in summary["rows"]}
    assert rows["pgd-dp-s1"]["epsilon"] is not None and rows["pgd-at"]["epsilon"] is None
    assert rows["pgd-demem-trace"]["config"]["demem"] == demem_fields(lam=lam, proxy="trace")
    for png in PLOTS:
        assert (out / png).stat().st_size > 1000
    text = (out / "results.md").read_text()
    assert len(rows["pgd-demem-l1"]["primary"]["tpr_at_fpr_0.01_ci95"]) == 2
    assert rows["pgd-demem-l1"]["vs_baseline"]["baseline"] == "pgd-at"
    assert "vs_baseline" not in rows["pgd-at"]
    assert rows["pgd-at"]["primary"]["attack"] == PRIMARY_ATTACK and "worst_case" in rows["pgd-at"]
    for needle in ("| configuration | natural | PGD-20 | AutoAttack | primary TPR@0.1% [95% CI] | primary TPR@1%",
                   "## Every attack", "**worst case**",
                   "## Reading",
                   "torchattacks", "Choice of λ", *(f"]({png})" for png in PLOTS)):
        assert needle in text
    eval_mtime = (out / "pgd-at" / "eval_model0.json").stat().st_mtime_ns

    assert rows["pgd-at"]["autoattack"] == {"models": 1, "values": [rows["pgd-at"]["model0"]["autoattack_acc"]],
                                            "mean": rows["pgd-at"]["model0"]["autoattack_acc"]}

    # rerun through the CLI: every model and model 0's evaluation are reused, model 1 is evaluated too (its own
    # seed), the AutoAttack column becomes the mean; the report also goes to --results
    docs = tmp_path / "docs" / "results.md"
    assert main(["reproduce", *TINY_FLAGS, "--autoattack-models", "2", "--out", str(out), "--results", str(docs)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["trained"] == {f: [] for f in folders}
    assert [r["lira_online"] for r in again["rows"]] == [r["lira_online"] for r in summary["rows"]]
    assert (out / "pgd-at" / "eval_model0.json").stat().st_mtime_ns == eval_mtime
    second = json.loads((out / "pgd-at" / "eval_model1.json").read_text())
    assert second["settings"]["model"] == 1
    both = {r["slug"]: r for r in again["rows"]}["pgd-at"]["autoattack"]
    assert both["models"] == 2 and both["values"][1] == second["autoattack_acc"]
    assert both["mean"] == pytest.approx((both["values"][0] + both["values"][1]) / 2)
    assert "AutoAttack: mean of models 0-1" in (out / "results.md").read_text()
    assert "--autoattack-models 2" in again["command"] and again["autoattack_models"] == 2
    assert again["command"].startswith("demem reproduce --dataset digits --out")
    assert "## Reading" in docs.read_text() and all((docs.parent / png).exists() for png in PLOTS)
    capsys.readouterr()


def test_autoattack_models_beyond_the_models_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["reproduce", *TINY_FLAGS, "--autoattack-models", "3", "--out", str(tmp_path / "x")]) == 2
    assert "autoattack_models must be an integer in [1, 2]" in capsys.readouterr().err
    with pytest.raises(ValueError, match="autoattack_models"):
        reproduce(tmp_path / "y", models=2, autoattack_models=0, log=_quiet)


def test_unknown_configuration_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="unknown configuration.*'nope'.*pgd-at"):
        parse_configs("pgd-at,nope")
    assert main(["reproduce", "--configs", "pgd-at,nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and ", ".join(ALL_SLUGS) in err
    assert not (tmp_path / "x").exists()


def test_configurations_cover_the_comparison() -> None:
    base = TrainConfig(epochs=3, batch_size=32)
    configs = {c.slug: c for c in configurations(base, trace_lam=2.0)}
    assert tuple(configs) == ALL_SLUGS and len(set(ALL_SLUGS)) == len(ALL_SLUGS)
    assert set(SLUGS + DP_MATCH_SLUGS + VARIANT_SLUGS) == set(ALL_SLUGS) and len(SLUGS) == 20
    assert "pgd-dp-c10-s0.1" in SLUGS and "pgd-dp-c3-s0.1" not in SLUGS  # the matched DP-SGD setting only
    assert not configs["pgd-at"].config.use_demem and configs["trades"].config.at == "trades"
    dp = configs["pgd-dp-s0.5"].config
    assert dp.per_sample() and dp.demem == demem_fields(lam=0.0, max_grad_norm=1.0, noise_multiplier=0.5,
                                                        clip_scope="all", expected_batch_size=32)
    # every DeMem field is spelled out, so a change of DeMemConfig's defaults cannot silently reuse old models
    assert all(set(c.config.demem) == set(DeMemConfig.__dataclass_fields__) for c in configs.values()
               if c.config.use_demem)
    variant = configs["pgd-demem-l1-k2"].config.demem_config()
    assert (variant.lam, variant.k, variant.threshold, variant.selection) == (1.0, 2.0, "mean", "hard")
    assert [configs[f"pgd-demem-l{x}"].lam for x in ("0.25", "0.5", "0.75", "1", "2")] == [0.25, 0.5, 0.75, 1.0, 2.0]
    assert configs["pgd-demem-trace"].folder == "pgd-demem-trace-l2"
    assert all(c.config.epochs == 3 for c in configs.values())
    assert [s for s, c in configs.items() if c.report_epsilon] == ["pgd-dp-s0.5", "pgd-dp-s1", *DP_MATCH_SLUGS,
                                                                   "trades-dp-s1"]
    matched = configs["pgd-dp-c10-s0.1"].config.demem
    assert (matched["max_grad_norm"], matched["noise_multiplier"]) == (10.0, 0.1)


def test_configuration_keywords() -> None:
    assert parse_configs("variants") == list(VARIANT_SLUGS)
    assert parse_configs("dp-match") == list(DP_MATCH_SLUGS) == ["pgd-dp-s0.1", "pgd-dp-c3-s0.1", "pgd-dp-c10-s0.1"]
    assert parse_configs("all") == list(ALL_SLUGS) and parse_configs("comparison") == list(SLUGS)
    assert parse_configs("pgd-demem-l1-k2,pgd-at") == ["pgd-at", "pgd-demem-l1-k2"]


def test_lambda_choice_rule() -> None:
    def row(method: str, lam, pgd20: float, tpr: float) -> dict:
        return {"method": method, "family": "PGD-AT", "lam": lam, "mean_test_pgd20_acc": pgd20,
                "primary": {"tpr_at_fpr_0.01": tpr}}

    rows = {"pgd-at": row("baseline", None, 0.80, 0.10),
            "a": row("demem", 0.25, 0.80, 0.08), "b": row("demem", 1.0, 0.785, 0.05),
            "c": row("demem", 2.0, 0.70, 0.01)}  # lowest TPR but 10 points less robust
    assert choose_lambda(rows)["lam"] == 1.0
    rows["b"]["mean_test_pgd20_acc"] = 0.75
    assert choose_lambda(rows)["lam"] == 0.25
    del rows["a"], rows["b"]
    assert choose_lambda(rows)["lam"] == 0.5  # none qualifies
    assert choose_lambda({})["lam"] == 0.5 and "fallback" in choose_lambda({})["reason"]


def test_diverged_configuration_is_recorded_and_not_retrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """λ > 1 can diverge: the run records it, reports it and goes on; a rerun does not train it again."""
    import demem_ext.reproduce.jobs as rep
    from demem_ext.ops.functional import NonFiniteError

    real = rep.train_shadow_models
    calls: list[float] = []

    def fake(cfg: TrainConfig, *args, **kwargs):  # λ = 2 "diverges" in its first model
        calls.append(cfg.demem.get("lam", 0.0))
        if cfg.demem.get("lam") == 2.0:
            raise NonFiniteError("per_sample_losses has non-finite values")
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(rep, "train_shadow_models", fake)
    kwargs = dict(models=2, epochs=1, configs=["pgd-at", "pgd-demem-l2"], jobs=1, autoattack="none",
                  eval_limit=16, base_overrides={"attack_steps": 1, "batch_size": 256}, log=_quiet)
    summary = reproduce(tmp_path, **kwargs)
    rows = {r["slug"]: r for r in summary["rows"]}
    assert rows["pgd-at"]["status"] == "ok" and rows["pgd-demem-l2"]["status"] == "diverged"
    assert rows["pgd-demem-l2"]["divergence"]["model"] == 0 and rows["pgd-demem-l2"]["finished_models"] == 0
    assert json.loads((tmp_path / "pgd-demem-l2" / "diverged.json").read_text())["error"].endswith("non-finite values")
    assert summary["lambda_choice"]["candidates"] == []  # a diverged λ is not a candidate
    text = (tmp_path / "results.md").read_text()
    assert "**diverged**" in text and "Diverged configurations" in text
    calls.clear()
    reproduce(tmp_path, **kwargs)
    assert calls == []  # neither the finished nor the diverged configuration is trained again


def test_folder_of_another_configuration_is_refused(tmp_path: Path) -> None:
    """Models trained under other DeMem settings (e.g. before a change of defaults) are never reused."""
    import demem_ext.reproduce.run as rep

    kwargs = dict(models=2, epochs=1, configs=["pgd-demem-l1"], autoattack="none", eval_limit=16,
                  base_overrides={"attack_steps": 1, "batch_size": 256}, log=_quiet)
    reproduce(tmp_path, **kwargs)
    from demem_ext.training.checkpoint import load_checkpoint, save_checkpoint

    keep = load_checkpoint(tmp_path / "pgd-demem-l1" / "keep.pt")
    keep["settings"]["config"]["demem"]["k"] = 2.0
    save_checkpoint(keep, tmp_path / "pgd-demem-l1" / "keep.pt")
    with pytest.raises(ValueError, match="another configuration"):
        rep.reproduce(tmp_path, **kwargs)


def test_replicates_get_their_own_folders_and_a_t_interval_summary(tmp_path: Path) -> None:
    summary = reproduce(tmp_path, models=2, epochs=1, configs=["pgd-at", "pgd-demem-l1"], autoattack="none",
                        eval_limit=16, base_overrides={"attack_steps": 1, "batch_size": 256}, log=_quiet,
                        keep_seeds="0,1")
    assert summary["keep_seeds"] == [0, 1]
    for seed in (0, 1):
        assert json.loads((tmp_path / f"keep-{seed}" / "summary.json").read_text())["keep_seed"] == seed
    entry = {e["slug"]: e for e in summary["replicates"]}["pgd-demem-l1"]
    assert entry["seeds"] == [0, 1] and len(entry["0.01"]["difference"]["values"]) == 2
    pooled = entry["0.01"]["pooled"]  # the paired bootstrap pooled over the replicates
    assert pooled["difference"] == pytest.approx(entry["0.01"]["difference"]["mean"])
    lo, hi = pooled["difference_ci95"]
    assert lo <= hi
    text = (tmp_path / "results.md").read_text()
    assert "## Replicates" in text and "pooled @1%" in text


def test_ensemble_trained_replicate_gives_the_sequential_audit(tmp_path: Path) -> None:
    """--ensemble 2: both models of a configuration trained at once in one process, same statistics."""
    kwargs = dict(models=2, epochs=1, configs=["pgd-demem-l1"], autoattack="none", eval_limit=16,
                  base_overrides={"attack_steps": 1, "batch_size": 256}, log=_quiet)
    alone = reproduce(tmp_path / "alone", **kwargs)
    together = reproduce(tmp_path / "together", ensemble=2, **kwargs)
    assert together["ensemble"] == 2 and together["trained"] == alone["trained"] == {"pgd-demem-l1": [0, 1]}
    a, b = (json.loads((tmp_path / d / "pgd-demem-l1" / "audit.json").read_text()) for d in ("alone", "together"))
    for attack, row in a["attacks"].items():
        assert b["attacks"][attack]["auc"] == pytest.approx(row["auc"], abs=1e-4)
    with pytest.raises(ValueError, match="ensemble must be .auto. or an integer in \\[1, 2\\]"):
        reproduce(tmp_path / "bad", ensemble=3, **kwargs)
