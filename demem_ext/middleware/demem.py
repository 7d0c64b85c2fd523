"""The DeMem context manager: the DeMem rule (DESIGN.md section 2) inside an existing training loop.

Two paths lead to the wrapped `optimizer.step()`:

- `dm.backward(per_sample_losses)`: the weighting path. An ordinary `loss.backward()` of
  L = (1/D)·Σ w_i·ℓ_i; no per-sample gradients, no clipping, no noise.
- `dm.backward_per_sample(loss_fn, *batch)`: the clipping/noise path. Per-sample gradients from
  torch.func (`demem_ext.grad_sample.torch_func`), in chunks of bounded memory, reduced by the fused op to
  Σ w_i·c_i·g_i and accumulated until the step, which adds the noise once, divides by D and writes
  the result into the parameters' `.grad` before calling the optimizer's own step.

Under torch.distributed (world size > 1) both paths give the update of one process holding the
global batch; the collectives are in `demem_ext.middleware.process_group` (see the DeMem docstring).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import nn

from demem_ext import accounting
from demem_ext.config import DeMemConfig
from demem_ext.grad_sample import FlatBuffer, LossModule, check_loss_shape, flat_dtype, per_sample_grads, trainable_parameters
from demem_ext.grad_sample.opacus_hooks import OpacusEngine
from demem_ext.middleware import process_group as distributed
from demem_ext.ops import functional, rule as reference
from demem_ext.ops.autograd import demem_loss

# Default chunks of the torch.func engine: a quarter of the batch (at least CHUNK_MIN_ROWS rows), so that
# the per-sample gradients held at once stay well below one [B, P] matrix, and at most
# CHUNK_BUDGET_BYTES of them (chunk·P·itemsize <= this) for large models.
CHUNK_BUDGET_BYTES = 256 * 2**20
CHUNK_MIN_ROWS = 8
CHUNKS_PER_BATCH = 4
NONFINITE_MODES = ("error", "skip")
ENGINES = ("torch.func", "opacus")
STATE_KEYS = ("trace", "visited", "seed", "offset", "steps", "noisy_batch_sizes")
_WRAPPED: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()  # optimizers inside a DeMem block


@dataclass(frozen=True)
class DeMemStats:
    """What DeMem did since the last optimizer step (after a step: in that step).

    weights, risk: w_i and r_i of the samples used; norms: per-sample gradient norms ‖g_i‖₂ and
    clip_fraction: fraction of samples with c_i < 1 (both None on the weighting path);
    num_samples: samples used; num_skipped: samples dropped as non-finite (nonfinite="skip");
    steps: optimizer steps taken through DeMem so far.
    """

    weights: torch.Tensor
    risk: torch.Tensor
    high_risk_fraction: float
    norms: Optional[torch.Tensor]
    clip_fraction: Optional[float]
    num_samples: int
    num_skipped: int
    steps: int


class _BatchSum(NamedTuple):
    """One backward_per_sample call: Σ w_i·c_i·g_i over the kept samples (None if none is kept)."""

    total: Optional[torch.Tensor]  # [P]
    parts: list[functional.FusedResult]  # one per chunk with kept samples
    keep: torch.Tensor  # bool [B]
    losses: torch.Tensor  # [B], detached


GradsOf = Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def default_chunk_rows(batch_size: int, row_bytes: int) -> int:
    """Rows per chunk when chunk_size is None: ⌈B/4⌉, at least CHUNK_MIN_ROWS, at most the budget."""
    by_budget = max(1, CHUNK_BUDGET_BYTES // max(1, row_bytes))
    return min(by_budget, max(CHUNK_MIN_ROWS, -(-batch_size // CHUNKS_PER_BATCH)))


def _random_seed() -> int:
    """A 63-bit seed from torch's global generator (reproducible under torch.manual_seed)."""
    return int(torch.randint(0, 2**63 - 1, ()).item())


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


class DeMem:
    """Context manager applying the DeMem rule to `model` trained by `optimizer`.

    config: a DeMemConfig (default DeMemConfig()); **overrides: DeMemConfig fields to change.
    num_samples: dataset size (needed by proxy="trace" and by `privacy_spent`).
    seed: noise seed (None: drawn from torch's global generator); secure_noise: a fresh seed from
    os.urandom for every noisy step. nonfinite: "error" (raise) or "skip" (drop non-finite samples
    and count them in `stats`). chunk_size: per-sample gradient rows computed at once (None: a
    quarter of the batch, at least 8 rows, at most 256 MiB of gradients). engine: where per-sample
    gradients come from — "torch.func" (vmap over `loss_fn`, in chunks) or "opacus" (Opacus's
    GradSampleModule hooks on the model, while the block is active; then `dm.backward(per_sample_losses)`
    also works with clipping and noise, the losses coming from a train-mode forward of the model;
    Opacus must be installed).

    Under torch.distributed (initialised, world size > 1) the order is
    `DeMem(DistributedDataParallel(model), optimizer)`: DDP inside, DeMem outside, on every rank,
    with the same configuration (checked when entering the block: a mismatch, or a model not wrapped
    in DDP, is a ValueError on every rank). Each rank passes its own samples; the update equals that
    of one process holding all ranks' samples:

    - the threshold τ and D come from the global batch (every rank's scores are gathered; ranks may
      hold different numbers of samples; D = expected_batch_size or the total over ranks);
    - `backward`: the loss is scaled by the world size, so that DDP's gradient average
      is (1/D)·Σ_all w_i·ℓ_i (the losses must come from the DDP model's forward);
    - `backward_per_sample`: per-sample gradients of the module inside DDP (`loss_fn` gets that
      module); at the step the sums and counts are all-reduced, every rank adds the same noise (rank
      0's seed; with secure_noise rank 0 draws it and broadcasts it), divides by D and writes the
      same `.grad` (DDP's own all-reduce never runs on this path);
    - proxy="trace": `indices` are global dataset indices (DistributedSampler); every rank's trace
      gets every rank's losses, so all traces equal the single-process one;
    - `privacy_spent` counts the global noisy batch sizes; `stats` describe this rank's samples.

    A non-finite sample with nonfinite="error" stops every rank with a NonFiniteError, at the backward
    call, or at the step for non-finite gradients found after the batch was split into chunks.
    Without torch.distributed, or with one rank, none of this runs.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: Optional[DeMemConfig] = None,
        num_samples: Optional[int] = None,
        *,
        seed: Optional[int] = None,
        secure_noise: bool = False,
        nonfinite: str = "error",
        chunk_size: Optional[int] = None,
        engine: str = "torch.func",
        **overrides: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if config is None:
            config = DeMemConfig()
        elif not isinstance(config, DeMemConfig):
            raise TypeError(f"config must be a DeMemConfig or None, got {type(config).__name__}")
        if overrides:
            config = config.replace(**overrides)
        if num_samples is not None:
            _positive_int("num_samples", num_samples)
        if config.proxy == "trace" and num_samples is None:
            raise ValueError("proxy='trace' needs num_samples (the dataset size) to hold the loss trace")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be 'error' or 'skip', got {nonfinite!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}")
        if chunk_size is not None:
            _positive_int("chunk_size", chunk_size)
        if not isinstance(secure_noise, bool):
            raise ValueError(f"secure_noise must be a bool, got {secure_noise!r}")
        if seed is not None:
            if secure_noise:
                raise ValueError("seed cannot be combined with secure_noise=True (the seed comes from the OS)")
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
                raise ValueError(f"seed must be an int in [0, 2**64) or None, got {seed!r}")

        self.model = model
        self._module = distributed.unwrap(model)  # per-sample gradients never go through DDP's forward
        self.optimizer = optimizer
        self.config = config
        self.num_samples = num_samples
        self.secure_noise = secure_noise
        self.nonfinite = nonfinite
        self.chunk_size = chunk_size
        self.engine = engine
        self._opacus: Optional[OpacusEngine] = None  # the hooks, while the block is active
        # Per-sample path: the fused op sums w_i·c_i·g_i; noise and the division by D wait for the step.
        self._sum_config = config.replace(noise_multiplier=0.0, expected_batch_size=1)

        trace_size = num_samples if config.proxy == "trace" else 0
        self._trace = torch.zeros(trace_size, dtype=torch.float64)
        self._visited = torch.zeros(trace_size, dtype=torch.bool)
        self._seed = 0 if secure_noise else (seed if seed is not None else _random_seed())
        self._offset = 0
        self._steps = 0
        self._noisy_batch_sizes: list[int] = []
        self._world = 1  # ranks taking part (set when entering the block)

        self._active = False
        self._had_step_attr = False
        self._saved_step: Any = None
        self._real_step: Optional[Callable[..., Any]] = None
        self._stats: Optional[DeMemStats] = None
        self._stats_open = False  # stats merge the backward calls since the last step
        self._flat = FlatBuffer()  # flattened per-sample gradients, reused (released on exit)
        self._reset_pending()

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "DeMem":
        if self._active:
            raise RuntimeError("this DeMem is already active: DeMem blocks cannot be nested or re-entered")
        opt = self.optimizer
        if opt in _WRAPPED:
            raise RuntimeError("optimizer is already wrapped by another active DeMem")
        self._world = self._join_group() if distributed.is_distributed() else 1
        if self.engine == "opacus":
            if self._world > 1:
                raise ValueError("engine='opacus' is not supported under torch.distributed: use engine='torch.func'")
            self._opacus = OpacusEngine(self._module)
        self._had_step_attr = "step" in vars(opt)
        self._saved_step = vars(opt).get("step")
        self._real_step = opt.step
        demem = self

        @functools.wraps(self._real_step)  # keeps markers such as an LR scheduler's
        def step(optimizer: torch.optim.Optimizer, closure: Optional[Callable[[], Any]] = None) -> Any:
            return demem._step(closure)

        opt.step = types.MethodType(step, opt)  # a bound method, as LR schedulers expect
        _WRAPPED.add(opt)
        self._active = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        opt = self.optimizer
        if self._had_step_attr:
            opt.step = self._saved_step
        else:
            vars(opt).pop("step", None)
        _WRAPPED.discard(opt)
        if self._opacus is not None:
            self._opacus.close()
            self._opacus = None
        self._flat.release()
        self._active = False
        self._real_step = self._saved_step = None
        if self._grad_sum is not None and exc_type is None:
            warnings.warn("DeMem block exited with per-sample gradients that no optimizer.step() "
                          "applied; they were discarded", RuntimeWarning, stacklevel=2)
        self._reset_pending()

    def _join_group(self) -> int:
        """Under torch.distributed: the same configuration and a DDP model on every rank, rank 0's seed."""
        ddp = distributed.is_ddp(self.model)
        distributed.check_same_config({
            **dataclasses.asdict(self.config), "nonfinite": self.nonfinite, "secure_noise": self.secure_noise,
            "num_samples": self.num_samples, "model wrapped in DistributedDataParallel": ddp})
        if not ddp:
            raise ValueError(
                f"under torch.distributed (world size {distributed.world_size()}) DeMem needs the "
                f"DistributedDataParallel-wrapped model, got {type(self.model).__name__}: wrap as "
                f"{distributed.WRAPPER_ORDER}")
        if not self.secure_noise:
            self._seed = distributed.broadcast_seed(self._seed)
        return distributed.world_size()

    # ------------------------------------------------------------------ public API
    @property
    def stats(self) -> Optional[DeMemStats]:
        """Statistics of the backward calls since the last step (or of the last step); None before any."""
        return self._stats

    def backward(self, per_sample_losses: torch.Tensor, indices: Optional[torch.Tensor] = None) -> None:
        """Backward of (1/D)·Σ_i w_i·ℓ_i for per-sample losses [B] (D = expected_batch_size or B).

        An ordinary `loss.backward()`: gradients accumulate into `.grad` as usual. Without clipping
        and noise only, except with engine="opacus", where a config that clips or adds noise takes
        the per-sample path (as `backward_per_sample`) with Opacus's per-sample gradients of these
        losses. `indices` ([B] dataset indices) are required with proxy="trace".
        """
        self._check_active("backward")
        cfg = self.config
        per_sample = cfg.max_grad_norm is not None or cfg.noise_multiplier > 0
        if per_sample and self._opacus is None:
            raise ValueError("this config clips (max_grad_norm) or adds noise (noise_multiplier), which "
                             "needs per-sample gradients: use dm.backward_per_sample(loss_fn, *batch), "
                             "or DeMem(..., engine='opacus')")
        self._check_path("per_sample" if per_sample else "weighting")
        losses = per_sample_losses
        if not isinstance(losses, torch.Tensor):
            raise TypeError(f"per_sample_losses must be a torch.Tensor, got {type(losses).__name__}")
        if losses.dim() != 1 or losses.numel() == 0:
            raise ValueError(f"per_sample_losses must be a non-empty 1-D tensor [B], got shape {tuple(losses.shape)}")
        if not losses.is_floating_point():
            raise ValueError(f"per_sample_losses must be a floating tensor, got {losses.dtype}")
        if not losses.requires_grad:
            raise ValueError("per_sample_losses does not require grad: compute it from the model "
                             "outside torch.no_grad() and without .detach()")
        idx = self._check_indices(indices, losses.shape[0])
        if per_sample:
            self._backward_opacus(losses, idx)
            return
        if self._world > 1:
            self._backward_global(losses, idx)
            return
        keep = self._keep(torch.isfinite(losses.detach()), "per_sample_losses has non-finite values")
        if not bool(keep.all()):
            losses = losses[keep]
            idx = None if idx is None else idx[keep.cpu()]
        if losses.numel() > 0:
            scores = self._scores(losses.detach(), idx)
            weights, risk = functional.demem_weights(scores, cfg)
            if self._opacus is None:
                demem_loss(losses, cfg, scores=scores).backward()
            else:
                with self._opacus.quiet():
                    demem_loss(losses, cfg, scores=scores).backward()
                for p in self._module.parameters():  # the hooks ran; the weighting path does not use them
                    p.grad_sample = None
            self._commit_trace(losses.detach(), idx)
        else:
            weights = risk = losses.new_zeros(0).detach()
        self._path = "weighting"
        self._record(weights, risk, None, int((~keep).sum()))

    def _backward_global(self, losses: torch.Tensor, idx: Optional[torch.Tensor]) -> None:
        """`backward` under torch.distributed: τ and D from the global batch, and the loss scaled by
        the world size, so that DDP's average of the ranks' gradients is (1/D)·Σ_all w_i·ℓ_i."""
        cfg = self.config
        detached = losses.detach()
        keep = torch.isfinite(detached)
        idx = None if idx is None else idx[keep.cpu()]
        scores = self._scores(detached[keep], idx)
        rule, total = self._global_rule(cfg, scores, keep, "per_sample_losses has non-finite values")
        kept = losses[keep]
        weights = risk = detached.new_zeros(0)
        if kept.numel() > 0:
            weights, risk = functional.demem_weights(scores, rule)
            rule = rule.replace(expected_batch_size=cfg.expected_batch_size or total)
            (demem_loss(kept, rule, scores=scores) * self._world).backward()
        elif total > 0:  # others have samples: take part in DDP's all-reduce with zero gradients
            sum((p * 0).sum() for _, p in self._trainable_parameters()).backward()
        self._commit_trace(detached[keep], idx)
        self._path = "weighting"
        self._record(weights, risk, None, int((~keep).sum()))

    def _global_rule(self, config: DeMemConfig, scores: torch.Tensor, keep: torch.Tensor,
                     problem: str) -> tuple[DeMemConfig, int]:
        """`config` with threshold "fixed" at τ of all ranks' kept scores, and their number.

        Every rank gathers every rank's scores (NaN where `keep` is False), so that with
        nonfinite="error" a bad sample on one rank stops all of them here, together.
        """
        full = torch.full(keep.shape, math.nan, dtype=torch.float64, device=scores.device)
        full[keep] = scores.to(torch.float64)
        parts = distributed.all_gather_padded(full)
        if self.nonfinite == "error":
            me = distributed.rank()
            for r in [me] + [r for r in range(len(parts)) if r != me]:
                bad = torch.nonzero(~torch.isfinite(parts[r])).flatten()[:8].tolist()
                if bad and r == me:
                    raise functional.NonFiniteError(f"{problem} for samples at batch positions {bad} "
                                                    "(nonfinite='skip' drops such samples)")
                if bad:
                    raise functional.NonFiniteError(
                        f"rank {r} has non-finite losses or per-sample gradients at batch positions {bad}, "
                        "so every rank stops (nonfinite='skip' drops such samples)")
        scores_all = torch.cat([p[torch.isfinite(p)] for p in parts])
        if scores_all.numel() == 0:
            return config, 0
        tau = reference.threshold(scores_all, config.threshold, config.k, config.quantile, config.tau)
        return config.replace(threshold="fixed", tau=tau), scores_all.numel()

    def backward_per_sample(self, loss_fn: Callable[..., torch.Tensor], *batch: torch.Tensor,
                            indices: Optional[torch.Tensor] = None) -> None:
        """Accumulate Σ_i w_i·c_i·g_i over the batch for the next optimizer step (clipping/noise path).

        loss_fn(model, *batch) -> per-sample losses [B]; each batch tensor has B rows.
        `.grad` is left alone until the step, which adds noise, divides by D and replaces `.grad`.
        With nonfinite="skip", samples with non-finite losses are dropped before the threshold; so
        are samples with non-finite gradients when the batch fits in one chunk of one process (with
        several chunks or under torch.distributed the batch threshold is fixed first, and such samples
        are only dropped from the sum).
        """
        self._check_active("backward_per_sample")
        self._check_path("per_sample")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, *batch), got {type(loss_fn).__name__}")
        named = self._trainable_parameters()
        params = [p for _, p in named]
        batch_size = self._check_batch(batch, params[0].device)
        idx = self._check_indices(indices, batch_size)
        self._refuse_batchnorm()

        loss_module = LossModule(self._module, loss_fn)
        detached = {f"model.{name}": p.detach() for name, p in named}
        dtype = flat_dtype(params)

        def grads_of(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            if self._opacus is None:
                return per_sample_grads(loss_module, detached, rows, dtype, self._flat)
            with torch.enable_grad():
                losses = loss_module(*rows)
            check_loss_shape(losses, rows[0].shape[0])
            return self._opacus.per_sample_grads(losses, params, dtype, self._flat), losses.detach()

        numel = sum(p.numel() for p in params)
        rows = self.chunk_size or default_chunk_rows(batch_size, numel * dtype.itemsize)
        if batch_size <= rows:
            self._accumulate(self._one_chunk(grads_of, batch, idx), params, idx, batch_size)
        else:
            self._accumulate(self._chunks(loss_module, grads_of, batch, idx, rows), params, idx, batch_size)

    def _backward_opacus(self, losses: torch.Tensor, idx: Optional[torch.Tensor]) -> None:
        """`backward` of a clipping/noise config with engine="opacus": the per-sample path on the
        per-sample gradients Opacus's hooks compute for these losses (the batch in one chunk)."""
        params = [p for _, p in self._trainable_parameters()]
        grads = self._opacus.per_sample_grads(losses, params, flat_dtype(params), self._flat)
        self._accumulate(self._one_chunk(lambda _: (grads, losses.detach()), (), idx), params, idx,
                         losses.shape[0])

    def _accumulate(self, batch_sum: _BatchSum, params: list[nn.Parameter], idx: Optional[torch.Tensor],
                    batch_size: int) -> None:
        """Add one backward call's Σ w_i·c_i·g_i to the pending sum; trace and stats."""
        total, parts, keep, losses = batch_sum
        if total is not None:
            self._grad_sum = total if self._grad_sum is None else self._grad_sum.add_(total)
            self._count += int(keep.sum())
        if total is not None or self._world > 1:  # under torch.distributed every rank takes part
            self._params = params
            self._commit_trace(losses[keep], None if idx is None else idx[keep.cpu()])
        self._path = "per_sample"
        empty = losses.new_zeros(0)
        self._record(torch.cat([r.weights for r in parts]) if parts else empty,
                     torch.cat([r.risk for r in parts]) if parts else empty,
                     torch.cat([r.norms for r in parts]) if parts else empty,
                     batch_size - int(keep.sum()))

    def privacy_spent(self, delta: float, accountant: str = "rdp") -> tuple[Optional[float], str]:
        """(ε, how it was computed) when the updates are a valid Gaussian mechanism, else (None, why)."""
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        valid, reason = accounting.dp_guarantee(self.config)
        if not valid:
            return None, f"ε is not guaranteed: {reason}"
        if self.num_samples is None:
            return None, "ε needs the sampling rate: pass num_samples (the dataset size) to DeMem"
        steps = len(self._noisy_batch_sizes)
        if steps == 0:
            return 0.0, "no noisy steps taken yet"
        batch = self.config.expected_batch_size or sum(self._noisy_batch_sizes) / steps
        rate = batch / self.num_samples
        if rate > 1:
            return None, f"sampling rate q = {batch}/{self.num_samples} > 1"
        eps = accounting.epsilon(rate, self.config.noise_multiplier, steps, delta, accountant)
        notes = [f"{reason}; {accountant.upper()} accountant, Poisson-subsampled Gaussian, "
                 f"q = {rate:.4g}, {steps} noisy steps, δ = {delta:g}"]
        if self.config.expected_batch_size is None:
            notes.append("q from the mean batch size (set expected_batch_size with Poisson sampling)")
        if not self.secure_noise:
            notes.append("noise from a seeded generator (use secure_noise=True for deployment)")
        return eps, "; ".join(notes)

    def state_dict(self) -> dict[str, Any]:
        """Loss trace, noise seed/offset, step counter and accounting history (tensors and ints)."""
        return {
            "trace": self._trace.clone(),
            "visited": self._visited.clone(),
            "seed": self._seed,
            "offset": self._offset,
            "steps": self._steps,
            "noisy_batch_sizes": torch.tensor(self._noisy_batch_sizes, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (validated; nothing changes on error)."""
        if self._path is not None:
            raise RuntimeError("cannot load a state while gradients are pending: call optimizer.step() first")
        if not isinstance(state, dict) or set(state) != set(STATE_KEYS):
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state must be a dict with keys {list(STATE_KEYS)}, got {keys}")
        for name, like in (("trace", self._trace), ("visited", self._visited)):
            value = state[name]
            if not isinstance(value, torch.Tensor) or value.shape != like.shape or value.dtype != like.dtype:
                raise ValueError(f"state['{name}'] must be a {like.dtype} tensor of shape {tuple(like.shape)}")
        for name, high in (("seed", 2**64), ("offset", functional.MAX_OFFSET + 1), ("steps", None)):
            value = state[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (high and value >= high):
                raise ValueError(f"state['{name}'] must be a non-negative int, got {value!r}")
        sizes = state["noisy_batch_sizes"]
        if not isinstance(sizes, torch.Tensor) or sizes.dim() != 1 or sizes.dtype != torch.int64:
            raise ValueError("state['noisy_batch_sizes'] must be a 1-D int64 tensor")
        self._trace = state["trace"].clone()
        self._visited = state["visited"].clone()
        self._seed, self._offset, self._steps = state["seed"], state["offset"], state["steps"]
        self._noisy_batch_sizes = [int(b) for b in sizes]

    # ------------------------------------------------------------------ the wrapped step
    def _step(self, closure: Optional[Callable[[], Any]]) -> Any:
        if not self._active or self._real_step is None:
            raise RuntimeError("this optimizer.step was patched by a DeMem block that has exited")
        if self._grad_sum is not None or (self._world > 1 and self._path == "per_sample"):
            self._write_grads()
        real_step = self._real_step
        self._reset_pending()
        out = real_step() if closure is None else real_step(closure)
        self._steps += 1
        if self._stats is not None:
            self._stats = dataclasses.replace(self._stats, steps=self._steps)
        self._stats_open = False
        return out

    def _write_grads(self) -> None:
        """.grad <- (Σ w_i·c_i·g_i + σ·C·ξ) / D for every trainable parameter (noise once per step)."""
        cfg = self.config
        total, count = self._grad_sum, self._count
        if self._world > 1:
            total, count = self._reduce_global()
            if count == 0:
                return
        if cfg.noise_multiplier > 0:
            if self.secure_noise:
                seed, offset = int.from_bytes(os.urandom(8), "little"), 0
                if self._world > 1:
                    seed = distributed.broadcast_seed(seed)  # one noise draw for the whole group
            else:
                seed, offset = self._seed, self._offset
                self._offset += math.ceil(total.numel() / 4)
            noise = functional.philox_normal(total.numel(), seed, offset, total.device, total.dtype)
            total.add_(noise, alpha=cfg.noise_std)  # total is this step's own sum: updated in place
            self._noisy_batch_sizes.append(count)
        grad = total.div_(cfg.expected_batch_size or count)
        for p, g in zip(self._params, grad.split([p.numel() for p in self._params])):
            new = torch.empty_like(p)
            new.copy_(g.view(p.shape))
            p.grad = new

    def _reduce_global(self) -> tuple[torch.Tensor, int]:
        """Σ w_i·c_i·g_i and the number of samples over all ranks (the same on every rank).

        Raises on every rank the non-finite gradient error that a rank deferred to the step.
        """
        params = self._params
        total = self._grad_sum
        if total is None:
            dtype = reference.accumulation_dtype(flat_dtype(params))
            total = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
        flags = torch.tensor([self._count, int(self._deferred_error is not None)], dtype=torch.int64)
        total = distributed.all_reduce_sum(total)
        count, errors = distributed.all_reduce_sum(flags).tolist()
        if errors:
            message = self._deferred_error or f"non-finite per-sample gradients on {errors} other rank(s)"
            self._reset_pending()
            raise functional.NonFiniteError(
                f"{message}; every rank stops at the step (nonfinite='skip' drops such samples)")
        return total, count

    # ------------------------------------------------------------------ per-sample sums
    def _batch_rule(self, losses: torch.Tensor, idx: Optional[torch.Tensor],
                    fix_tau: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DeMemConfig]:
        """The samples kept (finite losses), their positions, their scores and the rule to sum them with.

        The rule is threshold "fixed" at the batch's τ under torch.distributed (τ of all ranks' scores:
        every rank takes part in that collective, even with no sample kept) and with `fix_tau` (chunks,
        each summed apart); else the config itself (the fused op finds τ from the scores).
        """
        problem = "loss_fn returned non-finite losses"
        keep = torch.isfinite(losses) if self._world > 1 else self._keep(torch.isfinite(losses), problem)
        positions = keep.nonzero().flatten()
        scores = self._scores(losses[keep], None if idx is None else idx[positions.cpu()])
        config = self._sum_config
        if self._world > 1:
            config, _ = self._global_rule(config, scores, keep, problem)
        elif fix_tau and positions.numel() > 0:
            cfg = self.config
            config = config.replace(threshold="fixed",
                                    tau=reference.threshold(scores, cfg.threshold, cfg.k, cfg.quantile, cfg.tau))
        return keep, positions, scores, config

    def _one_chunk(self, grads_of: GradsOf, batch: Sequence[torch.Tensor],
                   idx: Optional[torch.Tensor]) -> _BatchSum:
        """The batch in one chunk: scores are the per-sample losses from grad_and_value; rows with
        non-finite gradients leave the sum (on one process, before τ: the fused op finds it)."""
        grads, losses = grads_of(batch)
        keep, positions, scores, config = self._batch_rule(losses, idx, fix_tau=False)
        if positions.numel() == 0:
            return _BatchSum(None, [], keep, losses)
        result, ok = self._sum_finite_rows(grads if bool(keep.all()) else grads[keep], scores, config, positions)
        keep[positions[~ok]] = False
        return _BatchSum(None if result is None else result.grad, [] if result is None else [result], keep, losses)

    def _sum_finite_rows(self, grads: torch.Tensor, scores: torch.Tensor, config: DeMemConfig,
                         positions: torch.Tensor) -> tuple[Optional[functional.FusedResult], torch.Tensor]:
        """The fused sum over the rows of `grads` whose entries are all finite, and the mask of those rows.

        The fused op's norms reveal a non-finite row, so the usual all-finite batch costs no extra pass
        over the per-sample gradients; only when a norm is not finite is every row checked (and the
        rows with non-finite entries dropped, or reported with nonfinite="error").
        """
        try:
            return functional.fused_step(grads, scores, config), torch.ones_like(scores, dtype=torch.bool)
        except functional.NonFiniteError:
            pass
        ok = self._keep(torch.isfinite(grads).all(dim=1), "non-finite per-sample gradients", positions)
        if not bool(ok.any()):
            return None, ok
        return functional.fused_step(grads[ok], scores[ok], config), ok

    def _chunks(self, loss_module: LossModule, grads_of: GradsOf, batch: Sequence[torch.Tensor],
                idx: Optional[torch.Tensor], rows: int) -> _BatchSum:
        """Several chunks: the batch-level threshold comes from one batched forward, then each chunk
        is summed with threshold "fixed" at that τ, which gives every sample its batch-level risk."""
        with torch.no_grad():
            losses = loss_module(*batch)
        check_loss_shape(losses, batch[0].shape[0])
        losses = losses.detach()
        keep, positions, scores, chunk_config = self._batch_rule(losses, idx, fix_tau=True)
        if positions.numel() == 0:
            return _BatchSum(None, [], keep, losses)
        total, parts = None, []
        for start in range(0, positions.numel(), rows):
            pos = positions[start:start + rows]
            grads, _ = grads_of([x[pos] for x in batch])
            result, ok = self._sum_finite_rows(grads, scores[start:start + rows], chunk_config, pos)
            keep[pos[~ok]] = False
            if result is not None:
                total = result.grad if total is None else total.add_(result.grad)  # the op's fresh output
                parts.append(result)
        return _BatchSum(total, parts, keep, losses)

    # ------------------------------------------------------------------ helpers
    def _reset_pending(self) -> None:
        self._path: Optional[str] = None  # "weighting" | "per_sample" since the last step
        self._grad_sum: Optional[torch.Tensor] = None
        self._count = 0
        self._params: Optional[list[nn.Parameter]] = None
        self._deferred_error: Optional[str] = None  # torch.distributed: raised at the step on every rank

    def _check_active(self, what: str) -> None:
        if not self._active:
            raise RuntimeError(f"dm.{what}() must be called inside the 'with DeMem(...) as dm:' block")

    def _check_path(self, path: str) -> None:
        if self._path is not None and self._path != path:
            raise RuntimeError("cannot mix dm.backward and dm.backward_per_sample before one "
                               "optimizer.step(): use one path per step")

    def _trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The model's trainable parameters, on one device and unchanged while sums are pending."""
        named = trainable_parameters(self._module)
        if not named:
            raise ValueError("model has no parameters with requires_grad")
        params = [p for _, p in named]
        if any(p.device != params[0].device for p in params):
            raise ValueError("the model's trainable parameters must all be on one device")
        if self._params is not None and (len(self._params) != len(params)
                                         or any(a is not b for a, b in zip(self._params, params))):
            raise RuntimeError("the model's trainable parameters changed since the last "
                               "backward_per_sample call; call optimizer.step() first")
        return named

    def _refuse_batchnorm(self) -> None:
        for name, module in self._module.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                raise ValueError(
                    f"model has a BatchNorm layer {name!r} in train mode: it mixes the samples of a "
                    "batch, so per-sample gradients are ill-defined; use GroupNorm/LayerNorm or put "
                    "the layer in eval mode")

    def _check_batch(self, batch: Sequence[torch.Tensor], device: torch.device) -> int:
        if not batch:
            raise ValueError("backward_per_sample needs at least one batch tensor after loss_fn")
        for i, x in enumerate(batch):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"batch[{i}] must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() == 0:
                raise ValueError(f"batch[{i}] must have a leading batch dimension, got a scalar")
            if x.device != device:
                raise ValueError(f"batch[{i}] is on {x.device} but the model's parameters are on {device}")
        batch_size = batch[0].shape[0]
        if batch_size == 0:
            raise ValueError("batch is empty (B = 0)")
        for i, x in enumerate(batch):
            if x.shape[0] != batch_size:
                raise ValueError(f"batch[{i}] has {x.shape[0]} samples but batch[0] has {batch_size}")
        return batch_size

    def _check_indices(self, indices: Optional[torch.Tensor], batch_size: int) -> Optional[torch.Tensor]:
        """Validated dataset indices as a CPU int64 tensor (None when not given)."""
        if indices is None:
            if self.config.proxy == "trace":
                raise ValueError("indices ([B] dataset indices) are required with proxy='trace'")
            return None
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be an integer torch.Tensor, got {type(indices).__name__}")
        if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
            raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.shape != (batch_size,):
            raise ValueError(f"indices must have shape ({batch_size},), got {tuple(indices.shape)}")
        idx = indices.detach().to("cpu", torch.int64)
        high = self.num_samples
        if int(idx.min()) < 0 or (high is not None and int(idx.max()) >= high):
            raise ValueError(f"indices must be in [0, num_samples={high}), got values in "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        if self.config.proxy == "trace" and idx.unique().numel() != batch_size:
            raise ValueError("indices must be unique within a batch with proxy='trace'")
        return idx

    def _keep(self, ok: torch.Tensor, problem: str, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The mask of samples to keep; raises with nonfinite="error" when some are not ok.

        Under torch.distributed the error is kept for the step, which raises it on every rank
        (raising on one rank alone would leave the others waiting in a collective).
        """
        if self.nonfinite == "error" and not bool(ok.all()):
            bad = torch.nonzero(~ok).flatten()
            if positions is not None:
                bad = positions[bad]
            message = f"{problem} for samples at batch positions {bad[:8].tolist()}"
            if self._world > 1:
                self._deferred_error = self._deferred_error or message
                return ok
            raise functional.NonFiniteError(f"{message} (nonfinite='skip' drops such samples)")
        return ok

    def _updated_trace(self, losses: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """m_i after this visit: β·m_i + (1−β)·ℓ_i, or ℓ_i on the first visit (float64, CPU)."""
        loss = losses.detach().to("cpu", torch.float64)
        beta = self.config.trace_decay
        return torch.where(self._visited[idx], beta * self._trace[idx] + (1 - beta) * loss, loss)

    def _scores(self, losses: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
        """Memorization proxy s_i for finite, detached losses (the trace is not changed)."""
        if self.config.proxy == "loss":
            return losses
        return self._updated_trace(losses, idx).to(device=losses.device, dtype=losses.dtype)

    def _commit_trace(self, losses: torch.Tensor, idx: Optional[torch.Tensor]) -> None:
        if self.config.proxy != "trace":
            return
        if self._world == 1:
            self._trace[idx] = self._updated_trace(losses, idx)
            self._visited[idx] = True
            return
        # torch.distributed: every rank's (index, loss) pairs, committed rank after rank (a sample that
        # DistributedSampler's padding puts on two ranks at once is visited twice, in rank order).
        pairs = torch.stack([idx.to(losses.device, torch.float64), losses.to(torch.float64)], dim=1)
        for part in distributed.all_gather_padded(pairs):
            part_idx, part_losses = part[:, 0].cpu().to(torch.int64), part[:, 1].cpu()
            self._trace[part_idx] = self._updated_trace(part_losses, part_idx)
            self._visited[part_idx] = True

    def _record(self, weights: torch.Tensor, risk: torch.Tensor, norms: Optional[torch.Tensor],
                skipped: int) -> None:
        """Stats of this backward call, merged with the calls since the last step."""
        prev = self._stats if self._stats_open else None
        if prev is not None:
            weights, risk = torch.cat([prev.weights, weights]), torch.cat([prev.risk, risk])
            norms = None if norms is None else torch.cat([prev.norms, norms])
            skipped += prev.num_skipped
        n = weights.numel()
        clip_fraction = None
        if norms is not None:
            clip_fraction = float((self._clip_factors(norms, risk) < 1).double().mean()) if n else 0.0
        self._stats = DeMemStats(
            weights=weights, risk=risk,
            high_risk_fraction=float((risk > 0.5).double().mean()) if n else 0.0,
            norms=norms, clip_fraction=clip_fraction, num_samples=n, num_skipped=skipped,
            steps=self._steps)
        self._stats_open = True

    def _clip_factors(self, norms: torch.Tensor, risk: torch.Tensor) -> torch.Tensor:
        """c_i of DESIGN.md section 2, step 4."""
        cfg = self.config
        if cfg.max_grad_norm is None:
            return torch.ones_like(norms, dtype=torch.float64)
        clip = torch.clamp(cfg.max_grad_norm / (norms.double() + reference.CLIP_EPS), max=1.0)
        if cfg.clip_scope == "high_risk":
            r = risk.double()
            clip = 1.0 - r + r * clip
        return clip
