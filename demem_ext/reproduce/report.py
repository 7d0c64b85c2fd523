"""The figures and the Markdown report of `demem reproduce` (docs/results.md style).

The rows come from `demem_ext.reproduce`; the report's "## Reading" section is written by hand and
kept when the report is rewritten.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from demem_ext.training.checkpoint import write_text_atomic


# ---------------------------------------------------------------- figures

def _figure(size: tuple[float, float] = (8, 5.5)):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    return Figure(figsize=size)


def plot_tradeoff(rows: Sequence[dict[str, Any]], path: Path, use_autoattack: bool) -> Path:
    """TPR at 1% FPR (LiRA online) against robust accuracy, one labelled point per configuration."""
    fig = _figure((8, 5.5))
    ax = fig.add_subplot()
    markers = {"baseline": "o", "dp": "s", "demem": "^", "demem-trace": "D", "demem-variant": "v"}
    colors = {"PGD-AT": "tab:blue", "TRADES": "tab:orange"}
    placed = 0
    for r in rows:
        if r["status"] != "ok":
            continue
        x = r["model0"]["autoattack_acc"] if use_autoattack else r["mean_test_pgd20_acc"]
        if x is None:
            continue
        y = r["lira_online"]["tpr_at_fpr_0.01"]
        ax.scatter([100 * x], [100 * y], marker=markers[r["method"]], color=colors[r["family"]], s=40)
        offset = (5, 4) if placed % 2 == 0 else (5, -9)  # alternate above/below: fewer overlaps
        ax.annotate(r["folder"], (100 * x, 100 * y), textcoords="offset points", xytext=offset, fontsize="x-small")
        placed += 1
    for method, label in (("baseline", "no defence"), ("dp", "DP-SGD"), ("demem", "DeMem (loss)"),
                          ("demem-trace", "DeMem (loss trace)"), ("demem-variant", "DeMem variant")):
        ax.scatter([], [], marker=markers[method], color="gray", label=label)
    for family, color in colors.items():
        ax.scatter([], [], marker="o", color=color, label=family)
    ax.axhline(1.0, color="k", linestyle=":", linewidth=0.8, label="chance (TPR = FPR = 1%)")
    ax.set(xlabel=("AutoAttack accuracy of model 0 (%)" if use_autoattack else "mean PGD-20 test accuracy (%)"),
           ylabel="LiRA online TPR at 1% FPR (%)", title="privacy–robustness trade-off (lower right is better)")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


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


def plot_accuracy_by_memorization(table: dict[str, Any], path: Path) -> Path:
    """Grouped bars: OUT-sample accuracy per memorization bin, natural and robust, per configuration."""
    import numpy as np

    fig = _figure((11, 4.5))
    names = list(table)
    for panel, kind in enumerate(("natural", "robust")):
        ax = fig.add_subplot(1, 2, panel + 1)
        bins = table[names[0]][kind]
        x = np.arange(len(bins))
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            acc = [100 * b["accuracy"] if b["accuracy"] is not None else 0.0 for b in table[name][kind]]
            ax.bar(x + (j - (len(names) - 1) / 2) * width, acc, width, label=name)
        ax.set_xticks(x, [f"[{b['low']:g}, {b['high']:g}{']' if i == len(bins) - 1 else ')'}\n"
                          f"n≈{b['count']}" for i, b in enumerate(bins)], fontsize="x-small")
        ax.set(xlabel="memorization score (PGD-AT models)", ylabel=f"{kind} accuracy on OUT samples (%)",
               ylim=(0, 105), title=f"{kind} accuracy per memorization bin")
        if panel == 0:
            handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(names), fontsize="small")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=120)
    return path


# ---------------------------------------------------------------- the report

def _pct(x: Optional[float]) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def _tpr_ci(r: dict[str, Any]) -> str:
    ci = r["lira_online"].get("tpr_at_fpr_0.01_ci95")
    text = _pct(r["lira_online"]["tpr_at_fpr_0.01"])
    return text if ci is None else f"{text} [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"


def _vs_base(r: dict[str, Any]) -> str:
    change = r.get("tpr_at_fpr_0.01_vs_baseline")
    if change is None:
        return "—"
    return f"{100 * change['relative']:+.0f}% [{100 * change['ci95'][0]:+.0f}, {100 * change['ci95'][1]:+.0f}]"


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
            shutil.copyfile(source / name, path.parent / name)
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
        f"evaluation seed = model 0's training seed.",
        "- base configuration: " + ", ".join(f"{k}={summary['base_config'][k]}" for k in
                                               ("model", "eps", "alpha", "attack_steps", "beta", "optimizer", "lr",
                                                "schedule", "batch_size")),
        f"- robustness of model 0: PGD-20 and AutoAttack `{summary['autoattack']}` (torchattacks) on "
        f"{'the first ' + str(summary['eval_limit']) + ' test samples' if summary['eval_limit'] else 'the test split'}.",
        f"- software: Python {v['python']}, torch {v['torch']}, torchattacks {v['torchattacks']}, numpy {v['numpy']}; "
        f"{v['platform']}; {v['torch_threads']} torch threads; {summary['jobs']} training process(es).",
        f"- wall time of this invocation: {summary['wall_seconds']:.0f} s (models found finished on disk are not "
        f"retrained; summed training time per configuration is in the table below).",
        "",
        "## Results",
        "",
        "Natural and PGD-20: mean test accuracy over the M models. AutoAttack: model 0. LiRA: online, "
        "leave-one-out, natural queries unless marked \"adv-query\". TPR@1% [95% CI]: bootstrap over the "
        f"population samples ({summary['bootstrap_resamples']} resamples, all M pairs of a sample kept together); "
        "\"vs base\": relative change from the family's baseline (PGD-AT or TRADES), paired on the same "
        "resamples. These intervals cover the sampling of the audited samples, not the randomness of "
        "training. ε at δ = 1e-5 for the DP-SGD rows (RDP accounting); \"—\" where ε is not guaranteed.",
        "",
        "| configuration | natural | PGD-20 | AutoAttack | LiRA TPR@0.1% | TPR@1% [95% CI] | vs base [95% CI] | AUC "
        "| adv-query TPR@1% | ε | train time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} (`{r['folder']}`) | **diverged**: {_pct(r['mean_test_natural_acc'])} | "
                         f"{_pct(r['mean_test_pgd20_acc'])} | — | — | — | — | — | — | — | "
                         f"{r['train_seconds']:.0f} s |")
            continue
        eps = f"{r['epsilon']:.3g}" if r["epsilon"] is not None else "—"
        lines.append(f"| {r['name']} (`{r['folder']}`) | {_pct(r['mean_test_natural_acc'])} | "
                     f"{_pct(r['mean_test_pgd20_acc'])} | {_pct(r['model0']['autoattack_acc'])} | "
                     f"{_pct(r['lira_online']['tpr_at_fpr_0.001'])} | {_tpr_ci(r)} | {_vs_base(r)} | "
                     f"{r['lira_online']['auc']:.3f} | {_pct(r['lira_online_adv']['tpr_at_fpr_0.01'])} | {eps} | "
                     f"{r['train_seconds']:.0f} s |")
    lines += ["", "Model 0 alone (the model AutoAttack evaluates):", "",
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
        lines += ["| λ | LiRA TPR@1% | mean PGD-20 | qualifies |", "|---:|---:|---:|---|"]
        lines += [f"| {c['lam']:g} | {_pct(c['tpr_at_fpr_0.01'])} | {_pct(c['mean_test_pgd20_acc'])} | "
                  f"{'yes' if c['qualifies'] else 'no'} |" for c in choice["candidates"]]
        lines.append("")
    lines += ["## Figures", ""]
    captions = {"roc": "LiRA online ROC (log-log), all configurations",
                "tradeoff": f"privacy–robustness trade-off: TPR at 1% FPR vs {summary['robust_axis']} "
                            "(points labelled by configuration folder, as in the table)",
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
