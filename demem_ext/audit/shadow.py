"""Shadow models for membership inference: seeded inclusion masks, resumable and shardable training,
and per-sample statistics of every model on the whole population (natural and adversarial queries).

Layout of an audit folder:
    keep.pt                       inclusion masks keep[M, N] (bool) and the audit settings
    models/model_007/checkpoint.pt, metrics.jsonl   the training run of model 7
    models/model_007/stats.pt     its statistics on all N population samples (written last)

Statistics per model: logits, loss and correctness on natural queries and under PGD (adv_*), and the
logits of every query augmentation (`demem_ext.audit.queries`) as aug_logits / adv_aug_logits [N, A, K].
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from demem_ext.audit.lock import LOCK_NAME, model_lock
from demem_ext.eta import progress_text
from demem_ext.audit.queries import query_logits, query_transforms
from demem_ext.adversarial.robustness import natural_accuracy, pgd_accuracy
from demem_ext.training.checkpoint import load_checkpoint, save_checkpoint
from demem_ext.training.data import load_dataset
from demem_ext.training import TrainConfig, train
from demem_ext.training.ensemble import train_ensemble
from demem_ext.training.ensemble_size import peak_memory_mib, resolve_ensemble
from demem_ext.training.loop import TrainState

KEEP_FORMAT = "demem-ext/keep-v1"
STATS_FORMAT = "demem-ext/shadow-stats-v1"


def inclusion_masks(num_models: int, num_samples: int, seed: int) -> torch.Tensor:
    """keep[M, N]: each sample is in each model's training set independently with probability 1/2.

    Independent (not exactly balanced) masks matter for leave-one-out evaluation: with exactly M/2
    members per sample, the number of IN shadow models would reveal the target's membership.
    """
    if num_models < 2:
        raise ValueError(f"num_models must be >= 2, got {num_models}")
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(num_models, num_samples, generator=generator) < 0.5


def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"shard i/n needs 0 <= i < n, got {text!r}")
    return index, count


def model_dir(out_dir: Path, model_id: int) -> Path:
    return out_dir / "models" / f"model_{model_id:03d}"


def missing_models(out_dir: str | Path, num_models: int) -> list[int]:
    """Ids of the models in out_dir whose stats.pt is not written yet (unfinished or not started)."""
    return [i for i in range(num_models) if not (model_dir(Path(out_dir), i) / "stats.pt").exists()]


def prepare_masks(cfg: TrainConfig, out_dir: str | Path, num_models: int, seed: int) -> torch.Tensor:
    """The folder's inclusion masks keep[M, N]: created (keep.pt) or checked against these settings."""
    population, _, _ = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, augment=False, seed=cfg.split_seed)
    return _load_or_create_keep(Path(out_dir), cfg, num_models, len(population), seed)


def _load_or_create_keep(out_dir: Path, cfg: TrainConfig, num_models: int, num_samples: int,
                         seed: int) -> torch.Tensor:
    path = out_dir / "keep.pt"
    settings = {"num_models": num_models, "num_samples": num_samples, "seed": seed, "config": cfg.to_dict()}
    if path.exists():
        saved = load_checkpoint(path, expected_format=KEEP_FORMAT)
        stored = saved.get("settings") or {}
        same_run = {k: stored.get(k) for k in ("num_models", "num_samples", "seed")} == {
            k: settings[k] for k in ("num_models", "num_samples", "seed")}
        if not (same_run and cfg.matches(stored.get("config"))):
            raise ValueError(f"{path} was made with other settings ({saved.get('settings')}); "
                             f"use another --out or the same configuration")
        _check_tensor(saved.get("keep"), torch.bool, (num_models, num_samples), path, "keep")
        return saved["keep"]
    keep = inclusion_masks(num_models, num_samples, seed)
    save_checkpoint({"format": KEEP_FORMAT, "keep": keep, "settings": settings}, path)
    return keep


def population_stats(model: nn.Module, population: Dataset, cfg: TrainConfig,
                     clamp: tuple[float, float]) -> dict[str, torch.Tensor]:
    """Logits, losses and correctness of `model` on every population sample, natural and under PGD,
    and the logits of every query augmentation (aug_logits, adv_aug_logits [N, A, K])."""
    stats: dict[str, torch.Tensor] = {}
    transforms = query_transforms(cfg.dataset)
    for prefix, adversarial in (("", False), ("adv_", True)):
        aug, labels = query_logits(model, population, transforms, cfg.device,
                                   (cfg.eps, clamp) if adversarial else None, cfg.seed)
        logits = aug[:, 0]  # the identity query
        stats[prefix + "logits"] = logits
        stats[prefix + "aug_logits"] = aug
        stats[prefix + "loss"] = nn.functional.cross_entropy(logits, labels, reduction="none")
        stats[prefix + "correct"] = logits.argmax(1) == labels
        stats["labels"] = labels
    return stats


def train_shadow_models(cfg: TrainConfig, out_dir: str | Path, num_models: int = 16, seed: int = 0,
                        shard: tuple[int, int] = (0, 1), progress: bool = False,
                        log: Callable[[str], None] = print, ensemble: int | str = "auto") -> list[int]:
    """Train this shard's shadow models (model i has training seed cfg.seed + i) and save their stats.

    Finished models (stats.pt present) are skipped; an unfinished one resumes from its checkpoint. A model
    another process is training (its lock is held, `demem_ext.audit.lock`) is skipped and logged.
    ensemble K > 1: the shard's models are trained K at a time in one process
    (`demem_ext.training.ensemble.train_ensemble`, each model as it would be alone); "auto": the fastest
    measured K that fits the memory budget (`demem_ext.training.ensemble_size.resolve_ensemble`).
    Returns the ids of the models this call trained.
    """
    ensemble, why = resolve_ensemble(ensemble, num_models, cfg)
    if why != "requested":
        log(f"ensemble of {ensemble} ({why})")
    out = Path(out_dir)
    population, test_set, info = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, augment=False,
                                              seed=cfg.split_seed)
    keep = _load_or_create_keep(out, cfg, num_models, len(population), seed)
    index, count = shard
    todo = [i for i in range(index, num_models, count) if not (model_dir(out, i) / "stats.pt").exists()]
    trained: list[int] = []
    start = time.perf_counter()
    for first in range(0, len(todo), ensemble):
        with contextlib.ExitStack() as locks:
            group = []
            for model_id in todo[first:first + ensemble]:
                folder = model_dir(out, model_id)
                if not locks.enter_context(model_lock(folder)):
                    log(f"shadow model {model_id + 1}/{num_models}: skipped, another process is training it "
                        f"(it holds {folder / LOCK_NAME})")
                elif not (folder / "stats.pt").exists():  # not finished by another process meanwhile
                    group.append(model_id)
            states = _train_group(cfg, out, group, num_models, keep, population, progress, log)
            for model_id, state in zip(group, states):
                _save_stats(state, model_dir(out, model_id), model_id, keep, population, test_set, info.input_range)
                trained.append(model_id)
                log(f"shadow model {model_id + 1}/{num_models} done; this run's models: "
                    f"{progress_text(time.perf_counter() - start, len(trained), len(todo))}; "
                    f"peak memory {peak_memory_mib(cfg.device):.0f} MiB")
    return trained


def _train_group(cfg: TrainConfig, out: Path, group: list[int], num_models: int, keep: torch.Tensor,
                 population: Dataset, progress: bool, log: Callable[[str], None]) -> list[TrainState]:
    """Train (or resume) the shadow models `group`: one at a time, or as one ensemble when there are several."""
    if not group:
        return []
    base = dataclasses.replace(cfg, record_losses=True)  # proxy screening
    subsets = [keep[i].nonzero().flatten() for i in group]
    resolved, reason = base.with_resolved_precision()
    for model_id, subset in zip(group, subsets):
        log(f"shadow model {model_id + 1}/{num_models}: training on {len(subset)} of {len(population)} samples "
            f"in {resolved.precision}, {resolved.memory_format} ({reason})"
            + (f", in an ensemble of {len(group)}" if len(group) > 1 else ""))
    if len(group) == 1:
        return [train(dataclasses.replace(base, seed=cfg.seed + group[0]), model_dir(out, group[0]), resume=True,
                      progress=progress, log=lambda _: None, train_subset=subsets[0])]
    return train_ensemble(base, [cfg.seed + i for i in group], [model_dir(out, i) for i in group], subsets,
                          resume=True, log=lambda _: None)


def _save_stats(state: TrainState, folder: Path, model_id: int, keep: torch.Tensor, population: Dataset,
                test_set: Dataset, clamp: tuple[float, float]) -> None:
    """Score a trained shadow model (fp32) and write its stats.pt."""
    model_cfg = state.config
    stats = population_stats(state.model, population, model_cfg, clamp)
    test_acc = natural_accuracy(state.model, test_set, device=model_cfg.device)
    torch.manual_seed(model_cfg.seed)
    test_pgd = pgd_accuracy(state.model, test_set, model_cfg.eps, 20, clamp=clamp, device=model_cfg.device)
    payload: dict[str, Any] = {"format": STATS_FORMAT, "model_id": model_id, "keep": keep[model_id],
                               "test_natural_acc": test_acc, "test_pgd20_acc": test_pgd,
                               "demem": state.demem.state_dict() if state.demem is not None else None,
                               "num_train": int(keep[model_id].sum()), "loss_record": state.loss_record,
                               "precision": model_cfg.precision, "memory_format": model_cfg.memory_format,
                               "precision_reason": state.precision_reason,
                               "peak_memory_mib": peak_memory_mib(model_cfg.device), **stats}
    save_checkpoint(payload, folder / "stats.pt")


def load_stats(out_dir: str | Path, num_models: Optional[int] = None) -> dict[str, Any]:
    """Merge every model's stats.pt into [M, N, ...] tensors; a missing model is a clear error."""
    out = Path(out_dir)
    saved = load_checkpoint(out / "keep.pt", expected_format=KEEP_FORMAT)
    settings = saved.get("settings") if isinstance(saved.get("settings"), dict) else {}
    keep = saved.get("keep")
    _check_tensor(keep, torch.bool, (settings.get("num_models"), settings.get("num_samples")), out / "keep.pt",
                  "keep")
    m = keep.shape[0] if num_models is None else num_models
    if m != keep.shape[0]:
        raise ValueError(f"{out / 'keep.pt'} holds {keep.shape[0]} models, not {m}")
    missing = missing_models(out, m)
    if missing:
        raise FileNotFoundError(f"models {missing} have no stats in {out / 'models'}: train them "
                                f"(demem audit with the same --out, or its --shard runs) before merging")
    per_model = [load_checkpoint(model_dir(out, i) / "stats.pt", expected_format=STATS_FORMAT)
                 for i in range(m)]
    for i, stats in enumerate(per_model):
        path = model_dir(out, i) / "stats.pt"
        for key in ("keep", "correct", "adv_correct"):
            _check_tensor(stats.get(key), torch.bool, (keep.shape[1],), path, key)
        if not torch.equal(stats["keep"], keep[i]):
            raise ValueError(f"model {i}'s stats were made with another inclusion mask than {out / 'keep.pt'}")
    merged: dict[str, Any] = {"keep": keep, "settings": saved["settings"], "labels": per_model[0]["labels"]}
    for key in ("logits", "loss", "correct", "adv_logits", "adv_loss", "adv_correct"):
        merged[key] = torch.stack([s[key] for s in per_model])
    for key in ("aug_logits", "adv_aug_logits"):  # absent from stats written before query augmentations
        if all(key in s for s in per_model):
            merged[key] = torch.stack([s[key] for s in per_model])
    for key in ("test_natural_acc", "test_pgd20_acc", "num_train"):
        merged[key] = torch.tensor([float(s[key]) for s in per_model])
    merged["demem"] = [s["demem"] for s in per_model]
    merged["training_precision"] = sorted({(s.get("precision", "fp32"), s.get("memory_format", "contiguous"),
                                            s.get("precision_reason", "written before the precision option"))
                                           for s in per_model})
    peaks = [s["peak_memory_mib"] for s in per_model if "peak_memory_mib" in s]  # absent before it was recorded
    if peaks:
        merged["peak_memory_mib"] = max(peaks)
    if all(s.get("loss_record") is not None for s in per_model):  # [M, E, N, 2], NaN where a sample is OUT
        merged["loss_record"] = _population_record(per_model, keep)
    return merged


def _check_tensor(value: Any, dtype: torch.dtype, shape: tuple[int, ...], path: Path, field: str) -> None:
    """A stored tensor of the expected dtype and shape, else a ValueError naming the file and the field."""
    if not (isinstance(value, torch.Tensor) and value.dtype == dtype and tuple(value.shape) == shape):
        got = f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{path}: field {field}: expected {dtype} {list(shape)}, got {got}")


def _population_record(per_model: list[dict[str, Any]], keep: torch.Tensor) -> torch.Tensor:
    """Each model's training-loss record [E, n_m, 2] placed at its members' population indices."""
    epochs = per_model[0]["loss_record"].shape[0]
    record = torch.full((keep.shape[0], epochs, keep.shape[1], 2), float("nan"))
    for m, stats in enumerate(per_model):
        record[m][:, keep[m].nonzero().flatten()] = stats["loss_record"].float()
    return record
