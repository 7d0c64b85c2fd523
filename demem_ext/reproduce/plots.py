"""The figures of `demem reproduce`: the privacy–robustness trade-off under the primary attack, ROC
curves per configuration family, and accuracy per memorization-score bin."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from demem_ext.audit.metrics import _tpr_at
from demem_ext.reproduce.report import evaluated_models, robust_accuracy

LABEL_GAP = 0.05  # minimal vertical distance between two point labels, in axes fractions
MARKERS = {"baseline": "o", "dp": "s", "demem": "^", "demem-trace": "D", "demem-variant": "v", "demem-score": "P",
           "relaxloss": "X"}
COLORS = {"PGD-AT": "tab:blue", "TRADES": "tab:orange", "MART": "tab:green"}


def _figure(size: tuple[float, float]):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    return Figure(figsize=size)


def spread_labels(targets: Sequence[float], gap: float = LABEL_GAP) -> np.ndarray:
    """Label heights in [0, 1] as close as possible to `targets`, each at least `gap` from the next
    (in the targets' order): pushed up in one pass, then down from the top."""
    t = np.asarray(targets, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    y = t[order].clip(0, 1)
    for i in range(1, y.size):
        y[i] = max(y[i], y[i - 1] + gap)
    y[-1:] = np.minimum(y[-1:], 1.0)
    for i in range(y.size - 2, -1, -1):
        y[i] = min(y[i], y[i + 1] - gap)
    out = np.empty_like(y)
    out[order] = y
    return out


def plot_tradeoff(rows: Sequence[dict[str, Any]], path: Path, use_autoattack: bool) -> Path:
    """Primary attack's TPR at 1% FPR (bootstrap 95% interval as error bars) against robust accuracy;
    every point is named in a column right of the axes, with a leader line (labels never overlap)."""
    fig = _figure((11, 6))
    ax = fig.add_axes((0.08, 0.1, 0.55, 0.8))
    points = []
    for r in rows:
        if r["status"] != "ok":
            continue
        x = robust_accuracy(r) if use_autoattack else r["mean_test_pgd20_acc"]
        if x is None:
            continue
        p = r["primary"]
        y, ci = 100 * p["tpr_at_fpr_0.01"], p.get("tpr_at_fpr_0.01_ci95")
        err = None if ci is None else [[y - 100 * ci[0]], [100 * ci[1] - y]]
        ax.errorbar([100 * x], [y], yerr=err, marker=MARKERS[r["method"]], color=COLORS[r["family"]], capsize=3,
                    linestyle="none")
        points.append((100 * x, y, r["name"]))
    ax.axhline(1.0, color="k", linestyle=":", linewidth=0.8)
    attack = next((r["primary"]["attack"] for r in rows if r["status"] == "ok"), "primary attack")
    ax.set(xlabel=(f"AutoAttack accuracy: {evaluated_models(rows)} (%)" if use_autoattack
                   else "mean PGD-20 test accuracy (%)"),
           ylabel=f"TPR at 1% FPR (%), {attack}", title="privacy–robustness trade-off (lower right is better)")
    from matplotlib.lines import Line2D  # legend proxies, not drawn in the axes (no effect on its limits)

    handles = [Line2D([], [], marker=MARKERS[m], color="gray", linestyle="none", label=label)
               for m, label in (("baseline", "no defence"), ("dp", "DP-SGD"), ("demem", "DeMem (loss)"),
                                ("demem-trace", "DeMem (loss trace)"), ("demem-variant", "DeMem variant"),
                                ("demem-score", "DeMem (other score)"), ("relaxloss", "RelaxLoss"))]
    handles += [Line2D([], [], marker="o", color=c, linestyle="none", label=f) for f, c in COLORS.items()]
    handles.append(Line2D([], [], color="k", linestyle=":", label="chance (TPR = FPR = 1%)"))
    ax.legend(handles=handles, loc="upper left", fontsize="x-small")
    if points:
        ax.margins(0.1)
        ax.set(xlim=ax.get_xlim(), ylim=ax.get_ylim())  # frozen: data positions map to fixed axes fractions
        to_axes = ax.transData + ax.transAxes.inverted()
        anchors = np.array([to_axes.transform((x, y)) for x, y, _ in points])
        heights = spread_labels(anchors[:, 1])
        for (x, y, name), h in zip(points, heights):
            ax.annotate(name, (x, y), xytext=(1.04, h), textcoords="axes fraction", fontsize="small",
                        va="center", annotation_clip=False,
                        arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.6})
    fig.savefig(path, dpi=120)
    return path


def plot_roc_by_family(curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], path: Path,
                       title: str) -> Path:
    """One log-log panel per configuration family; curves[family][label] = (fpr, tpr)."""
    fig = _figure((6.5 * len(curves), 6.8))
    for k, (family, named) in enumerate(curves.items()):
        ax = fig.add_subplot(1, len(curves), k + 1)
        for i, (label, (fpr, tpr)) in enumerate(named.items()):
            ax.plot(fpr, tpr, linestyle="--" if "offline" in label else "-", linewidth=1.2,
                    label=f"{label} (TPR@0.1% {100 * _tpr_at(fpr, tpr, 1e-3):.2f}%)")
        ax.plot([1e-5, 1], [1e-5, 1], "k:", linewidth=0.8, label="chance")
        ax.set(xscale="log", yscale="log", xlim=(1e-4, 1), ylim=(1e-4, 1), xlabel="false positive rate",
               ylabel="true positive rate", title=f"{family}")
        ax.set_aspect("equal")
        ax.legend(loc="lower right", fontsize="x-small")  # below the chance line: empty for a real attack
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_accuracy_by_memorization(table: dict[str, Any], path: Path) -> Path:
    """Grouped bars: OUT-sample accuracy per memorization bin, natural and robust, per configuration.
    An empty bin (no sample) is a hatched outline marked "empty"; an accuracy of 0% is marked "0%"."""
    fig = _figure((11, 4.8))
    names = list(table)
    handles, labels = [], []
    for panel, kind in enumerate(("natural", "robust")):
        ax = fig.add_subplot(1, 2, panel + 1)
        bins = table[names[0]][kind]
        x = np.arange(len(bins))
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            offset = x + (j - (len(names) - 1) / 2) * width
            values = [b["accuracy"] for b in table[name][kind]]
            bars = ax.bar(offset, [100 * v if v is not None else 0.0 for v in values], width, label=name,
                          color=f"C{j}")
            for pos, v in zip(offset, values):
                if v is None:
                    ax.bar([pos], [100], width, fill=False, hatch="//", edgecolor="0.7", linewidth=0)
                    ax.text(pos, 50, "empty", rotation=90, ha="center", va="center", fontsize="x-small")
                elif v == 0:
                    ax.text(pos, 1, "0%", ha="center", va="bottom", fontsize="x-small")
            if panel == 0:
                handles.append(bars)
                labels.append(name)
        ax.set_xticks(x, [f"[{b['low']:g}, {b['high']:g}{']' if i == len(bins) - 1 else ')'}\n"
                          f"n≈{b['count']}" for i, b in enumerate(bins)], fontsize="x-small")
        ax.set(xlabel="memorization score (PGD-AT models)", ylabel=f"{kind} accuracy on OUT samples (%)",
               ylim=(0, 105), title=f"{kind} accuracy per memorization bin")
    fig.legend(handles, labels, loc="upper center", ncol=min(len(names), 4), fontsize="small")
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    fig.savefig(path, dpi=120)
    return path
