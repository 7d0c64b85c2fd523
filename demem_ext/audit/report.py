"""The membership-inference audit report: every attack's ROC summary, the primary attack, the worst
case over attacks, canary power, memorization scores and ε, written to audit.json and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from demem_ext import accounting
from demem_ext.audit import memorization, metrics, proxies
from demem_ext.audit.attacks import PRIMARY_RULE, primary_attack, run_attacks, summarize, worst_case
from demem_ext.audit.calibration import canary_power
from demem_ext.training import TrainConfig
from demem_ext.training.checkpoint import write_text_atomic

DELTA = 1e-5
MIN_MODELS = 16  # fewer shadow models: low-FPR numbers are noisy and per-example variances unusable


def _epsilon(stats: Mapping[str, Any]) -> dict[str, Any]:
    config = stats.get("settings", {}).get("config")
    if config is None:
        return {"epsilon": None, "reason": "ε is not computed: no training configuration (Python API audit)"}
    cfg = TrainConfig.from_dict(config)
    if not cfg.use_demem:
        return {"epsilon": None, "reason": "ε is not guaranteed: no DeMem/DP"}
    sizes = [int(b) for b in stats["demem"][0]["noisy_batch_sizes"]]
    num_train = int(stats["num_train"][0])
    eps, reason = accounting.privacy_spent(cfg.demem_config(), sizes, num_train, DELTA,
                                           sampling=cfg.sampling_of(num_train))
    return {"epsilon": eps, "reason": reason} if eps is None else {"epsilon": eps, "delta": DELTA, "reason": reason}


def _correct(stats: Mapping[str, Any], kind: str) -> Optional[torch.Tensor]:
    """correct / adv_correct [M, N]: stored, or from the logits' argmax; None without those logits."""
    if stats.get(kind) is not None:
        return stats[kind]
    logits = stats.get("logits" if kind == "correct" else "adv_logits")
    return None if logits is None else logits.argmax(-1) == stats["labels"]


def _memorization(stats: Mapping[str, Any], columns: torch.Tensor, out: Path) -> dict[str, Any]:
    keep = stats["keep"][:, columns]
    correct = {k: c[:, columns] for k in ("correct", "adv_correct") if (c := _correct(stats, k)) is not None}
    mem = memorization.scores(correct["correct"], keep)
    memorization.histogram(mem, out / "memorization_hist.png")
    by_bin = {}
    for split, mask in (("in", keep), ("out", ~keep)):
        for kind, values in correct.items():
            # accuracy of each model on its in (or out) samples, averaged over models per bin
            mean_correct = torch.nanmean(torch.where(mask, values.double(), torch.nan), dim=0)
            by_bin[f"{split}_{'robust' if kind == 'adv_correct' else 'natural'}"] = memorization.accuracy_by_bin(
                mem, mean_correct)
    return {"mean": float(torch.nanmean(mem)), "accuracy_by_bin": by_bin}


def run_audit(stats: Mapping[str, Any], out_dir: str | Path, title: Optional[str] = None,
              attacks: Optional[Mapping[str, tuple[torch.Tensor, torch.Tensor]]] = None) -> dict[str, Any]:
    """The audit of shadow-model statistics; writes audit.json, roc.png and memorization_hist.png.

    stats: keep [M, N], labels [N], logits [M, N, K] and optionally adv_logits, aug_logits,
    adv_aug_logits, correct, adv_correct, test_natural_acc / test_pgd20_acc [M], settings (with the
    training config), demem, num_train, and canaries (indices of mislabeled canary samples: reported
    as a power check, left out of every population number). attacks: `run_attacks(stats)` if the
    caller has it already.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keep = stats["keep"]
    m, n = keep.shape
    canaries = stats.get("canaries")
    columns = torch.ones(n, dtype=torch.bool)
    if canaries is not None:
        columns[torch.as_tensor(canaries)] = False
    attacks = run_attacks(stats) if attacks is None else attacks
    summaries = summarize(attacks, columns)
    primary = primary_attack(summaries)
    report: dict[str, Any] = {
        "num_models": int(m), "num_samples": int(columns.sum()),
        "config": stats.get("settings", {}).get("config"),
        "primary": {"attack": primary, "rule": PRIMARY_RULE, **summaries[primary]},
        "worst_case": worst_case(summaries), "attacks": summaries, "warnings": []}
    if stats.get("training_precision"):  # shadow models: how they were trained (scoring is always fp32)
        report["training_precision"] = [{"precision": p, "memory_format": f, "reason": r}
                                        for p, f, r in stats["training_precision"]]
    if "peak_memory_mib" in stats:  # the largest peak of the processes that trained the shadow models
        report["training_peak_memory_mib"] = round(float(stats["peak_memory_mib"]), 1)
    if m < MIN_MODELS:
        report["warnings"].append(f"only {m} shadow models (M < {MIN_MODELS}): per-example variances and TPR at "
                                  "low FPR are unreliable; read the fixed-variance attacks and use more models")
    if stats.get("loss_record") is not None:  # shadow models that recorded their training losses
        report["proxy_screening"] = proxies.screen(stats["loss_record"], stats["labels"], keep,
                                                   attacks[primary][0], columns)
        report["proxy_screening"]["attack"] = primary
    if canaries is not None:
        report["canaries"] = canary_power(*attacks[primary], canaries)
        report["canaries"]["attack"] = primary
    curves = {name: metrics.roc(s[:, columns], y[:, columns])
              for name, (s, y) in attacks.items()
              if (name.startswith("LiRA") and "augmented" not in name) or name == "loss attack"}
    metrics.plot_roc(curves, out / "roc.png", title=title or "membership inference (leave-one-out)")
    report["memorization"] = _memorization(stats, columns, out)
    if stats.get("test_natural_acc") is not None:
        report["test_accuracy"] = {"natural": float(stats["test_natural_acc"].mean()),
                                   "pgd20": float(stats["test_pgd20_acc"].mean())}
    report["train_accuracy"] = {k: float(c[:, columns][keep[:, columns]].double().mean())
                                for k, key in (("natural", "correct"), ("robust", "adv_correct"))
                                if (c := _correct(stats, key)) is not None}
    report["privacy"] = _epsilon(stats)
    write_text_atomic(json.dumps(report, indent=2), out / "audit.json")
    return report


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def format_report(report: Mapping[str, Any]) -> str:
    """A readable table of the audit: every attack, then the primary attack and the worst case."""
    lines = [f"{report['num_models']} models x {report['num_samples']} samples (leave-one-out)"]
    if "test_accuracy" in report:
        lines.append(f"test accuracy: natural {_pct(report['test_accuracy']['natural'])}, "
                     f"PGD-20 {_pct(report['test_accuracy']['pgd20'])} (mean over models)")
    lines.append(f"{'attack':<56} {'AUC':>6} {'TPR@0.1%':>9} {'TPR@1%':>8} {'TPR@10%':>8}")
    for name, s in report["attacks"].items():
        lines.append(f"{name:<56} {s['auc']:>6.3f} {_pct(s['tpr_at_fpr_0.001']):>9} "
                     f"{_pct(s['tpr_at_fpr_0.01']):>8} {_pct(s['tpr_at_fpr_0.1']):>8}")
    p, w = report["primary"], report["worst_case"]
    lines.append(f"{'PRIMARY: ' + p['attack']:<56} {p['auc']:>6.3f} {_pct(p['tpr_at_fpr_0.001']):>9} "
                 f"{_pct(p['tpr_at_fpr_0.01']):>8} {_pct(p['tpr_at_fpr_0.1']):>8}")
    lines.append(f"{'WORST CASE (max over attacks per column)':<56} {w['auc']:>6.3f} {_pct(w['tpr_at_fpr_0.001']):>9} "
                 f"{_pct(w['tpr_at_fpr_0.01']):>8} {_pct(w['tpr_at_fpr_0.1']):>8}")
    if "canaries" in report:
        c = report["canaries"]
        lines.append(f"canaries ({c['num_canaries']}, power check, not in the rows above): {c['attack']} TPR "
                     f"{_pct(c['tpr_at_fpr_0.001'])} at 0.1% FPR ({c['times_chance_0.001']:.0f}x chance), "
                     f"{_pct(c['tpr_at_fpr_0.01'])} at 1%")
    if "proxy_screening" in report:
        lines += proxies.format_screening(report["proxy_screening"])
    eps = report["privacy"]["epsilon"]
    lines.append(f"epsilon: {eps:.3g} (δ = {DELTA})" if eps is not None else report["privacy"]["reason"])
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)
