"""The training loop behind `demem train`: adversarial training with DeMem, resumable checkpoints.

Under torchrun (`torch_distributed_group`) the same loop runs on every rank: DistributedSampler
shards each epoch, the model is wrapped as DeMem(DistributedDataParallel(model), optimizer), and
only rank 0 writes metrics and checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from demem_ext.middleware import collectives as distributed
from demem_ext.adversarial import Objective, make_objective
from demem_ext.training.checkpoint import load_checkpoint, save_checkpoint
from demem_ext.training.config import CHECKPOINT_NAME, METRICS_NAME, TrainConfig
from demem_ext.training.data import DatasetInfo, load_dataset
from demem_ext.training.metrics import append_row, trim_rows
from demem_ext.middleware import DeMem
from demem_ext.sampling import collate_allowing_empty
from demem_ext.training.models import build_model, has_batchnorm
from demem_ext.training.resume import extended_payload
from demem_ext.training.validate import check_model_state, check_payload, loading
from demem_ext.training.rng import rng_state, seed_everything, set_rng_state
from demem_ext.training.precision import autocast, model_to_memory_format, to_memory_format

EPOCH_TOTALS = ("loss", "correct", "count", "high_risk", "clip", "batches")  # summed over an epoch's batches


@dataclass
class TrainState:
    """The objects a run trains, rebuilt identically from a TrainConfig."""

    config: TrainConfig
    info: DatasetInfo
    train_set: Dataset
    test_set: Dataset
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler]
    objective: Objective
    demem: Optional[DeMem]
    epoch: int = 0
    train_subset: Optional[torch.Tensor] = None
    device: str = "cpu"  # this process's device (cuda:LOCAL_RANK under torchrun with --device cuda)
    train_model: Optional[nn.Module] = None  # the model as trained: DDP-wrapped under torch.distributed
    rank: int = 0
    world_size: int = 1
    loss_record: Optional[torch.Tensor] = None  # [epochs, N, 2]: adversarial and natural loss (record_losses)
    precision_reason: str = ""  # why config.precision was chosen ("auto" resolves by the device)

    def autocast(self):
        """The precision context of a training step (the attack and the training loss)."""
        return autocast(self.config.precision, self.device)


@contextlib.contextmanager
def torch_distributed_group(device: str) -> Iterator[bool]:
    """Under torchrun (WORLD_SIZE > 1 in the environment): the process group of a training run,
    NCCL with this process on cuda:LOCAL_RANK when `device` is CUDA, gloo otherwise; destroyed on
    exit. Yields whether this process is rank 0 (True, and nothing set up, outside torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield distributed.rank() == 0
        return
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield dist.get_rank() == 0
    finally:
        dist.destroy_process_group()


def _process_device(cfg: TrainConfig) -> str:
    """cfg.device, or this rank's own GPU when several processes share a machine's GPUs."""
    if distributed.is_distributed() and cfg.device.startswith("cuda"):
        return f"cuda:{torch.cuda.current_device()}"
    return cfg.device


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.schedule == "step":  # the usual AT schedule: ÷10 at 50% and 75% of training
        milestones = [max(1, cfg.epochs // 2), max(1, (3 * cfg.epochs) // 4)]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return None


class SubsetWithLocalIndex(Dataset):
    """The samples `indices` of a dataset of (x, y, index), re-indexed 0..len-1 (for shadow models)."""

    def __init__(self, base: Dataset, indices: torch.Tensor) -> None:
        self.base = base
        self.indices = indices.to(torch.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        x, y, _ = self.base[int(self.indices[i])]
        return x, y, i


def build(cfg: TrainConfig, train_subset: Optional[torch.Tensor] = None) -> TrainState:
    """Dataset, model, optimizer, scheduler, objective and DeMem for a configuration.

    train_subset: indices into the training split to train on (shadow models); None: all of it.
    Under torch.distributed (every rank calls this) the model is wrapped in DDP for training and
    cfg.batch_size is the global batch, split evenly over the ranks.
    """
    world, rank = distributed.world_size(), distributed.rank()
    if world > 1 and cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is the global batch: it must be divisible by the "
                         f"number of processes ({world})")
    if world > 1 and cfg.sampling_kind() == "poisson":
        raise ValueError("sampling 'poisson' is not supported under torchrun: use --sampling shuffle "
                         "(no ε is then reported)")
    device = _process_device(cfg)
    cfg, precision_reason = cfg.with_resolved_precision()
    seed_everything(cfg.seed)
    train_set, test_set, info = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, cfg.augment, cfg.split_seed)
    if train_subset is not None:
        if train_subset.numel() == 0 or int(train_subset.min()) < 0 or int(train_subset.max()) >= len(train_set):
            raise ValueError(f"train_subset must hold indices in [0, {len(train_set)}), non-empty")
        train_set = SubsetWithLocalIndex(train_set, train_subset)
    cfg = cfg.with_calibrated_noise(len(train_set))
    norm = cfg.norm if cfg.norm is not None else ("group" if cfg.per_sample() and cfg.model != "cnn" else None)
    model = build_model(cfg.model, info.num_classes, info.input_shape[0], norm).to(device)
    model_to_memory_format(model, cfg.memory_format)
    if cfg.per_sample() and has_batchnorm(model):
        raise ValueError(f"--norm batch cannot be used with per-sample gradients (clipping/noise); "
                         f"use --norm group for {cfg.model}")
    optimizer = _optimizer(cfg, model)
    scheduler = _scheduler(cfg, optimizer)
    kwargs: dict[str, Any] = {"eps": cfg.eps, "alpha": cfg.alpha, "steps": cfg.attack_steps,
                              "clamp": info.input_range}
    if cfg.at in ("trades", "mart"):
        kwargs["beta"] = cfg.beta
    if cfg.at == "relaxloss":
        kwargs["relax_alpha"] = cfg.relax_alpha
    objective = make_objective(cfg.at, **kwargs)
    train_model = model
    if world > 1:  # DDP inside, DeMem outside
        device_ids = [torch.device(device)] if device.startswith("cuda") else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    demem = None
    if cfg.use_demem:
        sampler = cfg.sampler(len(train_set))
        demem = DeMem(train_model, optimizer, cfg.demem_config(), num_samples=len(train_set),
                      num_classes=info.num_classes, sampling=sampler if sampler is not None else "shuffle",
                      seed=cfg.seed, nonfinite=cfg.nonfinite, chunk_size=cfg.chunk_size)
    if cfg.record_losses and world > 1:
        raise ValueError("record_losses is not supported under torchrun")
    record = torch.full((cfg.epochs, len(train_set), 2), math.nan) if cfg.record_losses else None
    return TrainState(cfg, info, train_set, test_set, model, optimizer, scheduler, objective, demem,
                      train_subset=train_subset, device=device, train_model=train_model, rank=rank,
                      world_size=world, loss_record=record, precision_reason=precision_reason)


def epoch_loader(state: TrainState, epoch: int) -> DataLoader:
    """The epoch's batches: shuffled, or Poisson (each sample with probability batch_size / N, batches may be
    empty); they depend only on (seed, epoch), so resuming replays them.

    Under torch.distributed: this rank's share (DistributedSampler) in batches of batch_size / ranks.
    """
    if state.world_size > 1:
        sampler = DistributedSampler(state.train_set, num_replicas=state.world_size, rank=state.rank,
                                     shuffle=True, seed=state.config.seed * 100_003, drop_last=False)
        sampler.set_epoch(epoch)
        return DataLoader(state.train_set, batch_size=state.config.batch_size // state.world_size,
                          sampler=sampler, drop_last=False)
    generator = torch.Generator().manual_seed(state.config.seed * 100_003 + epoch)
    sampler = state.config.sampler(len(state.train_set), generator)
    if sampler is not None:
        return DataLoader(state.train_set, batch_sampler=sampler, collate_fn=collate_allowing_empty(state.train_set))
    return DataLoader(state.train_set, batch_size=state.config.batch_size, shuffle=True,
                      generator=generator, drop_last=False)


def _train_batch(state: TrainState, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> dict[str, float]:
    model, objective, dm = state.model, state.objective.for_epoch(state.epoch), state.demem
    train_model = state.train_model if state.train_model is not None else model  # DDP: synchronised backward
    if len(y) == 0:  # an empty Poisson batch: a noise-only step when DeMem adds noise, else nothing
        if dm is not None and state.config.per_sample():
            state.optimizer.zero_grad(set_to_none=True)
            with state.autocast():
                dm.backward_per_sample(objective.per_sample_loss, x, x, y, indices=idx, labels=y)
            state.optimizer.step()
        return {"loss": 0.0, "correct": 0.0, "count": 0.0}
    with state.autocast():
        x_adv = objective.adversarial(model, x, y)  # the attack is local to each rank
    train_model.train()
    state.optimizer.zero_grad(set_to_none=True)
    if dm is not None and state.config.per_sample():
        def loss_fn(m: nn.Module, xb: torch.Tensor, xab: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return objective.per_sample_loss(m, xb, xab, yb)

        with state.autocast():
            dm.backward_per_sample(loss_fn, x, x_adv, y, indices=idx, labels=y)
        with torch.no_grad(), state.autocast():  # the logged loss and accuracy (per-sample gradients give no logits)
            losses, logits = objective.loss_and_logits(model, x, x_adv, y)
    else:
        with state.autocast():
            losses, logits, cross_entropy = objective.terms(train_model, x, x_adv, y)
        losses = losses.float()
        if dm is not None:
            dm.backward(losses, indices=idx, scores=_risk_scores(state, x, y, losses, cross_entropy), labels=y)
        else:
            losses.mean().backward()
    if state.loss_record is not None:
        _record_losses(state, x, y, idx, losses.detach())
    state.optimizer.step()
    # accuracy on the trained-on inputs, from the logits of this step's forward (before the update)
    correct = (logits.detach().argmax(1) == y).float().sum().item()
    out = {"loss": float(losses.detach().mean()), "correct": correct, "count": float(len(y))}
    if dm is not None and dm.stats is not None:
        out["high_risk"] = dm.stats.high_risk_fraction
        out["clip"] = dm.stats.clip_fraction if dm.stats.clip_fraction is not None else 0.0
    return out


def _risk_scores(state: TrainState, x: torch.Tensor, y: torch.Tensor, losses: torch.Tensor,
                 cross_entropy: torch.Tensor) -> Optional[torch.Tensor]:
    """What DeMem's rule reads (config.demem_score): None for the loss itself, else the detached score."""
    kind = state.config.demem_score
    if kind == "loss":
        return None
    if kind == "cross_entropy":
        return cross_entropy.detach().float()
    return _natural_losses(state, x, y)


def _natural_losses(state: TrainState, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CE(f(x), y) from an eval-mode forward without gradients: it draws no random numbers and changes no state."""
    model = state.model
    was_training = model.training
    model.eval()
    with torch.no_grad(), state.autocast():
        natural = nn.functional.cross_entropy(model(x), y, reduction="none")
    model.train(was_training)
    return natural.float()


def _record_losses(state: TrainState, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                   adversarial: torch.Tensor) -> None:
    """This epoch's training losses of the batch (adversarial, as trained on) and natural losses (an eval-mode
    forward without gradients before the step: it draws no random numbers and changes no state)."""
    rows = torch.stack([adversarial.float(), _natural_losses(state, x, y)], dim=1).cpu()
    state.loss_record[state.epoch, idx.cpu()] = rows


def train_epoch(state: TrainState, progress: bool = True) -> dict[str, float]:
    """One epoch; returns mean loss, adversarial training accuracy and DeMem stats."""
    from tqdm import tqdm

    device = state.device
    totals = dict.fromkeys(EPOCH_TOTALS, 0.0)
    bar = tqdm(epoch_loader(state, state.epoch), desc=f"epoch {state.epoch + 1}/{state.config.epochs}",
               disable=not progress or state.rank != 0, leave=False)
    for x, y, idx in bar:
        x, y = to_memory_format(x.to(device), state.config.memory_format), y.to(device)
        out = _train_batch(state, x, y, idx.to(device))
        if not out["count"]:
            continue  # an empty Poisson batch: nothing to average
        totals["batches"] += 1
        for key in ("loss", "high_risk", "clip"):
            totals[key] += out.get(key, 0.0)
        totals["correct"] += out["correct"]
        totals["count"] += out["count"]
        postfix = {"loss": f"{totals['loss'] / totals['batches']:.3f}",
                   "acc": f"{totals['correct'] / totals['count']:.3f}"}
        if state.demem is not None:
            postfix["high_risk"] = f"{totals['high_risk'] / totals['batches']:.2f}"
        if _clips(state):
            postfix["clip"] = f"{totals['clip'] / totals['batches']:.2f}"
        bar.set_postfix(postfix)
    if state.scheduler is not None:
        state.scheduler.step()
    if state.world_size > 1:  # metrics of all ranks' batches
        summed = distributed.all_reduce_sum(torch.tensor(list(totals.values()), dtype=torch.float64))
        totals = dict(zip(totals, summed.tolist()))
    return epoch_means(totals)


def epoch_means(totals: dict[str, float]) -> dict[str, float]:
    """An epoch's metrics from its EPOCH_TOTALS: mean loss, adversarial accuracy and DeMem fractions."""
    n = max(totals["batches"], 1.0)  # every batch of an epoch may be empty with Poisson sampling
    return {"train_loss": totals["loss"] / n, "train_adv_acc": totals["correct"] / max(totals["count"], 1.0),
            "high_risk_fraction": totals["high_risk"] / n, "clip_fraction": totals["clip"] / n}


def finish_epoch(state: TrainState, metrics: dict[str, Any], lr: float, started: float, out_dir: Path,
                 log: Callable[[str], None], write: bool = True) -> None:
    """The end of an epoch whose scheduler has stepped: count it, append its metrics line, save the
    checkpoint (in that order: a resume trims extra lines) and log it. write=False (ranks other than 0)
    only counts; under torch.distributed every rank waits until the checkpoint is complete."""
    state.epoch += 1
    metrics.update(epoch=state.epoch, seconds=time.perf_counter() - started, lr=lr, **privacy_report(state))
    if write:
        append_row(out_dir / METRICS_NAME, metrics)
        save_checkpoint(checkpoint_payload(state), out_dir / CHECKPOINT_NAME)
    if state.world_size > 1:
        dist.barrier()
    log(f"epoch {state.epoch}: " + "  ".join(f"{name} {value}" for name, value in _shown(state, metrics)))


def checkpoint_payload(state: TrainState) -> dict[str, Any]:
    """What a checkpoint holds: tensors, numbers, strings and containers only (weights_only loads)."""
    return {
        "format": "demem-ext/train-v1",
        "config": state.config.to_dict(),
        "epoch": state.epoch,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "demem": state.demem.state_dict() if state.demem is not None else None,
        "rng": rng_state(),
        "train_subset": state.train_subset,
        "loss_record": state.loss_record,
    }


def restore(payload: dict[str, Any], source: str = "checkpoint") -> TrainState:
    """Rebuild a run from a checkpoint payload, exactly where it stopped; a payload that does not fit its
    configuration is a ValueError naming `source` (the file) and the field."""
    cfg = check_payload(payload, source)
    with loading(source, "config or train_subset"):
        state = build(cfg, payload["train_subset"])
    check_model_state(payload["model"], state.model, source)
    state.model.load_state_dict(payload["model"])
    with loading(source, "optimizer"):
        state.optimizer.load_state_dict(payload["optimizer"])
    if state.scheduler is not None and payload["scheduler"] is not None:
        with loading(source, "scheduler"):
            state.scheduler.load_state_dict(payload["scheduler"])
    if state.demem is not None and payload["demem"] is not None:
        with loading(source, "demem"):
            state.demem.load_state_dict(payload["demem"])
    state.epoch = payload["epoch"]
    record = payload.get("loss_record")
    if state.loss_record is not None and record is not None:
        if not isinstance(record, torch.Tensor) or record.shape != state.loss_record.shape:
            raise ValueError(f"{source}: field loss_record: expected shape {list(state.loss_record.shape)}")
        state.loss_record = record
    with loading(source, "rng"):
        set_rng_state(payload["rng"])
    return state


def train(cfg: TrainConfig, out_dir: str | os.PathLike, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = print, train_subset: Optional[torch.Tensor] = None,
          epochs: Optional[int] = None) -> TrainState:
    """Train (or resume) a run in out_dir: a checkpoint and a metrics line after every epoch.

    resume: continue from out_dir's checkpoint with its stored configuration (a fresh run when there is none).
    train_subset: indices into the training split to train on (kept in the checkpoint).
    epochs: when resuming, train on to this many epochs (`extended_payload` says where that is allowed).
    Under torch.distributed every rank calls this with the same out_dir (shared by all ranks);
    rank 0 alone logs and writes, the others wait for each checkpoint at a barrier.
    """
    main = distributed.rank() == 0
    if not main:
        log = _quiet
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = out / CHECKPOINT_NAME, out / METRICS_NAME
    if resume and ckpt_path.exists():
        payload = load_checkpoint(ckpt_path, expected_format="demem-ext/train-v1")
        if epochs is not None:
            payload = extended_payload(payload, epochs, ckpt_path)
        if not cfg.matches(payload.get("config")):
            log("resuming with the configuration stored in the checkpoint")
        state = restore(payload, str(ckpt_path))
        log(f"resumed from {ckpt_path} after epoch {state.epoch}")
    else:
        if ckpt_path.exists():
            raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it or choose another --out")
        state = build(cfg, train_subset)
        if main:
            metrics_path.unlink(missing_ok=True)
        log(f"training in {state.config.precision}, {state.config.memory_format} ({state.precision_reason})")
    if main:
        trim_rows(metrics_path, state.epoch, log)
    context = state.demem if state.demem is not None else contextlib.nullcontext()
    with context:
        while state.epoch < state.config.epochs:
            start = time.perf_counter()
            lr = state.optimizer.param_groups[0]["lr"]  # the epoch's own (the scheduler steps at its end)
            finish_epoch(state, train_epoch(state, progress=progress), lr, start, out, log, write=main)
    return state


def _clips(state: TrainState) -> bool:
    """Whether the run clips per-sample gradients (else its clip fraction means nothing)."""
    return state.demem is not None and state.config.per_sample() and \
        state.config.demem_config().max_grad_norm is not None


def _shown(state: TrainState, metrics: dict[str, float]) -> list[tuple[str, str]]:
    """The epoch's numbers for the log line: the DeMem fractions only where they apply."""
    shown = [("loss", f"{metrics['train_loss']:.4f}"), ("adv acc", f"{metrics['train_adv_acc']:.3f}")]
    if state.demem is not None:
        shown.append(("high-risk", f"{metrics['high_risk_fraction']:.3f}"))
    if _clips(state):
        shown.append(("clip", f"{metrics['clip_fraction']:.3f}"))
    return shown


def privacy_report(state: TrainState) -> dict[str, Any]:
    """ε spent so far (None where no ε is guaranteed), δ, the sampling and the reason, for metrics and eval.json."""
    cfg = state.config
    if state.demem is None:
        return {"epsilon": None, "delta": cfg.delta, "sampling": cfg.sampling_kind(), "epsilon_reason": "no DeMem"}
    eps, reason = state.demem.privacy_spent(cfg.delta)
    return {"epsilon": eps, "delta": cfg.delta, "sampling": cfg.sampling_kind(), "epsilon_reason": reason}


def _quiet(_: str) -> None:
    pass

