"""The DeMem context manager: the DeMem rule (docs/design.md, "The rule") inside an existing training loop.

Two paths lead to the wrapped `optimizer.step()`:

- `dm.backward(per_sample_losses)`: the weighting path. An ordinary `loss.backward()` of
  L = (1/D)·Σ w_i·ℓ_i; no per-sample gradients, no clipping, no noise.
- `dm.backward_per_sample(loss_fn, *batch)`: the clipping/noise path. Per-sample gradients from
  `demem_ext.grad_sample`, in chunks of bounded memory, reduced by the fused op to Σ w_i·c_i·g_i and
  accumulated until the step, which adds the noise once, divides by D and writes the result into the
  parameters' `.grad` before calling the optimizer's own step.

This class is a facade: the parts are the weighting path (`weighting`), the risk scores (`risk_scores`: the
loss trace and the class thresholds), the noise (`noise`), the per-sample sums (`accumulation`), the non-finite policy (`nonfinite`), the statistics
(`stats`), the argument checks (`checks`), the step patch (`step_patch`) and the process group
(`process_group`: one process, or torch.distributed).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from demem_ext import accounting
from demem_ext.config import DeMemConfig
from demem_ext.grad_sample import FlatBuffer, LossModule, check_loss_shape, flat_dtype, per_sample_grads
from demem_ext.grad_sample.opacus_hooks import OpacusEngine
from demem_ext.middleware import checks, collectives
from demem_ext.middleware.accumulation import BatchSum, BatchSummer, PendingSum, default_chunk_rows
from demem_ext.middleware.noise import NoiseSource
from demem_ext.middleware.nonfinite import NonFinitePolicy
from demem_ext.middleware.process_group import ProcessGroup, SingleProcess, current_group
from demem_ext.middleware.stats import DeMemStats, StatsRecorder
from demem_ext.middleware.step_patch import StepPatch
from demem_ext.middleware.risk_scores import RiskScores
from demem_ext.middleware.weighting import WeightingPath
from demem_ext.ops import NonFiniteError
from demem_ext.sampling import PoissonBatchSampler, Sampling


class DeMem:
    """Context manager applying the DeMem rule to `model` trained by `optimizer`.

    config: a DeMemConfig (default DeMemConfig()); **overrides: DeMemConfig fields to change.
    num_samples: dataset size (needed by proxy="trace" and by `privacy_spent`).
    num_classes: number of classes (needed by threshold="class"; the backward calls then take `labels`).
    sampling: how the batches are drawn — "shuffle" (fixed-size shuffled batches, an ordinary DataLoader:
    `privacy_spent` reports no ε), "poisson" (each sample in each batch with probability
    q = expected_batch_size / num_samples; both must be set), or the `PoissonBatchSampler` itself (q, N
    and D = q·N come from it). An empty batch passed to `backward_per_sample` is a noise-only step.
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
      gets every rank's losses, so all traces equal the single-process one; likewise the class moments
      of threshold="class";
    - `privacy_spent` counts the global noisy batch sizes; `stats` describe this rank's samples.

    A non-finite sample with nonfinite="error" stops every rank with a NonFiniteError, at the backward
    call, or at the step for non-finite gradients found after the batch was split into chunks.
    Without torch.distributed, or with one rank, none of this runs.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: Optional[DeMemConfig] = None,
                 num_samples: Optional[int] = None, *, num_classes: Optional[int] = None, sampling: Union[str, PoissonBatchSampler] = "shuffle",
                 seed: Optional[int] = None, secure_noise: bool = False, nonfinite: str = "error",
                 chunk_size: Optional[int] = None, engine: str = "torch.func", **overrides: Any) -> None:
        config = checks.block_config(model, optimizer, config, overrides)
        self.sampling = Sampling.of(sampling)
        config, num_samples = checks.sampling_options(config, num_samples, self.sampling)
        checks.block_options(config, num_samples, seed, secure_noise, nonfinite, chunk_size, engine)
        checks.class_count(config, num_classes)
        self.model = model
        self._module = collectives.unwrap(model)  # per-sample gradients never go through DDP's forward
        self.optimizer = optimizer
        self.config = config
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.secure_noise = secure_noise
        self.nonfinite = nonfinite
        self.chunk_size = chunk_size
        self.engine = engine
        self._opacus: Optional[OpacusEngine] = None  # the hooks, while the block is active
        self._risk_scores = RiskScores(config, num_samples, num_classes)
        self._noise = NoiseSource(seed, secure_noise)
        self._policy = NonFinitePolicy(nonfinite)
        self._group: ProcessGroup = SingleProcess()  # set when entering the block
        self._pending = PendingSum()
        self._recorder = StatsRecorder(config)
        self._patch = StepPatch(optimizer)
        self._flat = FlatBuffer()  # flattened per-sample gradients, reused (released on exit)
        self._weighting = WeightingPath(config, self._module, self._risk_scores, self._policy, self._pending,
                                        self._recorder)
        self._steps = 0
        self._noisy_batch_sizes: list[int] = []
        self._active = False

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "DeMem":
        if self._active:
            raise RuntimeError("this DeMem is already active: DeMem blocks cannot be nested or re-entered")
        self._patch.check_free()
        self._group = current_group()
        options = {"nonfinite": self.nonfinite, "secure_noise": self.secure_noise, "num_samples": self.num_samples,
                   "num_classes": self.num_classes, "sampling": self.sampling.kind}
        self._noise.seed = self._group.join(self.model, self.config, options, self._noise.seed, self.secure_noise)
        if self.engine == "opacus":
            if self._group.collective:
                raise ValueError("engine='opacus' is not supported under torch.distributed: use engine='torch.func'")
            self._opacus = OpacusEngine(self._module)
        self._weighting.opacus = self._opacus
        self._patch.install(self._step)
        self._active = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._patch.remove()
        if self._opacus is not None:
            self._opacus.close()
            self._opacus = None
            self._weighting.opacus = None
        self._flat.release()
        self._active = False
        if self._pending.total is not None and exc_type is None:
            warnings.warn("DeMem block exited with per-sample gradients that no optimizer.step() "
                          "applied; they were discarded", RuntimeWarning, stacklevel=2)
        self._reset_pending()

    # ------------------------------------------------------------------ public API
    @property
    def active(self) -> bool:
        """Whether the block is entered (between __enter__ and __exit__)."""
        return self._active

    @property
    def stats(self) -> Optional[DeMemStats]:
        """Statistics of the backward calls since the last step (or of the last step); None before any."""
        return self._recorder.stats

    def backward(self, per_sample_losses: torch.Tensor, indices: Optional[torch.Tensor] = None,
                 scores: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> None:
        """Backward of (1/D)·Σ_i w_i·ℓ_i for per-sample losses [B] (D = expected_batch_size or B).

        An ordinary `loss.backward()`: gradients accumulate into `.grad` as usual. Several calls before
        one step (gradient accumulation) need expected_batch_size, the samples per step, so that the
        step's gradient is (1/D)·Σ over all of them, as on the per-sample path. A non-finite gradient
        raises NonFiniteError with nonfinite="error" (`.grad` and the loss trace unchanged), or drops the
        call's samples with "skip". Without clipping and noise only, except with engine="opacus", where
        a config that clips or adds noise takes the per-sample path (as `backward_per_sample`) with
        Opacus's per-sample gradients of these losses. `indices` ([B] dataset indices) are required
        with proxy="trace". `scores` ([B], weighting path only): what the risk rule reads instead of the
        losses, e.g. the cross-entropy part of a TRADES/MART loss (the proxy, such as the trace, applies
        to them). `labels` ([B] classes in [0, num_classes)) are required with threshold="class" and
        ignored otherwise. An empty batch changes nothing.
        """
        self._check_active("backward")
        per_sample = self.config.needs_per_sample_grads
        if per_sample and self._opacus is None:
            raise ValueError("this config clips (max_grad_norm) or adds noise (noise_multiplier), which "
                             "needs per-sample gradients: use dm.backward_per_sample(loss_fn, *batch), "
                             "or DeMem(..., engine='opacus')")
        self._pending.check_path("per_sample" if per_sample else "weighting")
        losses = checks.losses_for_backward(per_sample_losses)
        scores = checks.risk_scores(scores, losses)
        idx = checks.dataset_indices(indices, losses.shape[0], self.config, self.num_samples)
        labels = checks.class_labels(labels, losses.shape[0], self.config, self.num_classes, losses.device)
        if per_sample and scores is not None:
            raise ValueError("scores are only supported on the weighting path (no clipping or noise)")
        if per_sample:
            params = [p for _, p in checks.trainable(self._module, self._pending.params)]
            if losses.numel() == 0:
                self._add_empty(params)
                return
            grads = self._opacus.per_sample_grads(losses, params, flat_dtype(params), self._flat)
            summer = self._summer()
            self._add(summer.one_chunk(lambda _: (grads, losses.detach()), (), idx, labels), params, idx,
                      losses.shape[0])
        else:
            self._weighting.backward(losses, idx, self._group, self._steps, scores, labels)

    def weighted_loss(self, per_sample_losses: torch.Tensor, indices: Optional[torch.Tensor] = None,
                      scores: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weighting path's scalar loss (1/D)·Σ_i w_i·ℓ_i, for a loop that calls backward itself
        (Lightning's automatic optimization, `accelerator.backward`, AMP's `scaler.scale(loss).backward()`).

        Records the stats and updates the loss trace like `backward`; its gradient is checked for
        non-finite values at the optimizer step (NonFiniteError before the update, with nonfinite="error").
        """
        self._check_active("weighted_loss")
        if self.config.needs_per_sample_grads:
            raise ValueError("this config clips (max_grad_norm) or adds noise (noise_multiplier), which needs "
                             "per-sample gradients: use dm.backward_per_sample(loss_fn, *batch)")
        self._pending.check_path("weighting")
        losses = checks.losses_for_backward(per_sample_losses)
        scores = checks.risk_scores(scores, losses)
        idx = checks.dataset_indices(indices, losses.shape[0], self.config, self.num_samples)
        labels = checks.class_labels(labels, losses.shape[0], self.config, self.num_classes, losses.device)
        return self._weighting.loss(losses, idx, self._group, self._steps, scores, labels)

    def backward_per_sample(self, loss_fn: Callable[..., torch.Tensor], *batch: torch.Tensor,
                            indices: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> None:
        """Accumulate Σ_i w_i·c_i·g_i over the batch for the next optimizer step (clipping/noise path).

        loss_fn(model, *batch) -> per-sample losses [B]; each batch tensor has B rows. `labels`: as in `backward`.
        `.grad` is left alone until the step, which adds noise, divides by D and replaces `.grad`.
        An empty batch (B = 0, e.g. from PoissonBatchSampler) makes the step a noise-only step.
        Inside `optimizer.step(closure)` (LBFGS) each closure evaluation's sum becomes `.grad` when
        the closure returns. With nonfinite="skip", samples with non-finite losses are dropped before the threshold; so
        are samples with non-finite gradients when the batch fits in one chunk of one process (with
        several chunks or under torch.distributed the batch threshold is fixed first, and such samples
        are only dropped from the sum; with threshold="class" they always count in the batch's class
        thresholds, but not in the moments kept for later batches).
        """
        self._check_active("backward_per_sample")
        self._pending.check_path("per_sample")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, *batch), got {type(loss_fn).__name__}")
        named = checks.trainable(self._module, self._pending.params)
        params = [p for _, p in named]
        batch_size = checks.batch_size_of(batch, params[0].device)
        idx = checks.dataset_indices(indices, batch_size, self.config, self.num_samples)
        labels = checks.class_labels(labels, batch_size, self.config, self.num_classes, params[0].device)
        checks.no_batchnorm_in_train_mode(self._module)
        if batch_size == 0:
            self._add_empty(params)
            return

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
        summer = self._summer()
        if batch_size <= rows:
            batch_sum = summer.one_chunk(grads_of, batch, idx, labels)
        else:
            batch_sum = summer.chunks(loss_module, grads_of, batch, idx, labels, rows)
        self._add(batch_sum, params, idx, batch_size)

    def privacy_spent(self, delta: float, accountant: str = "rdp") -> tuple[Optional[float], str]:
        """(ε, how it was computed) when the updates are a valid Gaussian mechanism, else (None, why)."""
        return accounting.privacy_spent(self.config, self._noisy_batch_sizes, self.num_samples, delta, accountant,
                                        self.secure_noise, self.sampling)

    def state_dict(self) -> dict[str, Any]:
        """Loss trace, class moments, noise seed/offset, step counter and accounting history (tensors and ints)."""
        trace = self._risk_scores.trace
        return {
            "trace": trace.values.clone(),
            "visited": trace.visited.clone(),
            "class_moments": self._risk_scores.classes.moments.clone(),
            "seed": self._noise.seed,
            "offset": self._noise.offset,
            "steps": self._steps,
            "noisy_batch_sizes": torch.tensor(self._noisy_batch_sizes, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (validated; nothing changes on error). A state without
        "class_moments" (written before threshold="class" existed) loads where the rule keeps none."""
        if self._pending.path is not None:
            raise RuntimeError("cannot load a state while gradients are pending: call optimizer.step() first")
        trace, classes = self._risk_scores.trace, self._risk_scores.classes
        state = {"class_moments": torch.zeros(0, 3, dtype=torch.float64), **state} if isinstance(state, dict) else state
        checks.block_state(state, trace.values, trace.visited, classes.moments)
        trace.values = state["trace"].clone()
        trace.visited = state["visited"].clone()
        classes.moments = state["class_moments"].clone()
        self._noise.seed, self._noise.offset, self._steps = state["seed"], state["offset"], state["steps"]
        self._noisy_batch_sizes = [int(b) for b in state["noisy_batch_sizes"]]

    # ------------------------------------------------------------------ internals
    def _step(self, closure: Optional[Callable[[], Any]]) -> Any:
        """The patched optimizer.step: the pending per-sample sum becomes `.grad`, then the real step
        (with a closure: after each evaluation of it)."""
        real_step = self._patch.real_step
        if not self._active or real_step is None:
            raise RuntimeError("this optimizer.step was patched by a DeMem block that has exited")
        wrote = self._apply_pending()
        self._reset_pending()
        if closure is None:
            out = real_step()
        else:
            evaluations: list[bool] = []

            def evaluate() -> Any:
                self._reset_pending()  # each evaluation is a fresh gradient (LBFGS re-evaluates)
                value = closure()
                evaluations.append(self._apply_pending())
                self._reset_pending()
                return value

            out = real_step(evaluate)
            wrote = wrote or any(evaluations)
        if not wrote and self.config.noise_multiplier > 0:
            warnings.warn("optimizer.step() without a dm.backward_per_sample call since the last step: no noise "
                          "was added and the step is not counted by privacy_spent; pass empty batches to "
                          "backward_per_sample (a noise-only step) instead of skipping them",
                          RuntimeWarning, stacklevel=3)
        self._steps += 1
        self._recorder.close_step(self._steps)
        return out

    def _apply_pending(self) -> bool:
        """Write the pending per-sample sum into `.grad` (noise, division by D); whether it was a per-sample step.
        After `weighted_loss` calls: the check that their gradient is finite."""
        if self._pending.check_grads_at_step:
            try:
                self._weighting.check_grads()
            except NonFiniteError:
                self._reset_pending()
                raise
        if self._pending.path != "per_sample":
            return False
        try:
            noisy_count = self._pending.write_grads(self.config, self._noise, self._group, self._policy)
        except BaseException:
            self._reset_pending()
            raise
        if noisy_count is not None:
            self._noisy_batch_sizes.append(noisy_count)
        return True

    def _add_empty(self, params: list[nn.Parameter]) -> None:
        """A backward call on an empty batch: nothing to sum, but the step is still taken (with its noise)."""
        if self._group.collective:
            raise ValueError("an empty batch under torch.distributed is not supported: every rank needs samples")
        self._pending.add_empty(params)
        empty = params[0].new_zeros(0, dtype=torch.float32)
        self._recorder.record(empty, empty, empty, 0, self._steps)

    def _summer(self) -> BatchSummer:
        return BatchSummer(self.config, self._risk_scores, self._policy, self._group)

    def _add(self, batch_sum: BatchSum, params: list[nn.Parameter], idx: Optional[torch.Tensor],
             batch_size: int) -> None:
        """Add one backward call's Σ w_i·c_i·g_i to the pending sum; stats."""
        self._pending.add(batch_sum, params, idx, self._risk_scores, self._group)
        parts, keep = batch_sum.parts, batch_sum.keep
        empty = batch_sum.losses.new_zeros(0)
        self._recorder.record(torch.cat([r.weights for r in parts]) if parts else empty,
                              torch.cat([r.risk for r in parts]) if parts else empty,
                              torch.cat([r.norms for r in parts]) if parts else empty,
                              batch_size - int(keep.sum()), self._steps)

    def _reset_pending(self) -> None:
        self._pending.reset()
        self._policy.reset()

    def _check_active(self, what: str) -> None:
        if not self._active:
            raise RuntimeError(f"dm.{what}() must be called inside the 'with DeMem(...) as dm:' block")

