"""`DeMemCallback`: a DeMem block around Lightning's `trainer.fit`, with its stats and ε in the logs.

The LightningModule reaches the block as `self.demem` (set on fit start). With automatic optimization,
`training_step` returns `self.demem.weighted_loss(per_sample_losses)` (the weighting path), or calls
`self.demem.backward_per_sample(loss_fn, *batch)` and returns None (clipping/noise: Lightning runs the
step's closure and DeMem writes `.grad` when it returns). With manual optimization, call
`self.demem.backward(...)` or `backward_per_sample(...)` and then `opt.step()`. One optimizer, one process.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl

from demem_ext.config import DeMemConfig
from demem_ext.middleware import DeMem
from demem_ext.sampling import PoissonBatchSampler


class DeMemCallback(pl.Callback):
    """Enter a DeMem block on fit start and leave it on fit end (or on an exception).

    config, num_samples, sampling and **demem_options go to `DeMem`; delta: δ of the logged ε (None: no ε
    is logged). Logged after every training batch: `<prefix>high_risk_fraction`, `<prefix>clip_fraction`
    (per-sample path), `<prefix>num_skipped` and `<prefix>epsilon` (where DeMem reports one).
    """

    def __init__(self, config: Optional[DeMemConfig] = None, *, num_samples: Optional[int] = None,
                 sampling: Union[str, PoissonBatchSampler] = "shuffle", delta: Optional[float] = None,
                 prefix: str = "demem/", **demem_options: Any) -> None:
        super().__init__()
        self.config, self.num_samples, self.sampling = config, num_samples, sampling
        self.delta, self.prefix, self.demem_options = delta, prefix, demem_options
        self.demem: Optional[DeMem] = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            raise ValueError("DeMemCallback supports one process: under a multi-process strategy wrap "
                             "DeMem(DistributedDataParallel(model), optimizer) yourself (README, torch.distributed)")
        if len(trainer.optimizers) != 1:
            raise ValueError(f"DeMemCallback needs exactly one optimizer, the module configures "
                             f"{len(trainer.optimizers)}")
        self.demem = DeMem(pl_module, trainer.optimizers[0], self.config, self.num_samples,
                           sampling=self.sampling, **self.demem_options)
        self.demem.__enter__()
        pl_module.demem = self.demem

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stats = self.demem.stats if self.demem is not None else None
        if stats is None:
            return
        values = {"high_risk_fraction": stats.high_risk_fraction, "num_skipped": float(stats.num_skipped)}
        if stats.clip_fraction is not None:
            values["clip_fraction"] = stats.clip_fraction
        if self.delta is not None:
            eps, _ = self.demem.privacy_spent(self.delta)
            if eps is not None:
                values["epsilon"] = eps
        pl_module.log_dict({self.prefix + k: v for k, v in values.items()}, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._leave(None)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._leave(exception)

    def _leave(self, exception: Optional[BaseException]) -> None:
        if self.demem is not None and self.demem.active:
            self.demem.__exit__(type(exception) if exception else None, exception, None)
