"""Issue 19's targets read from a confirmation run (`demem reproduce --keep-seeds 10,11 ...`).

usage: python docs/audit/confirmation_targets.py RUN_DIR
RUN_DIR holds summary.json (the replicates, with the pooled paired bootstrap) and keep-<seed>/summary.json.
Prints, per configuration, the per-seed and pooled changes of the primary attack's TPR from the family
baseline, the accuracy changes (natural and PGD-20: mean over the models; AutoAttack: the mean over the models
evaluated, `--autoattack-models`, model 0 alone by default), and each
target's verdict. The targets are the issue's, written here before the run was read.
"""
import json
import sys
from pathlib import Path

from demem_ext.reproduce.report import evaluated_models, robust_accuracy

# (relative TPR@1% reduction at least, and TPR@0.1% too?, accuracy cost at most in points) per family
TARGETS = {"PGD-AT": (0.30, True, 1.0), "TRADES": (0.20, False, 1.5), "MART": (0.20, False, 1.5)}


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def change(cell: dict) -> str:
    """Per-seed relative changes, then the pooled one with its bootstrap interval."""
    per_seed = ", ".join(f"{100 * v:+.0f}%" for v in cell["relative"]["values"])
    pooled = cell.get("pooled", {})
    ci = pooled.get("relative_ci95")
    interval = f" [{100 * ci[0]:+.0f}, {100 * ci[1]:+.0f}]" if ci else ""
    return f"{per_seed}; pooled {100 * pooled['relative']:+.0f}%{interval}"


def main(folder: Path) -> None:
    top = json.loads((folder / "summary.json").read_text())
    seeds = top["keep_seeds"]
    rows = {s: {r["slug"]: r for r in json.loads((folder / f"keep-{s}" / "summary.json").read_text())["rows"]
                if r["status"] == "ok"} for s in seeds}
    print(f"seeds {', '.join(map(str, seeds))}; primary attack: {top['replicates'][0]['attack']}")
    print("| configuration | TPR@1% per seed | TPR@1% change: per seed; pooled [95%] | TPR@0.1% change: per seed; "
          f"pooled [95%] | natural Δ per seed | PGD-20 Δ | AutoAttack Δ ({evaluated(rows)}) | target |")
    print("|---|---|---|---|---|---|---|---|")
    bases = {"PGD-AT": "pgd-at", "TRADES": "trades", "MART": "mart"}
    for entry in top["replicates"]:
        slug, family = entry["slug"], entry["family"]
        base = bases[family]
        tprs = ", ".join(pct(v) for v in entry["0.01"]["values"])
        if slug == base:
            print(f"| {entry['name']} | {tprs} | — | — | — | — | — | baseline |")
            continue

        def delta(key: str) -> list[float]:
            return [100 * (get(rows[s][slug], key) - get(rows[s][base], key)) for s in seeds]

        nat, pgd, aa = delta("mean_test_natural_acc"), delta("mean_test_pgd20_acc"), delta(AUTOATTACK)
        verdict = "—"
        if family in TARGETS and "demem" in slug:
            need, both, cost = TARGETS[family]
            cells = [entry["0.01"]] + ([entry["0.001"]] if both else [])
            reduced = all(c["pooled"]["relative"] <= -need and c["pooled"]["relative_ci95"] is not None
                          and c["pooled"]["relative_ci95"][1] < 0 for c in cells)
            accurate = all(-d <= cost for d in nat + aa)  # natural and AutoAttack accuracy
            verdict = (f"leakage {'met' if reduced else 'NOT met'}; accuracy {'met' if accurate else 'NOT met'}")
        print(f"| {entry['name']} | {tprs} | {change(entry['0.01'])} | {change(entry['0.001'])} | "
              + " | ".join(", ".join(f"{d:+.2f}" for d in ds) for ds in (nat, pgd, aa)) + f" | {verdict} |")
    for other in ("pgd-relaxloss-a0.5", "pgd-dp-c10-s0.1", "pgd-dp-s1"):  # RelaxLoss, matched and standard DP-SGD
        pareto(rows, seeds, "pgd-demem-l0.75", other)


def pareto(rows: dict, seeds: list, demem: str, other: str) -> None:
    """DeMem Pareto-dominates `other` when, at equal or lower mean TPR@1%, its mean AutoAttack accuracy is higher."""
    if not all(demem in rows[s] and other in rows[s] for s in seeds):
        return
    mean = lambda slug, key: sum(get(rows[s][slug], key) for s in seeds) / len(seeds)  # noqa: E731
    t_d, t_o = mean(demem, "primary/tpr_at_fpr_0.01"), mean(other, "primary/tpr_at_fpr_0.01")
    a_d, a_o = mean(demem, AUTOATTACK), mean(other, AUTOATTACK)
    verdict = "dominates" if t_d <= t_o and a_d > a_o else "does NOT dominate"
    print(f"\nPareto: {demem} TPR@1% {pct(t_d)}, AutoAttack {pct(a_d)}; {other} TPR@1% {pct(t_o)}, "
          f"AutoAttack {pct(a_o)} (means over seeds): DeMem {verdict} {other}")


AUTOATTACK = "autoattack"  # the AutoAttack accuracy: the mean over the evaluated models (get)


def evaluated(rows: dict) -> str:
    """Which models AutoAttack evaluated: "model 0" or "mean of models 0-N" (as the report says)."""
    return evaluated_models([r for seed_rows in rows.values() for r in seed_rows.values()])


def get(row: dict, key: str) -> float:
    """row[a][b] for key "a/b"; AUTOATTACK: the report's AutoAttack accuracy (the mean over the evaluated models)."""
    if key == AUTOATTACK:
        return float(robust_accuracy(row))
    for part in key.split("/"):
        row = row[part]
    return float(row)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
