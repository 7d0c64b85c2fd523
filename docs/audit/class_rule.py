"""The class-threshold rule of docs/audit.md ("The class-relative threshold") applied to tuning runs.

usage: python docs/audit/class_rule.py SEED:RUN_DIR [SEED:RUN_DIR ...]
Each RUN_DIR is a `demem reproduce --configs pgd-at,pgd-demem-l0.75,pgd-demem-l0.75-class --keep-seed SEED`
folder (summary.json): both DeMem rows are paired with PGD-AT of the same run.
"""
import json
import sys

import numpy as np

BASE, CURRENT, CANDIDATE = "pgd-at", "pgd-demem-l0.75", "pgd-demem-l0.75-class"
changes: dict[str, list[dict]] = {}
print("| seed | PGD-AT: natural / PGD-20 / TPR@0.1% / TPR@1% | mean threshold (λ 0.75) | class threshold (λ 0.75) |")
print("|---|---|---|---|")
for arg in sys.argv[1:]:
    seed, folder = arg.split(":", 1)
    rows = {r["slug"]: r for r in json.load(open(f"{folder}/summary.json"))["rows"] if r["status"] == "ok"}
    b = rows[BASE]
    cells = []
    for slug in (BASE, CURRENT, CANDIDATE):
        r = rows[slug]
        cells.append(f"{100 * r['mean_test_natural_acc']:.2f} / {100 * r['mean_test_pgd20_acc']:.2f} / "
                     f"{100 * r['primary']['tpr_at_fpr_0.001']:.2f} / {100 * r['primary']['tpr_at_fpr_0.01']:.2f}")
        if slug != BASE:
            changes.setdefault(slug, []).append({
                "seed": seed, "rel1": r["primary"]["tpr_at_fpr_0.01"] / b["primary"]["tpr_at_fpr_0.01"] - 1,
                "rel01": r["primary"]["tpr_at_fpr_0.001"] / b["primary"]["tpr_at_fpr_0.001"] - 1,
                "nat": 100 * (b["mean_test_natural_acc"] - r["mean_test_natural_acc"]),
                "pgd": 100 * (b["mean_test_pgd20_acc"] - r["mean_test_pgd20_acc"])})
    print(f"| {seed} | " + " | ".join(cells) + " |")
print()
print("| rule | seeds | TPR@1% change per seed | mean | TPR@0.1% mean change | natural cost (mean) | PGD-20 cost (mean) | eligible |")
print("|---|---|---|---:|---:|---:|---:|---|")
means = {}
for slug in (CURRENT, CANDIDATE):
    rs = changes[slug]
    m1, m01 = np.mean([r["rel1"] for r in rs]), np.mean([r["rel01"] for r in rs])
    nat, pgd = np.mean([r["nat"] for r in rs]), np.mean([r["pgd"] for r in rs])
    ok = nat <= 1.0 and pgd <= 3.0
    means[slug] = (m1, ok)
    print(f"| {slug} | {','.join(r['seed'] for r in rs)} | {', '.join(f'{100 * r['rel1']:+.1f}%' for r in rs)} | "
          f"{100 * m1:+.1f}% | {100 * m01:+.1f}% | {nat:.2f} | {pgd:.2f} | {'yes' if ok else 'no'} |")
m_cand, ok_cand = means[CANDIDATE]
adopt = ok_cand and m_cand <= means[CURRENT][0] - 0.02
print("decision:", "threshold='class' becomes the default" if adopt else "threshold='mean' stays the default")
