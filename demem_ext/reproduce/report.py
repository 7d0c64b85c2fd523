"""The Markdown report of `demem reproduce` (docs/results.md style).

The rows come from `demem_ext.reproduce.rows`; the report's "## Reading" section is written by hand and
kept when the report is rewritten.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

from demem_ext.training.checkpoint import write_text_atomic


# ---------------------------------------------------------------- the report

def robust_accuracy(row: dict[str, Any]) -> Optional[float]:
    """A result row's AutoAttack accuracy: the mean over its evaluated models (model 0's in older rows)."""
    return row.get("autoattack", {}).get("mean", row["model0"]["autoattack_acc"])


def evaluated_models(rows: Sequence[dict[str, Any]]) -> str:
    """Which models the robustness columns describe: "model 0" or "mean of models 0-N"."""
    n = max((r.get("autoattack", {}).get("models", 1) for r in rows if r["status"] == "ok"), default=1)
    return "model 0" if n == 1 else f"mean of models 0-{n - 1}"


def _pct(x: Optional[float]) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def _ci(x: float, ci: Optional[Sequence[float]], scale: float = 100) -> str:
    text = f"{scale * x:.2f}" + ("%" if scale == 100 else "")
    return text if ci is None else f"{text} [{scale * ci[0]:.2f}, {scale * ci[1]:.2f}]"


def _vs_base(r: dict[str, Any], fpr: str = "0.01") -> str:
    """The paired change from the family baseline: points, and the relative change where it is defined."""
    change = r.get("vs_baseline", {}).get(fpr)
    if change is None:
        return "—"
    points = f"{100 * change['difference']:+.2f} pts [{100 * change['difference_ci95'][0]:+.2f}, " \
             f"{100 * change['difference_ci95'][1]:+.2f}]"
    if change["relative"] is None:
        return points + "; relative: undefined (baseline TPR 0)"
    rel = f"{100 * change['relative']:+.0f}%"
    if change["relative_ci95"] is not None:
        rel += f" [{100 * change['relative_ci95'][0]:+.0f}, {100 * change['relative_ci95'][1]:+.0f}]"
    return f"{points}; {rel}"


def _attack_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every attack (rows) for every configuration (columns): TPR@0.1% / TPR@1% / AUC."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return []
    lines = ["## Every attack", "", "TPR at 0.1% FPR / TPR at 1% FPR / AUC of each attack (leave-one-out over the "
             "M models). The primary attack is marked **P**; the worst case is the column maximum.", "",
             "| attack | " + " | ".join(f"`{r['folder']}`" for r in ok) + " |", "|---|" + "---:|" * len(ok)]
    for name in ok[0]["attacks"]:
        mark = " **P**" if name == ok[0]["primary"]["attack"] else ""
        cells = [f"{_pct(r['attacks'][name]['tpr_at_fpr_0.001'])} / {_pct(r['attacks'][name]['tpr_at_fpr_0.01'])} / "
                 f"{r['attacks'][name]['auc']:.3f}" for r in ok]
        lines.append(f"| {name}{mark} | " + " | ".join(cells) + " |")
    lines.append("| **worst case** | " + " | ".join(
        f"{_pct(r['worst_case']['tpr_at_fpr_0.001'])} / {_pct(r['worst_case']['tpr_at_fpr_0.01'])} / "
        f"{r['worst_case']['auc']:.3f}" for r in ok) + " |")
    return lines + [""]


def replicate_lines(table: Sequence[dict[str, Any]]) -> list[str]:
    """The replicate section: mean over replicates with 95% t-intervals, and the paired change."""
    if not table:
        return []
    seeds = ", ".join(str(s) for s in table[0]["seeds"])
    lines = ["## Replicates", "", f"{len(table[0]['seeds'])} independent replicates (inclusion-mask seeds {seeds}); "
             f"attack: {table[0]['attack']}. Mean over replicates [95% t-interval across replicates]; \"vs base\": "
             "the paired change from the family baseline computed per replicate, then averaged (points; relative "
             "where every replicate's baseline TPR is > 0). \"pooled\": the change of the mean TPR with a paired "
             "bootstrap over samples, each replicate resampled on its own [95% percentile interval].", "",
             "| configuration | TPR@0.1% | vs base @0.1% | pooled @0.1% | TPR@1% | vs base @1% | pooled @1% | "
             "per-replicate change @1% |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]

    def change(cell: dict[str, Any]) -> str:
        if "difference" not in cell:
            return "—"
        d = cell["difference"]
        text = _ci(d["mean"], d["ci95"]).replace("%", " pts")
        rel = cell["relative"]
        return text + ("; relative undefined (a baseline TPR is 0)" if rel is None else
                       f"; {_ci(rel['mean'], rel['ci95'])}")

    def pooled(cell: dict[str, Any]) -> str:
        if "pooled" not in cell:
            return "—"
        p = cell["pooled"]
        text = _ci(p["difference"], p["difference_ci95"]).replace("%", " pts")
        return text + ("" if p["relative"] is None or p["relative_ci95"] is None else
                       f"; {_ci(p['relative'], p['relative_ci95'])}")

    def per_replicate(cell: dict[str, Any]) -> str:
        if "difference" not in cell:
            return "TPR " + ", ".join(_pct(v) for v in cell["values"])
        rel = cell["relative"]["values"] if cell["relative"] else [None] * len(cell["values"])
        return ", ".join(_pct(d).replace("%", " pts") + ("" if r is None else f" ({100 * r:+.0f}%)")
                         for d, r in zip(cell["difference"]["values"], rel))

    for e in table:
        lo, hi = e["0.001"], e["0.01"]
        lines.append(f"| {e['name']} | {_ci(lo['mean'], lo['ci95'])} | {change(lo)} | {pooled(lo)} | "
                     f"{_ci(hi['mean'], hi['ci95'])} | {change(hi)} | {pooled(hi)} | {per_replicate(hi)} |")
    return lines + [""]


def write_results(summary: dict[str, Any], path: str | Path) -> Path:
    """The Markdown report (docs/results.md style); PNGs are linked relative to `path`, copied next to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    source = Path(summary["out_dir"])
    images: dict[str, str] = {}
    for key, name in summary["plots"].items():
        if name is None:
            continue
        if path.parent.resolve() != source.resolve():
            shutil.copyfile(source / name, path.parent / Path(name).name)
            name = Path(name).name
        images[key] = name
    v = summary["versions"]
    rows = summary["rows"]
    lines = [
        "# Reproduction: PGD-AT / TRADES vs DP-SGD vs DeMem (shadow models)",
        "",
        "Generated by `demem reproduce`; every number below is measured, none is copied from the paper.",
        "",
        "```bash",
        summary["command"],
        "```",
        "",
        f"- dataset: {summary['dataset']}; {summary['num_models']} shadow models per configuration, each trained "
        f"{summary['epochs']} epoch{'s' if summary['epochs'] != 1 else ''} on a random half of the training split (inclusion masks seed "
        f"{summary['seeds']['keep_seed']}); LiRA is leave-one-out over the {summary['num_models']} models.",
        f"- seeds: model i trains with {summary['seeds']['model_seeds']}; split seed {summary['seeds']['split_seed']}; "
        f"evaluation seed = the evaluated model's training seed.",
        "- base configuration: " + ", ".join(f"{k}={summary['base_config'][k]}" for k in
                                               ("model", "eps", "alpha", "attack_steps", "beta", "optimizer", "lr",
                                                "schedule", "batch_size")),
        f"- robustness of {evaluated_models(rows)}: PGD-20 and AutoAttack `{summary['autoattack']}` (torchattacks) "
        "on "
        f"{'the first ' + str(summary['eval_limit']) + ' test samples' if summary['eval_limit'] else 'the test split'}.",
        f"- software: Python {v['python']}, torch {v['torch']}, torchattacks {v['torchattacks']}, numpy {v['numpy']}; "
        f"{v['platform']}; {v['torch_threads']} torch threads; {summary['jobs']} training process(es).",
        f"- wall time of this invocation: {summary['wall_seconds']:.0f} s (models found finished on disk are not "
        f"retrained; summed training time per configuration is in the table below).",
        "",
        "## Results",
        "",
        "Natural and PGD-20: mean test accuracy over the M models. "
        f"AutoAttack: {evaluated_models(rows)}. Primary attack: "
        f"{summary.get('primary_attack', '')} (leave-one-out; rule: {summary.get('primary_rule', '')}). "
        "TPR [95% CI]: bootstrap over the "
        f"population samples ({summary['bootstrap_resamples']} resamples, all M pairs of a sample kept together); "
        "\"vs base\": change from the family's baseline (PGD-AT, TRADES or MART) in points and relative, paired on the "
        "same resamples. These intervals cover the sampling of the audited samples, not the randomness of "
        "training (see the replicates for that). Worst case: the highest TPR over all attacks at that FPR "
        "(chosen after the fact: optimistic for the attacker). \"LiRA online\": the per-example-variance "
        "attack on natural queries, the weak headline of earlier reports, for comparison. "
        "ε at δ = 1e-5 for the DP-SGD rows (RDP accounting); \"—\" where ε is not guaranteed.",
        "",
        "| configuration | natural | PGD-20 | AutoAttack | primary TPR@0.1% [95% CI] | primary TPR@1% [95% CI] "
        "| vs base @1% [95% CI] | primary AUC | worst-case TPR@0.1% | worst-case TPR@1% | LiRA online TPR@1% | ε "
        "| train time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} (`{r['folder']}`) | **diverged**: {_pct(r['mean_test_natural_acc'])} | "
                         f"{_pct(r['mean_test_pgd20_acc'])} | — | — | — | — | — | — | — | — | — | "
                         f"{r['train_seconds']:.0f} s |")
            continue
        eps = f"{r['epsilon']:.3g}" if r["epsilon"] is not None else "—"
        p, w = r["primary"], r["worst_case"]
        lines.append(f"| {r['name']} (`{r['folder']}`) | {_pct(r['mean_test_natural_acc'])} | "
                     f"{_pct(r['mean_test_pgd20_acc'])} | {_pct(robust_accuracy(r))} | "
                     f"{_ci(p['tpr_at_fpr_0.001'], p.get('tpr_at_fpr_0.001_ci95'))} | "
                     f"{_ci(p['tpr_at_fpr_0.01'], p.get('tpr_at_fpr_0.01_ci95'))} | {_vs_base(r)} | {p['auc']:.3f} | "
                     f"{_pct(w['tpr_at_fpr_0.001'])} | {_pct(w['tpr_at_fpr_0.01'])} | "
                     f"{_pct(r['lira_online']['tpr_at_fpr_0.01'])} | {eps} | {r['train_seconds']:.0f} s |")
    lines += [""] + _attack_table(rows) + replicate_lines(summary.get("replicates", []))
    lines += ["Model 0 alone (its natural, PGD-20 and AutoAttack accuracy):", "",
              "| configuration | natural | PGD-20 | AutoAttack |", "|---|---:|---:|---:|"]
    for r in rows:
        if r["status"] == "ok":
            m = r["model0"]
            lines.append(f"| {r['name']} | {_pct(m['natural_acc'])} | {_pct(m['pgd20_acc'])} | "
                         f"{_pct(m['autoattack_acc'])} |")
    diverged = [r for r in rows if r["status"] == "diverged"]
    if diverged:
        lines += ["", "Diverged configurations (training stopped at the first non-finite loss or gradient; their "
                  "natural / PGD-20 cells are the mean test accuracy of the models finished before):", ""]
        lines += [f"- {r['name']}: model {r['divergence']['model']} after {r['divergence']['epochs_completed']} "
                  f"completed epochs ({r['finished_models']} of {summary['num_models']} models finished): "
                  f"`{r['divergence']['error']}`" for r in diverged]
    eps_notes = [r for r in rows if r["report_epsilon"] and r["status"] == "ok"]
    if eps_notes:
        lines += ["", "ε of the DP-SGD configurations:", ""]
        lines += [f"- {r['name']}: {r['epsilon_reason']}" for r in eps_notes]
    choice = summary["lambda_choice"]
    lines += ["", "## Choice of λ for the loss-trace configuration", "", f"Rule: {choice['rule']}.", "",
              f"Choice: {choice['reason']}.", ""]
    if choice["candidates"]:
        lines += ["| λ | primary TPR@1% | mean PGD-20 | qualifies |", "|---:|---:|---:|---|"]
        lines += [f"| {c['lam']:g} | {_pct(c['tpr_at_fpr_0.01'])} | {_pct(c['mean_test_pgd20_acc'])} | "
                  f"{'yes' if c['qualifies'] else 'no'} |" for c in choice["candidates"]]
        lines.append("")
    lines += ["## Figures", ""]
    captions = {"roc": "ROC (log-log) per configuration family: the primary attack for every configuration, "
                       "LiRA offline (dashed) for the family baseline",
                "tradeoff": f"privacy–robustness trade-off: primary attack's TPR at 1% FPR (95% bootstrap "
                            f"interval) vs {summary['robust_axis']}",
                "memorization": "accuracy on OUT samples per memorization-score bin"}
    for key, name in images.items():
        lines += [f"![{captions[key]}]({name})", ""]
    by_bin = summary["accuracy_by_memorization"]
    if by_bin:
        names = list(by_bin)
        first = by_bin[names[0]]["natural"]
        lines += ["## Accuracy per memorization-score bin", "",
                  "Memorization scores (Feldman) from the PGD-AT models; for each configuration, the mean over its "
                  "models of their accuracy on the samples they did not train on (OUT), natural / robust "
                  "(adversarial queries, PGD-10).", "",
                  "| bin | OUT samples per model | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
        for b, edge in enumerate(first):
            label = f"[{edge['low']:g}, {edge['high']:g}{']' if b == len(first) - 1 else ')'}"
            cells = [f"{_pct(by_bin[n]['natural'][b]['accuracy'])} / {_pct(by_bin[n]['robust'][b]['accuracy'])}"
                     for n in names]
            lines.append(f"| {label} | {edge['count']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [READING_MARK, "",
              "<!-- READING: written by hand after looking at the numbers above; not generated. -->", ""]
    lines += [_hand_written_reading(path) or
              "_To be written by hand_: the plain reading of claims (a)–(d) is written after looking at the "
              "numbers above. This section is deliberately not generated.", ""]
    write_text_atomic("\n".join(lines), path)
    return path


READING_MARK = "## Reading"


def _hand_written_reading(path: Path) -> Optional[str]:
    """The hand-written text after the last "## Reading" heading of an existing report (kept on rewrite)."""
    if not path.exists():
        return None
    text = path.read_text()
    if READING_MARK not in text:
        return None
    body = text.rsplit(READING_MARK, 1)[1]
    body = body.split("-->", 1)[1] if "<!-- READING" in body else body
    body = body.strip()
    return None if not body or body.startswith("_To be written by hand_") else body
