"""The class-threshold rule of docs/audit.md ("The class-relative threshold") applied to tuning runs.

usage: python docs/audit/class_rule.py [--candidate SLUG] SEED:RUN_DIR [SEED:RUN_DIR ...]
Each RUN_DIR is a `demem reproduce --configs pgd-at,pgd-demem-l0.75,SLUG --keep-seed SEED` folder (summary.json):
both DeMem rows are paired with PGD-AT of the same run. SLUG: pgd-demem-l0.75-class (default),
pgd-demem-l0.5-class (the follow-up rule) or pgd-demem-l0.75-ztrace (the z-score trace, docs/audit.md).
"""
import json
import sys

import numpy as np

BASE, CURRENT = "pgd-at", "pgd-demem-l0.75"
args = sys.argv[1:]
CANDIDATE = "pgd-demem-l0.75-class"
if args[:1] == ["--candidate"]:
    CANDIDATE, args = args[1], args[2:]
changes: dict[str, list[dict]] = {}
print("| seed | PGD-AT: natural / PGD-20 / TPR@0.1% / TPR@1% | mean threshold (λ 0.75) | candidate |")
print("|---|---|---|---|")
for arg in args:
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
    per_seed = ", ".join(f"{100 * r['rel1']:+.1f}%" for r in rs)
    print(f"| {slug} | {','.join(r['seed'] for r in rs)} | {per_seed} | "
          f"{100 * m1:+.1f}% | {100 * m01:+.1f}% | {nat:.2f} | {pgd:.2f} | {'yes' if ok else 'no'} |")
m_cand, ok_cand = means[CANDIDATE]
adopt = ok_cand and m_cand <= means[CURRENT][0] - 0.02
field, new, old = ("proxy", "ztrace", "loss") if CANDIDATE.endswith("-ztrace") else ("threshold", "class", "mean")
print("decision:", f"{field}={new!r} becomes the default" if adopt else f"{field}={old!r} stays the default")
