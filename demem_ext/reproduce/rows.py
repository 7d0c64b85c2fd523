"""One result row per configuration of `demem reproduce` (its audit and model-0 robustness), and the
fixed rule that picks the λ of the loss-trace configuration from the sweep's rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from demem_ext.audit.attacks import run_attacks
from demem_ext.audit.shadow import STATS_FORMAT, load_stats, missing_models, model_dir
from demem_ext.reproduce.configs import BASELINE_SLUG, FALLBACK_LAMBDA, SWEEP_LAMBDAS, Configuration
from demem_ext.reproduce.jobs import divergence, evaluate_model, train_seconds
from demem_ext.training.checkpoint import load_checkpoint, read_json

LIRA = "LiRA online"
LIRA_OFFLINE = "LiRA offline"
LIRA_ADV = "LiRA online (adversarial queries)"
ROBUSTNESS_MARGIN = 0.02  # the chosen λ keeps mean PGD-20 within 2 points of PGD-AT's
SELECTION_RULE = (f"among the PGD-AT + DeMem sweep λ ∈ {{{', '.join(f'{x:g}' for x in SWEEP_LAMBDAS)}}}, the λ "
                  f"with the lowest TPR at 1% FPR under the primary attack whose mean PGD-20 test accuracy (over the "
                  f"M models) is within {100 * ROBUSTNESS_MARGIN:g} points of PGD-AT's (ties: higher "
                  f"PGD-20, then smaller λ); if none qualifies, or the sweep or PGD-AT has no results, "
                  f"λ = {FALLBACK_LAMBDA:g}")
Scores = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _identity(c: Configuration) -> dict[str, Any]:
    return {"name": c.name, "slug": c.slug, "folder": c.folder, "family": c.family, "method": c.method,
            "lam": c.lam, "noise_multiplier": c.noise, "report_epsilon": c.report_epsilon, "config": c.config.to_dict()}


def _diverged_row(c: Configuration, out: Path, num_models: int, record: dict[str, Any]) -> dict[str, Any]:
    """A configuration whose training diverged: the record, and the test accuracy of its finished models."""
    finished = [i for i in range(num_models) if i not in missing_models(out / c.folder, num_models)]
    stats = [load_checkpoint(model_dir(out / c.folder, i) / "stats.pt", expected_format=STATS_FORMAT) for i in finished]

    def mean(key: str) -> Optional[float]:
        return sum(float(s[key]) for s in stats) / len(stats) if stats else None

    return {"status": "diverged", **_identity(c), "divergence": {k: v for k, v in record.items() if k != "config"},
            "finished_models": len(finished), "mean_test_natural_acc": mean("test_natural_acc"),
            "mean_test_pgd20_acc": mean("test_pgd20_acc"),
            "train_seconds": round(train_seconds(out / c.folder, num_models), 1)}


def _row(c: Configuration, report: dict[str, Any], evaluations: list[dict[str, Any]], seconds: float
         ) -> dict[str, Any]:
    """evaluations: of models 0, 1, ... (AutoAttack's mean is over all of them)."""
    attacks = report["attacks"]
    evaluation = evaluations[0]
    autoattack = [e.get("autoattack_acc") for e in evaluations]
    known = [a for a in autoattack if a is not None]
    return {
        "status": "ok", **_identity(c),
        "mean_test_natural_acc": report["test_accuracy"]["natural"],
        "mean_test_pgd20_acc": report["test_accuracy"]["pgd20"],
        "model0": {k: evaluation.get(k) for k in ("natural_acc", "pgd20_acc", "autoattack_acc", "autoattack_version",
                                                  "num_samples")},
        "autoattack": {"models": len(evaluations), "values": autoattack,
                       "mean": sum(known) / len(known) if known else None},
        "primary": dict(report["primary"]), "worst_case": report["worst_case"], "attacks": attacks,
        "lira_online": dict(attacks[LIRA]), "lira_online_adv": dict(attacks[LIRA_ADV]),
        "epsilon": report["privacy"].get("epsilon"), "epsilon_delta": report["privacy"].get("delta"),
        "epsilon_reason": report["privacy"].get("reason"),
        "train_seconds": round(seconds, 1),
    }


def evaluate(c: Configuration, out: Path, num_models: int, autoattack: str, eval_limit: Optional[int],
             log: Callable[[str], None], rows: dict[str, dict[str, Any]], stats: dict[str, dict[str, Any]],
             scores: dict[str, Scores], autoattack_models: int = 1) -> None:
    """rows[c.slug] (and, unless c diverged, stats[c.slug] and scores[c.slug]: primary and LiRA offline); the
    robustness of models 0 .. autoattack_models − 1."""
    record = divergence(c, out)
    if record is not None:
        rows[c.slug] = _diverged_row(c, out, num_models, record)
        return
    rows[c.slug], stats[c.slug], scores[c.slug] = _run_configuration(c, out, num_models, autoattack, eval_limit, log,
                                                                      autoattack_models)


def _run_configuration(c: Configuration, out: Path, num_models: int, autoattack: str, eval_limit: Optional[int],
                       log: Callable[[str], None], autoattack_models: int = 1
                       ) -> tuple[dict[str, Any], dict[str, Any], Scores]:
    """Audit (always recomputed from the saved stats: cheap) and the cached model evaluations."""
    from demem_ext.audit.report import run_audit

    folder = out / c.folder
    stats = load_stats(folder, num_models)
    if not c.config.matches(stats["settings"]["config"]):
        raise ValueError(f"{folder} holds models trained with another configuration than {c.slug!r} has now "
                         f"(e.g. after a change of DeMemConfig's defaults): use another --out or remove the folder")
    attacks = run_attacks(stats)
    report = run_audit(stats, folder, title=f"{c.name}: membership inference", attacks=attacks)
    evaluations = [evaluate_model(folder, autoattack, eval_limit, k) for k in range(autoattack_models)]
    row = _row(c, report, evaluations, train_seconds(folder, num_models))
    p = row["primary"]
    log(f"[{c.slug}] natural {100 * row['mean_test_natural_acc']:.2f}%  PGD-20 {100 * row['mean_test_pgd20_acc']:.2f}%"
        f"  primary TPR@0.1% {100 * p['tpr_at_fpr_0.001']:.2f}%  TPR@1% {100 * p['tpr_at_fpr_0.01']:.2f}%"
        f"  AUC {p['auc']:.3f}")
    kept = {name: attacks[name] for name in (report["primary"]["attack"], LIRA_OFFLINE)}
    return row, stats, kept


def choose_lambda(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Apply SELECTION_RULE to the result rows (by slug); returns {lam, rule, reason, candidates}."""
    base = rows.get(BASELINE_SLUG)
    sweep = [r for r in rows.values()
             if r["method"] == "demem" and r["family"] == "PGD-AT" and r.get("status", "ok") == "ok"]
    choice = {"rule": SELECTION_RULE, "lam": FALLBACK_LAMBDA, "candidates": []}
    if base is None or not sweep:
        choice["reason"] = (f"fallback λ = {FALLBACK_LAMBDA:g}: no results for "
                            f"{'PGD-AT' if base is None else 'the λ sweep'} in this folder")
        return choice
    floor = base["mean_test_pgd20_acc"] - ROBUSTNESS_MARGIN
    for r in sorted(sweep, key=lambda r: r["lam"]):
        choice["candidates"].append({"lam": r["lam"], "tpr_at_fpr_0.01": r["primary"]["tpr_at_fpr_0.01"],
                                     "mean_test_pgd20_acc": r["mean_test_pgd20_acc"],
                                     "qualifies": r["mean_test_pgd20_acc"] >= floor - 1e-12})
    qualified = [c for c in choice["candidates"] if c["qualifies"]]
    if not qualified:
        choice["reason"] = (f"fallback λ = {FALLBACK_LAMBDA:g}: no swept λ keeps mean PGD-20 within "
                            f"{100 * ROBUSTNESS_MARGIN:g} points of PGD-AT ({100 * base['mean_test_pgd20_acc']:.2f}%)")
        return choice
    best = min(qualified, key=lambda c: (c["tpr_at_fpr_0.01"], -c["mean_test_pgd20_acc"], c["lam"]))
    choice["lam"] = best["lam"]
    choice["reason"] = (f"λ = {best['lam']:g}: primary TPR@1% {100 * best['tpr_at_fpr_0.01']:.2f}%, mean PGD-20 "
                        f"{100 * best['mean_test_pgd20_acc']:.2f}% (PGD-AT {100 * base['mean_test_pgd20_acc']:.2f}%)")
    return choice


def sweep_rows_on_disk(all_configs: Sequence[Configuration], out: Path, num_models: int,
                       rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rows for the λ choice: this run's, completed by audit.json files of earlier runs in the folder."""
    found = dict(rows)
    for c in all_configs:
        if c.slug in found or not (c.slug == BASELINE_SLUG or (c.method == "demem" and c.family == "PGD-AT")):
            continue
        path = out / c.folder / "audit.json"
        if path.exists() and not missing_models(out / c.folder, num_models):
            report = read_json(path)
            if (isinstance(report, dict) and report.get("num_models") == num_models
                    and c.config.matches(report.get("config"))):
                found[c.slug] = {"method": c.method, "family": c.family, "lam": c.lam,
                                 "mean_test_pgd20_acc": report["test_accuracy"]["pgd20"],
                                 "primary": {"tpr_at_fpr_0.01": report["primary"]["tpr_at_fpr_0.01"]}}
    return found


def accuracy_by_memorization(reference: dict[str, Any], stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per configuration: mean over its models of their OUT-sample accuracy per memorization bin.

    Memorization scores come from `reference` (the PGD-AT models), the common yardstick.
    """
    from demem_ext.audit import memorization

    mem = memorization.scores(reference["correct"], reference["keep"])
    out: dict[str, Any] = {}
    for name, s in stats.items():
        entry = {}
        for kind, key in (("natural", "correct"), ("robust", "adv_correct")):
            per_model = [memorization.accuracy_by_bin(mem, torch.where(~s["keep"][m], s[key][m].double(), torch.nan))
                         for m in range(s["keep"].shape[0])]
            bins = []
            for b, first in enumerate(per_model[0]):
                values = [p[b]["accuracy"] for p in per_model if p[b]["accuracy"] is not None]
                bins.append({"low": first["low"], "high": first["high"],
                             "count": int(round(sum(p[b]["count"] for p in per_model) / len(per_model))),
                             "accuracy": sum(values) / len(values) if values else None})
            entry[kind] = bins
        out[name] = entry
    return out
