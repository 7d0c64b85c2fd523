"""Tuning table: every attack's TPR@0.1%, TPR@1%, AUC on the tuning mask seeds 0-3 (PGD-AT, 16 models)."""
import json, sys
import numpy as np
runs = [json.load(open(f"docs/audit/audit_pgd_at_k{s}.json")) for s in range(4)]
print("| attack | TPR@0.1% per seed 0,1,2,3 | mean TPR@0.1% | mean TPR@1% | mean AUC |")
print("|---|---|---:|---:|---:|")
for name in runs[0]["attacks"]:
    a = [r["attacks"][name] for r in runs]
    lo = [100 * x["tpr_at_fpr_0.001"] for x in a]
    print(f"| {name} | {', '.join(f'{v:.2f}' for v in lo)} | {np.mean(lo):.2f}% | "
          f"{np.mean([100 * x['tpr_at_fpr_0.01'] for x in a]):.2f}% | {np.mean([x['auc'] for x in a]):.3f} |")
print("primary:", runs[0]["primary"]["attack"])
