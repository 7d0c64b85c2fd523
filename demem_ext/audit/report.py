"""The membership-inference audit of a training configuration: LiRA (online/offline, natural and
adversarial queries), metric attacks, memorization scores and ε, written to audit.json and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from demem_ext import accounting
from demem_ext.audit import lira, memorization, metrics
from demem_ext.audit.metric_attacks import METRIC_ATTACKS
from demem_ext.training import TrainConfig

DELTA = 1e-5


def _lira_attacks(stats: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Leave-one-out LiRA scores and membership labels for each variant."""
    keep, labels = stats["keep"], stats["labels"]
    out = {}
    for query, key in (("", "logits"), ("adv ", "adv_logits")):
        phi = lira.logit_confidence(stats[key], labels)
        for name, online, fixed in (("online", True, False), ("offline", False, False),
                                    ("online fixed-var", True, True)):
            out[f"LiRA {name}{' (adversarial queries)' if query else ''}"] = lira.leave_one_out(
                phi, keep, online=online, fixed_variance=fixed)
    return out


def _metric_attacks(stats: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Threshold attacks that need no shadow models: each model scores its own population."""
    labels = stats["labels"].expand_as(stats["keep"])
    return {f"{name} attack": (fn(stats["logits"], labels), stats["keep"])
            for name, fn in METRIC_ATTACKS.items()}


def _epsilon(stats: dict[str, Any]) -> dict[str, Any]:
    cfg = TrainConfig.from_dict(stats["settings"]["config"])
    if not cfg.use_demem:
        return {"epsilon": None, "reason": "ε is not guaranteed: no DeMem/DP"}
    sizes = [int(b) for b in stats["demem"][0]["noisy_batch_sizes"]]
    eps, reason = accounting.privacy_spent(cfg.demem_config(), sizes, int(stats["num_train"][0]), DELTA)
    return {"epsilon": eps, "reason": reason} if eps is None else {"epsilon": eps, "delta": DELTA, "reason": reason}


def run_audit(stats: dict[str, Any], out_dir: str | Path, title: Optional[str] = None) -> dict[str, Any]:
    """Compute every attack's ROC summary, memorization scores and ε; write audit.json and PNGs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    attacks = {**_lira_attacks(stats), **_metric_attacks(stats)}
    report: dict[str, Any] = {"num_models": int(stats["keep"].shape[0]),
                              "num_samples": int(stats["keep"].shape[1]),
                              "config": stats["settings"]["config"], "attacks": {}}
    curves = {}
    for name, (scores, is_member) in attacks.items():
        report["attacks"][name] = metrics.summary(scores, is_member)
        fpr, tpr, _ = metrics.roc(scores, is_member)
        if name.startswith("LiRA online") or name == "loss attack":
            curves[name] = (fpr, tpr)
    metrics.plot_roc(curves, out / "roc.png", title=title or "membership inference (leave-one-out)")

    mem = memorization.scores(stats["correct"], stats["keep"])
    memorization.histogram(mem, out / "memorization_hist.png")
    keep = stats["keep"]
    by_bin = {}
    for split, mask in (("in", keep), ("out", ~keep)):
        for kind in ("correct", "adv_correct"):
            # accuracy of each model on its in (or out) samples, averaged over models per bin
            correct = torch.where(mask, stats[kind].double(), torch.nan)
            mean_correct = torch.nanmean(correct, dim=0)
            by_bin[f"{split}_{'robust' if kind == 'adv_correct' else 'natural'}"] = memorization.accuracy_by_bin(
                mem, mean_correct)
    report["memorization"] = {"mean": float(torch.nanmean(mem)), "accuracy_by_bin": by_bin}
    report["test_accuracy"] = {"natural": float(stats["test_natural_acc"].mean()),
                               "pgd20": float(stats["test_pgd20_acc"].mean())}
    report["train_accuracy"] = {"natural": float(stats["correct"][keep].double().mean()),
                                "robust": float(stats["adv_correct"][keep].double().mean())}
    report["privacy"] = _epsilon(stats)
    (out / "audit.json").write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict[str, Any]) -> str:
    """A readable table of the audit."""
    lines = [f"{report['num_models']} models x {report['num_samples']} samples (leave-one-out)",
             f"test accuracy: natural {100 * report['test_accuracy']['natural']:.2f}%, "
             f"PGD-20 {100 * report['test_accuracy']['pgd20']:.2f}% (mean over models)",
             f"{'attack':<44} {'AUC':>6} {'TPR@0.1%':>9} {'TPR@1%':>8} {'TPR@10%':>8}"]
    for name, s in report["attacks"].items():
        lines.append(f"{name:<44} {s['auc']:>6.3f} {100 * s['tpr_at_fpr_0.001']:>8.2f}% "
                     f"{100 * s['tpr_at_fpr_0.01']:>7.2f}% {100 * s['tpr_at_fpr_0.1']:>7.2f}%")
    eps = report["privacy"]["epsilon"]
    lines.append(f"epsilon: {eps:.3g} (δ = {DELTA})" if eps is not None else report["privacy"]["reason"])
    return "\n".join(lines)
