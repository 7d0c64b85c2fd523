"""Vectorized ensembles: K models of one configuration trained at once, each exactly as `loop.train` alone.

`train_ensemble(cfg, seeds, out_dirs, subsets)` gives model i the result of
`train(dataclasses.replace(cfg, seed=seeds[i]), out_dirs[i], train_subset=subsets[i])`, in fp32 to float
rounding (tests/application/test_ensemble.py: 1e-5 after one and five steps):

- Each model is a TrainState of `loop.build` (its own seed, subset, model, optimizer, scheduler and DeMem)
  and iterates `loop`'s own loader of its epoch (generator seed·100_003 + epoch), so its data order is the
  sequential one. Models keep their own epochs: one that runs out of batches ends its epoch (scheduler,
  metrics line, checkpoint) and starts the next while the others go on.
- Randomness: `loop.build` leaves torch's global generator where the sequential attack starts drawing;
  each model keeps that stream and draws its attack's random start (`Objective.random_start`) from it,
  swapped into the global generator for the draw. The stream is what its checkpoint stores.
- One step: the parameters of the models with a batch are stacked (`torch.stack` of the models' own
  leaves, so backward writes each model's `.grad`), the batches are padded to the largest and joined,
  and the attack and the objective (PGD-AT, TRADES, MART) run once on the joined batch through a
  `StackedForward`. Padded rows are dropped from the losses, so they reach neither τ, D, the means nor
  the gradients. DeMem weighs each model's own losses (`dm.weighted_loss`: τ of that model's batch),
  one backward runs for the sum, and each model's optimizer steps on its own parameters (SGD and Adam
  are elementwise, so the step equals the sequential one; Adam's step counter stays per model). A
  model with no batch in a step (ragged epochs, empty Poisson batches) is left out of the stack.
- Checkpoints and metrics.jsonl are `loop`'s, per model, so `demem eval`, the audit and `train(...,
  resume=True)` read them; `resume=True` here continues each model from its own checkpoint.

Not vectorized (trained one after another with `loop.train`, said in the log): the per-sample path
(clipping/noise: per-sample gradients of K models would need a nested vmap), BatchNorm models (batch
statistics over padded rows), torch.distributed runs.

Backend (measured on an Intel Xeon with AMX, one thread, a loaded 2-core VM; docs/benchmarks.md): one
PGD-10 step of 8 digits CNNs (batch 64) in an ad-hoc probe took 166-221 ms grouped, 850-943 ms vmap and
265 ms one model after another in bf16 channels_last; 530 / 843 / 486 ms in fp32 channels_last; 698 / 511 /
442 ms in fp32 contiguous; convolutions as unfold + batched matmul took 716 ms (bf16) and 2,011 ms (fp32).
oneDNN runs the grouped convolution of K small models as one larger bf16 kernel with fuller AMX tiles,
where vmap's batching rules pay extra reorders per call; in fp32 the small convolutions are compute-bound
and no layout gains much. "auto" is therefore "grouped" where the model supports it (the digits CNN)
and "vmap" elsewhere. `python benchmarks/bench_audit.py --backends vmap,grouped` compares them in training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from demem_ext.middleware import collectives as distributed
from demem_ext.training.checkpoint import load_checkpoint
from demem_ext.training.config import CHECKPOINT_NAME, METRICS_NAME, TrainConfig
# loop's loader, end of an epoch, RNG snapshot and metrics trim define what a sequential run does: reused, not copied
from demem_ext.training.metrics import trim_rows
from demem_ext.training.rng import rng_state, set_rng_state
from demem_ext.training.loop import (EPOCH_TOTALS, TrainState, build, epoch_loader, epoch_means, finish_epoch,
                                     restore, train)
from demem_ext.training.models import DEFAULT_NORM
from demem_ext.training.precision import to_memory_format
from demem_ext.training.stacked import BACKENDS, StackedForward, grouped_layers

ENSEMBLE_BACKENDS = ("auto", *BACKENDS)


@dataclass
class _Member:
    """One model of the ensemble: its TrainState, folder, RNG streams and the epoch in progress."""

    state: TrainState
    out_dir: Path
    rng: dict[str, Any]  # loop's checkpoint format; "torch" (and "cuda") advance with the attack's draws
    params: dict[str, nn.Parameter]
    batches: Optional[Iterator] = None
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(EPOCH_TOTALS, 0.0))
    started: float = 0.0

    @property
    def done(self) -> bool:
        return self.state.epoch >= self.state.config.epochs


def sequential_reason(cfg: TrainConfig) -> Optional[str]:
    """Why `cfg` is trained one model after another (None: it is vectorized)."""
    if cfg.per_sample():
        return "the per-sample path (clipping/noise) is not vectorized"
    if (cfg.norm if cfg.norm is not None else DEFAULT_NORM[cfg.model]) == "batch":
        return "BatchNorm models are not vectorized (batch statistics over padded rows)"
    if distributed.is_distributed():
        return "torch.distributed runs are not vectorized"
    if cfg.at == "relaxloss":
        return "RelaxLoss (its loss depends on each model's epoch and batch mean) is not vectorized"
    if cfg.demem_score != "loss":
        return f"DeMem's {cfg.demem_score!r} score is not vectorized"
    return None


def train_ensemble(cfg: TrainConfig, seeds: Sequence[int], out_dirs: Sequence[str | Path],
                   subsets: Optional[Sequence[Optional[Tensor]]] = None, ensemble_size: Optional[int] = None,
                   resume: bool = False, backend: str = "auto", log: Callable[[str], None] = print
                   ) -> list[TrainState]:
    """Train len(seeds) models of `cfg` (model i: seed seeds[i], folder out_dirs[i], train_subset
    subsets[i]), ensemble_size at a time (default: all at once); their final TrainStates, in order.

    backend: "auto", "vmap" or "grouped" (stacked.py). resume: continue each model from its checkpoint.
    """
    seeds, out_dirs = list(seeds), [Path(d) for d in out_dirs]
    subsets = [None] * len(seeds) if subsets is None else list(subsets)
    size = _check_arguments(seeds, out_dirs, subsets, ensemble_size, backend)
    reason = sequential_reason(cfg)
    if reason is not None:
        log(f"ensemble: {len(seeds)} models one after another ({reason})")
        return [train(dataclasses.replace(cfg, seed=s), d, resume=resume, progress=False, log=log, train_subset=sub)
                for s, d, sub in zip(seeds, out_dirs, subsets)]
    states: list[TrainState] = []
    for first in range(0, len(seeds), size):
        part = slice(first, first + size)
        states += _train_group(cfg, seeds[part], out_dirs[part], subsets[part], resume, backend, log)
    return states


def _check_arguments(seeds: list[int], out_dirs: list[Path], subsets: list[Optional[Tensor]],
                     ensemble_size: Optional[int], backend: str) -> int:
    """ValueError naming the first bad argument; the ensemble size."""
    if not seeds:
        raise ValueError("seeds must hold at least one seed (one per model)")
    if len(out_dirs) != len(seeds):
        raise ValueError(f"out_dirs has {len(out_dirs)} entries, seeds has {len(seeds)}: one folder per model")
    if len(subsets) != len(seeds):
        raise ValueError(f"subsets has {len(subsets)} entries, seeds has {len(seeds)}: one subset per model")
    if len({d.resolve() for d in out_dirs}) != len(out_dirs):
        raise ValueError("out_dirs must be distinct folders")
    size = len(seeds) if ensemble_size is None else ensemble_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"ensemble_size must be an integer >= 1, got {ensemble_size!r}")
    if size > len(seeds):
        raise ValueError(f"ensemble_size {size} is larger than the number of models ({len(seeds)})")
    if backend not in ENSEMBLE_BACKENDS:
        raise ValueError(f"backend must be one of {list(ENSEMBLE_BACKENDS)}, got {backend!r}")
    return size


def _member(cfg: TrainConfig, seed: int, out_dir: Path, subset: Optional[Tensor], resume: bool,
            log: Callable[[str], None]) -> _Member:
    """Build (or restore) one model as `loop.train` does, with its RNG streams right after."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = out_dir / CHECKPOINT_NAME, out_dir / METRICS_NAME
    model_cfg = dataclasses.replace(cfg, seed=seed)
    if resume and ckpt_path.exists():
        payload = load_checkpoint(ckpt_path, expected_format="demem-ext/train-v1")
        state = restore(payload)
        log(f"{out_dir}: resumed after epoch {state.epoch}")
    else:
        if ckpt_path.exists():
            raise FileExistsError(f"{ckpt_path} exists: pass resume=True to continue it or choose another folder")
        state = build(model_cfg, subset)
        metrics_path.unlink(missing_ok=True)
        log(f"{out_dir}: training in {state.config.precision}, {state.config.memory_format} "
            f"({state.precision_reason})")
    trim_rows(metrics_path, state.epoch)
    return _Member(state, out_dir, rng_state(), dict(state.model.named_parameters()))


def _train_group(cfg: TrainConfig, seeds: list[int], out_dirs: list[Path], subsets: list[Optional[Tensor]],
                 resume: bool, backend: str, log: Callable[[str], None]) -> list[TrainState]:
    members = [_member(cfg, s, d, sub, resume, log) for s, d, sub in zip(seeds, out_dirs, subsets)]
    configs = {json.dumps(dataclasses.replace(m.state.config, seed=0).to_dict(), sort_keys=True) for m in members}
    if len(configs) > 1:
        raise ValueError("the models' configurations differ in more than the seed (checkpoints of other runs "
                         "in out_dirs?): an ensemble trains one configuration")
    first = members[0].state
    chosen = backend if backend != "auto" else ("grouped" if grouped_layers(first.model) is not None else "vmap")
    forward = StackedForward(first.model, chosen, channels_last=first.config.memory_format == "channels_last")
    log(f"ensemble of {len(members)} models, backend {chosen}")
    with contextlib.ExitStack() as blocks:
        for m in members:
            if m.state.demem is not None:
                blocks.enter_context(m.state.demem)
        while not all(m.done for m in members):
            ready = [(m, batch) for m in members for batch in [_next_batch(m, log)]
                     if batch is not None and len(batch[1]) > 0]  # an empty Poisson batch: no step, as in loop
            if ready:
                _step(forward, ready)
    return [m.state for m in members]


def _next_batch(m: _Member, log: Callable[[str], None]) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """The member's next batch; ends its epoch (and starts the next) when the epoch runs out; None when done."""
    while not m.done:
        if m.batches is None:
            m.batches = iter(epoch_loader(m.state, m.state.epoch))
            m.totals = dict.fromkeys(EPOCH_TOTALS, 0.0)
            m.started = time.perf_counter()
        batch = next(m.batches, None)
        if batch is not None:
            return batch
        _end_epoch(m, log)
        m.batches = None
    return None


@contextlib.contextmanager
def _own_generator(m: _Member) -> Iterator[None]:
    """torch's global generator (CPU, and CUDA where used) set to the member's stream for the block."""
    torch.set_rng_state(m.rng["torch"])
    if m.rng["cuda"]:
        torch.cuda.set_rng_state_all(m.rng["cuda"])
    yield
    m.rng["torch"] = torch.get_rng_state()
    if m.rng["cuda"]:
        m.rng["cuda"] = torch.cuda.get_rng_state_all()


def _pad(t: Tensor, rows: int) -> Tensor:
    """t with zero rows appended up to `rows`."""
    if len(t) == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - len(t), *t.shape[1:]))])


def _step(forward: StackedForward, ready: list[tuple[_Member, tuple[Tensor, Tensor, Tensor]]]) -> None:
    """One training step of the models in `ready`, each on its own batch (see the module docstring)."""
    members = [m for m, _ in ready]
    state = members[0].state
    cfg, objective, device = state.config, state.objective, state.device
    xs = [to_memory_format(b[0].to(device), cfg.memory_format) for _, b in ready]
    ys = [b[1].to(device) for _, b in ready]
    idxs = [b[2].to(device) for _, b in ready]
    sizes = [len(y) for y in ys]
    width = max(sizes)
    starts = []
    for m, x in zip(members, xs):
        with _own_generator(m):
            starts.append(objective.random_start(x))
    x = to_memory_format(torch.cat([_pad(t, width) for t in xs]), cfg.memory_format)
    y = torch.cat([_pad(t, width) for t in ys])
    start = None if starts[0] is None else to_memory_format(torch.cat([_pad(t, width) for t in starts]),
                                                            cfg.memory_format)
    stacked = {name: torch.stack([m.params[name] for m in members]) for name in members[0].params}
    forward.set_params({name: p.detach() for name, p in stacked.items()})
    with state.autocast():
        x_adv = objective.adversarial(forward, x, y, start=start)
    forward.set_params(stacked)
    forward.train()
    for m in members:
        m.state.optimizer.zero_grad(set_to_none=True)
    with state.autocast():
        losses, logits = objective.loss_and_logits(forward, x, x_adv, y)
    losses = losses.float().view(len(members), width)
    own = [losses[i, :n] for i, n in enumerate(sizes)]
    own_labels = [y.view(len(members), width)[i, :n] for i, n in enumerate(sizes)]
    total = sum(m.state.demem.weighted_loss(loss, indices=idx, labels=labels) if m.state.demem is not None
                else loss.mean() for m, loss, idx, labels in zip(members, own, idxs, own_labels))
    total.backward()
    if state.loss_record is not None:
        _record_losses(forward, members, x, y, own, idxs, width)
    for m in members:
        m.state.optimizer.step()
    logits = logits.detach().view(len(members), width, -1)
    for i, (m, loss, yk) in enumerate(zip(members, own, ys)):
        _add_batch(m, loss.detach(), logits[i, :len(yk)], yk)


def _record_losses(forward: StackedForward, members: list[_Member], x: Tensor, y: Tensor, own: list[Tensor],
                   idxs: list[Tensor], width: int) -> None:
    """loop's record_losses for each model: its adversarial losses and an eval-mode natural forward."""
    forward.eval()
    with torch.no_grad(), members[0].state.autocast():
        natural = F.cross_entropy(forward(x), y, reduction="none").float().view(len(members), width)
    forward.train()
    for i, (m, adversarial, idx) in enumerate(zip(members, own, idxs)):
        rows = torch.stack([adversarial.detach(), natural[i, :len(idx)]], dim=1).cpu()
        m.state.loss_record[m.state.epoch, idx.cpu()] = rows


def _add_batch(m: _Member, losses: Tensor, logits: Tensor, y: Tensor) -> None:
    """The batch's loss, accuracy and DeMem stats into the member's epoch totals (as loop.train_epoch)."""
    t, dm = m.totals, m.state.demem
    t["batches"] += 1
    t["loss"] += float(losses.mean())
    t["correct"] += (logits.argmax(1) == y).float().sum().item()
    t["count"] += float(len(y))
    if dm is not None and dm.stats is not None:
        t["high_risk"] += dm.stats.high_risk_fraction
        t["clip"] += dm.stats.clip_fraction if dm.stats.clip_fraction is not None else 0.0


def _end_epoch(m: _Member, log: Callable[[str], None]) -> None:
    """loop.train's end of an epoch (scheduler step, then loop.finish_epoch), checkpointing the member's RNG."""
    state = m.state
    lr = state.optimizer.param_groups[0]["lr"]  # the epoch's own (the scheduler steps at its end)
    if state.scheduler is not None:
        state.scheduler.step()
    set_rng_state(m.rng)  # the checkpoint stores the member's streams
    finish_epoch(state, epoch_means(m.totals), lr, m.started, m.out_dir, lambda line: log(f"{m.out_dir}: {line}"))
