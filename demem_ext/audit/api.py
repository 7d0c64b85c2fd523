"""The audit as a Python API: for a training configuration of this library, or for models trained by the
user's own code.

Three entry points, all returning the report of `demem audit` (`run_audit`: audit.json, roc.png,
memorization_hist.png in out_dir) on any number M >= 2 of models:

- `audit_config`: a TrainConfig; what `demem audit` does (resumable shadow models, `ensemble` of them
  trained at once, "auto" by default).
- `audit_logits`: precomputed logits of M models on the N population samples and the inclusion
  masks keep[M, N] that were used to train them.
- `audit_train_fn`: a `train_fn(train_indices, seed) -> model`; the audit draws the masks, trains the
  M models (resumable: each model's logits are saved in out_dir/models/model_XXX/logits.pt) and
  queries them (natural and, given eps, adversarial queries, each with the query augmentations).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from demem_ext.audit.queries import QueryTransform, query_logits
from demem_ext.audit.report import run_audit
from demem_ext.audit.shadow import inclusion_masks, load_stats, model_dir, train_shadow_models
from demem_ext.training.checkpoint import load_checkpoint, save_checkpoint
from demem_ext.training.config import TrainConfig

LOGITS_FORMAT = "demem-ext/api-logits-v1"
TrainFn = Callable[[torch.Tensor, int], nn.Module]


def _check_logits(x: Any, name: str, m: int, n: int, extra_dims: int) -> Optional[torch.Tensor]:
    if x is None:
        return None
    x = torch.as_tensor(x)
    if x.dim() != 3 + extra_dims or tuple(x.shape[:2]) != (m, n):
        want = "[M, N, A, K]" if extra_dims else "[M, N, K]"
        raise ValueError(f"{name} must have shape {want} with M = {m}, N = {n}, got {tuple(x.shape)}")
    return x


def audit_logits(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, out_dir: str | Path,
                 adv_logits: Optional[torch.Tensor] = None, aug_logits: Optional[torch.Tensor] = None,
                 adv_aug_logits: Optional[torch.Tensor] = None, canaries: Optional[torch.Tensor] = None,
                 title: Optional[str] = None) -> dict[str, Any]:
    """The audit report from logits [M, N, K] (model m on sample n), labels [N] and keep [M, N] (bool:
    model m trained on sample n). Optional: adversarial-query logits [M, N, K], augmented-query logits
    [M, N, A, K] (natural / adversarial), canaries (indices of mislabeled samples, a power check)."""
    keep = torch.as_tensor(keep)
    if keep.dtype != torch.bool or keep.dim() != 2:
        raise ValueError(f"keep must be a boolean [M, N] mask, got {keep.dtype} of shape {tuple(keep.shape)}")
    m, n = keep.shape
    if m < 2:
        raise ValueError(f"keep must hold M >= 2 models (leave-one-out LiRA), got {m}")
    labels = torch.as_tensor(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape [N] = [{n}], got {tuple(labels.shape)}")
    stats = {"keep": keep, "labels": labels, "logits": _check_logits(logits, "logits", m, n, 0),
             "adv_logits": _check_logits(adv_logits, "adv_logits", m, n, 0),
             "aug_logits": _check_logits(aug_logits, "aug_logits", m, n, 1),
             "adv_aug_logits": _check_logits(adv_aug_logits, "adv_aug_logits", m, n, 1), "canaries": canaries}
    return run_audit(stats, out_dir, title=title)


def audit_config(cfg: TrainConfig, out_dir: str | Path, num_models: int = 16, keep_seed: int = 0,
                 ensemble: int | str = "auto", progress: bool = False, log: Callable[[str], None] = print,
                 title: Optional[str] = None) -> dict[str, Any]:
    """Train (or resume) num_models shadow models of `cfg` on random halves of its training split (masks
    from keep_seed) and return the audit report: `demem audit` as a function. ensemble: K models trained
    at once in this process, or "auto" (`demem_ext.training.ensemble_size.resolve_ensemble`)."""
    if isinstance(num_models, bool) or not isinstance(num_models, int) or num_models < 2:
        raise ValueError(f"num_models must be an integer >= 2, got {num_models!r}")
    train_shadow_models(cfg, out_dir, num_models=num_models, seed=keep_seed, progress=progress, log=log,
                        ensemble=ensemble)
    return run_audit(load_stats(out_dir, num_models=num_models), out_dir, title=title)


def _train_and_query(train_fn: TrainFn, population: Dataset, keep: torch.Tensor, model_id: int, seed: int,
                     transforms: Sequence[QueryTransform], eps: Optional[float], clamp: tuple[float, float],
                     device: str) -> dict[str, torch.Tensor]:
    model = train_fn(keep[model_id].nonzero().flatten(), seed)
    if not isinstance(model, nn.Module):
        raise ValueError(f"train_fn must return an nn.Module, got {type(model).__name__}")
    aug, labels = query_logits(model, population, transforms, device, None, seed)
    out = {"format": LOGITS_FORMAT, "keep": keep[model_id], "labels": labels, "aug_logits": aug}
    if eps is not None:
        out["adv_aug_logits"] = query_logits(model, population, transforms, device, (eps, clamp), seed)[0]
    return out


def audit_train_fn(train_fn: TrainFn, population: Dataset, out_dir: str | Path, num_models: int = 16,
                   keep_seed: int = 0, seed: int = 0, transforms: Sequence[QueryTransform] = (QueryTransform(),),
                   eps: Optional[float] = None, clamp: tuple[float, float] = (0.0, 1.0), device: str = "cpu",
                   canaries: Optional[torch.Tensor] = None, progress: bool = True,
                   title: Optional[str] = None) -> dict[str, Any]:
    """Train num_models models with train_fn(train_indices, seed + model_id) on random halves of
    `population` (items (x, y) or (x, y, index)), query them, and return the audit report.

    transforms: query augmentations (the first should be the identity; e.g. `query_transforms("digits")`).
    eps, clamp: adversarial queries (L-inf PGD) with this radius and input range; None: natural only.
    A model whose logits are saved in out_dir is not trained again (same keep_seed and M).
    """
    if isinstance(num_models, bool) or not isinstance(num_models, int) or num_models < 2:
        raise ValueError(f"num_models must be an integer >= 2, got {num_models!r}")
    out = Path(out_dir)
    keep = inclusion_masks(num_models, len(population), keep_seed)
    per_model = []
    for i in tqdm(range(num_models), desc="shadow models", disable=not progress):
        path = model_dir(out, i) / "logits.pt"
        saved = load_checkpoint(path, expected_format=LOGITS_FORMAT) if path.exists() else None
        if saved is None or not torch.equal(saved["keep"], keep[i]) or ("adv_aug_logits" in saved) != (eps is not None):
            saved = _train_and_query(train_fn, population, keep, i, seed + i, transforms, eps, clamp, device)
            save_checkpoint(saved, path)
        per_model.append(saved)
    aug = torch.stack([s["aug_logits"] for s in per_model])
    adv = torch.stack([s["adv_aug_logits"] for s in per_model]) if eps is not None else None
    return audit_logits(aug[:, :, 0], per_model[0]["labels"], keep, out, adv_logits=None if adv is None else adv[:, :, 0],
                        aug_logits=aug if aug.shape[2] > 1 else None,
                        adv_aug_logits=adv if adv is not None and adv.shape[2] > 1 else None,
                        canaries=canaries, title=title)
