"""Training engine: one loop for every recipe, optimizers, schedules, losses, checkpoints.

    from lowbit.train import train
    result = train("mnist_mlp_w8a8", ["epochs=3"])
    result.final["val_top1"]
"""

from .callbacks import Callback, build_callbacks, list_callbacks, register_callback
from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .engine import (
    RunResult,
    Task,
    Trainer,
    TrainingDivergedError,
    build_model,
    build_task,
    evaluate,
    train,
    train_variants,
)
from .losses import build_loss, squared_hinge_loss
from .optim import LRSchedule, build_optimizer, build_scheduler, param_groups

__all__ = [
    "Callback",
    "CheckpointError",
    "LRSchedule",
    "RunResult",
    "Task",
    "Trainer",
    "TrainingDivergedError",
    "atomic_save",
    "build_callbacks",
    "build_loss",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "build_task",
    "evaluate",
    "list_callbacks",
    "load_checkpoint",
    "param_groups",
    "register_callback",
    "squared_hinge_loss",
    "train",
    "train_variants",
]
