"""The λ rule of docs/audit.md ("Choosing DeMem's default λ on PGD-AT") applied to tuning runs.

usage: python docs/audit/lambda_rule.py SEED:RUN_DIR [SEED:RUN_DIR ...]
Each RUN_DIR is a `demem reproduce --configs pgd-demem-l0.5,pgd-demem-l0.75 --keep-seed SEED` folder
(summary.json); PGD-AT of the same seed is read from docs/audit/audit_pgd_at_k{SEED}.json (same masks, fp32).
"""
import json
import sys

import numpy as np

LAMBDAS = ("pgd-demem-l0.5", "pgd-demem-l0.75")
rows = {}
for arg in sys.argv[1:]:
    seed, folder = arg.split(":", 1)
    base = json.load(open(f"docs/audit/audit_pgd_at_k{seed}.json"))
    b = {"nat": base["test_accuracy"]["natural"], "pgd": base["test_accuracy"]["pgd20"],
         "t1": base["primary"]["tpr_at_fpr_0.01"], "t01": base["primary"]["tpr_at_fpr_0.001"]}
    for r in json.load(open(f"{folder}/summary.json"))["rows"]:
        if r["slug"] in LAMBDAS and r["status"] == "ok":
            rows.setdefault(r["slug"], []).append({
                "seed": seed, "rel1": r["primary"]["tpr_at_fpr_0.01"] / b["t1"] - 1,
                "rel01": r["primary"]["tpr_at_fpr_0.001"] / b["t01"] - 1,
                "nat": 100 * (b["nat"] - r["mean_test_natural_acc"]), "pgd": 100 * (b["pgd"] - r["mean_test_pgd20_acc"])})
print("| λ | seeds | TPR@1% change per seed | mean | TPR@0.1% mean change | natural cost (mean) | PGD-20 cost (mean) | eligible |")
print("|---|---|---|---:|---:|---:|---:|---|")
best = None
for slug in LAMBDAS:
    rs = rows.get(slug, [])
    if not rs:
        continue
    m1, m01 = np.mean([r["rel1"] for r in rs]), np.mean([r["rel01"] for r in rs])
    nat, pgd = np.mean([r["nat"] for r in rs]), np.mean([r["pgd"] for r in rs])
    ok = nat <= 1.0 and pgd <= 3.0
    per_seed = ", ".join(f"{100 * r['rel1']:+.1f}%" for r in rs)
    print(f"| {slug[11:]} | {','.join(r['seed'] for r in rs)} | {per_seed} | "
          f"{100 * m1:+.1f}% | {100 * m01:+.1f}% | {nat:.2f} | {pgd:.2f} | {'yes' if ok else 'no'} |")
    if ok and (best is None or m1 < best[1] - 0.02):
        best = (slug, m1)
print("chosen:", best[0] if best else "none eligible: λ = 0.5 stays")
