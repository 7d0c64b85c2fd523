"""TrainConfig: everything a training run depends on (saved in each checkpoint)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from demem_ext.config import DeMemConfig

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "none")
PATHS = ("auto", "weighting", "per_sample")
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
    demem: dict = field(default_factory=dict)  # DeMemConfig fields that differ from the defaults

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
        self.demem_config()  # validates the DeMem fields

    def demem_config(self) -> DeMemConfig:
        """The DeMemConfig of this run."""
        return DeMemConfig().replace(**self.demem)

    def per_sample(self) -> bool:
        """Whether the run needs per-sample gradients (clipping or noise, or asked for)."""
        if self.path != "auto":
            return self.path == "per_sample"
        return self.use_demem and self.demem_config().needs_per_sample_grads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training option(s) in checkpoint: {sorted(unknown)}")
        return cls(**values)
