"""Audit your own models: a user-written training loop plugged into the audit's Python API.

Run: python examples/audit_api.py [out_dir]   (a few seconds on one CPU core)
"""

import sys
import tempfile

import torch
from torch import nn

from demem_ext.audit import audit_train_fn, format_report, query_transforms
from demem_ext.training.data import load_digits

population, _, _ = load_digits()           # the samples whose membership the audit tests
x_all, y_all = population.inputs, population.targets


def train_fn(train_indices: torch.Tensor, seed: int) -> nn.Module:
    """Your training code: here a small MLP, full-batch Adam on the given samples."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = x_all[train_indices], y_all[train_indices]
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


out_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
report = audit_train_fn(train_fn, population, out_dir, num_models=8, keep_seed=0,
                        transforms=query_transforms("digits"), eps=0.1, progress=False)
print(format_report(report))
print("primary attack:", report["primary"]["attack"], "TPR@1%:", report["primary"]["tpr_at_fpr_0.01"])
