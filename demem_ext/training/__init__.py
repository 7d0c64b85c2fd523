"""The training application: configuration, the loop behind `demem train`, data, models, checkpoints."""

from demem_ext.training.config import (CHECKPOINT_NAME, METRICS_NAME, OPTIMIZERS, PATHS, SCHEDULES,
                                       TrainConfig)
from demem_ext.training.loop import (TrainState, build, checkpoint_payload, restore, torch_distributed_group, train,
                                     train_epoch)
from demem_ext.training.rng import seed_everything

__all__ = ["CHECKPOINT_NAME", "METRICS_NAME", "OPTIMIZERS", "PATHS", "SCHEDULES", "TrainConfig", "TrainState",
           "build", "checkpoint_payload", "restore", "seed_everything", "torch_distributed_group", "train",
           "train_epoch"]
