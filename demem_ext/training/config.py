"""TrainConfig: everything a training run depends on (saved in each checkpoint)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from demem_ext import accounting
from demem_ext.config import DeMemConfig
from demem_ext.sampling import PoissonBatchSampler, Sampling
from demem_ext.training.precision import MEMORY_FORMATS, PRECISIONS, resolve_memory_format, resolve_precision

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "none")
PATHS = ("auto", "weighting", "per_sample")
SAMPLING_CHOICES = ("auto", "poisson", "shuffle")
DEMEM_SCORES = ("loss", "cross_entropy", "natural")
# DeMemConfig defaults that have changed since configs stored only their non-default DeMem fields (λ was 0.5 until
# the tuning seeds chose 0.75, docs/audit.md): such a stored config is read with these
LEGACY_DEMEM_DEFAULTS: dict[str, Any] = {"lam": 0.5}
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (saved in each checkpoint)."""

    dataset: str = "digits"
    data_dir: Optional[str] = None
    download: bool = False
    augment: bool = False
    model: str = "cnn"
    norm: Optional[str] = None
    at: str = "pgd"
    eps: float = 0.1
    alpha: float = 0.025
    attack_steps: int = 10
    beta: float = 6.0
    relax_alpha: float = 1.0  # RelaxLoss's target loss level α (at="relaxloss")
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    epochs: int = 30
    batch_size: int = 64
    seed: int = 0
    split_seed: int = 0
    device: str = "cpu"
    use_demem: bool = True
    path: str = "auto"
    nonfinite: str = "error"
    chunk_size: Optional[int] = None
    # DeMemConfig fields. With use_demem, __post_init__ spells out every field, so a stored config pins its rule and a
    # later change of DeMemConfig's defaults cannot silently change a stored run on resume, eval or audit.
    demem: dict = field(default_factory=dict)
    # what DeMem's risk rule reads: the training loss, its cross-entropy part (TRADES: CE(f(x), y); MART: the
    # boosted CE; PGD-AT: the loss itself) or the natural loss CE(f(x), y) (an eval-mode forward, no gradient)
    demem_score: str = "loss"
    sampling: str = "auto"  # "auto": Poisson when DeMem adds noise, else shuffled fixed-size batches
    target_epsilon: Optional[float] = None  # σ calibrated to this ε at `delta` (replaces noise_multiplier)
    delta: float = 1e-5
    record_losses: bool = False  # keep every training sample's adversarial and natural loss of every epoch
    # training arithmetic: fp32, bf16 autocast, or "auto" (bf16 where the device has it natively). fp32 is the
    # default: bf16 failed the parity check for DeMem (docs/benchmarks.md, "Training precision")
    precision: str = "fp32"
    memory_format: str = "contiguous"  # or "channels_last" ("auto": channels_last)

    def __post_init__(self) -> None:
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("path", PATHS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "attack_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "attack_steps" else 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {list(MEMORY_FORMATS)}, got {self.memory_format!r}")
        if self.sampling not in SAMPLING_CHOICES:
            raise ValueError(f"sampling must be one of {list(SAMPLING_CHOICES)}, got {self.sampling!r}")
        if self.demem_score not in DEMEM_SCORES:
            raise ValueError(f"demem_score must be one of {list(DEMEM_SCORES)}, got {self.demem_score!r}")
        if self.demem_score != "loss" and self.per_sample():
            raise ValueError(f"demem_score {self.demem_score!r} is only supported on the weighting path "
                             "(no clipping or noise)")
        if self.at == "relaxloss" and self.per_sample():
            raise ValueError("at 'relaxloss' depends on the batch's mean loss and has no per-sample form: "
                             "it cannot be combined with clipping or noise")
        accounting.check_delta(self.delta)
        cfg = self.demem_config()  # validates the DeMem fields
        if self.use_demem:
            object.__setattr__(self, "demem", dataclasses.asdict(cfg))
        if self.target_epsilon is not None:
            if isinstance(self.target_epsilon, bool) or not isinstance(self.target_epsilon, (int, float)) or not (
                    0 < self.target_epsilon < float("inf")):
                raise ValueError(f"target_epsilon must be a finite number > 0, got {self.target_epsilon!r}")
            valid, reason = accounting.dp_guarantee(cfg.replace(noise_multiplier=1.0))
            if not self.use_demem or not valid:
                raise ValueError(f"target_epsilon needs DeMem with a valid Gaussian mechanism: "
                                 f"{'DeMem is off' if not self.use_demem else reason}")
            if self.sampling_kind() != "poisson":
                raise ValueError("target_epsilon needs sampling 'poisson': ε is only reported for Poisson sampling")

    def demem_config(self) -> DeMemConfig:
        """The DeMemConfig of this run."""
        return DeMemConfig().replace(**self.demem)

    def per_sample(self) -> bool:
        """Whether the run needs per-sample gradients (clipping or noise, or asked for)."""
        if self.path != "auto":
            return self.path == "per_sample"
        return self.use_demem and self.demem_config().needs_per_sample_grads

    def sampling_kind(self) -> str:
        """"poisson" or "shuffle": "auto" is Poisson exactly when DeMem adds noise (or ε is targeted)."""
        if self.sampling != "auto":
            return self.sampling
        noisy = self.use_demem and (self.demem_config().noise_multiplier > 0 or self.target_epsilon is not None)
        return "poisson" if noisy else "shuffle"

    def sampler(self, num_samples: int, generator: Optional[Any] = None) -> Optional[PoissonBatchSampler]:
        """The epoch's PoissonBatchSampler (rate q = batch_size / N), or None for shuffled batches."""
        if self.sampling_kind() != "poisson":
            return None
        return PoissonBatchSampler(num_samples, min(1.0, self.batch_size / num_samples), generator=generator)

    def with_calibrated_noise(self, num_samples: int) -> "TrainConfig":
        """With target_epsilon: this config with σ = dx.noise_multiplier_for(target_epsilon, delta, q, steps),
        q = batch_size / N and steps = epochs · ⌈N / batch_size⌉ (Poisson batches of one pass each)."""
        if self.target_epsilon is None:
            return self
        sampler = self.sampler(num_samples)
        sigma = accounting.noise_multiplier_for(self.target_epsilon, self.delta, sampler.sample_rate,
                                                self.epochs * len(sampler))
        return dataclasses.replace(self, demem={**self.demem, "noise_multiplier": sigma})

    def with_resolved_precision(self) -> tuple["TrainConfig", str]:
        """This config with "auto" precision and memory format replaced by what this machine uses, and why."""
        precision, reason = resolve_precision(self.precision, self.device)
        return dataclasses.replace(self, precision=precision,
                                   memory_format=resolve_memory_format(self.memory_format)), reason

    def sampling_of(self, num_samples: int) -> Sampling:
        """How this run's batches are drawn, for the accountant."""
        sampler = self.sampler(num_samples)
        return Sampling("shuffle") if sampler is None else Sampling.of(sampler)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def matches(self, stored: Optional[dict[str, Any]]) -> bool:
        """Whether a stored config dict (a checkpoint's, keep.pt's) describes this config: fields added since it
        was written count at their defaults, so a new option with a default does not orphan older runs."""
        if stored is None:
            return False
        try:
            return TrainConfig.from_dict(stored).to_dict() == self.to_dict()
        except (TypeError, ValueError):
            return False

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training option(s) in checkpoint: {sorted(unknown)}")
        if "sampling" not in values:  # written before the sampling option: those runs drew shuffled batches
            values = {**values, "sampling": "shuffle"}
        if "precision" not in values:  # written before the precision option: fp32, contiguous
            values = {**values, "precision": "fp32", "memory_format": "contiguous"}
        if values.get("use_demem", True) and isinstance(values.get("demem"), dict):
            # written when only non-default DeMem fields were stored: a missing field had that time's default
            values = {**values, "demem": {**LEGACY_DEMEM_DEFAULTS, **values["demem"]}}
        return cls(**values)
