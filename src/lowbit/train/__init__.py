"""Training engine: one loop for every recipe, optimizers, schedules, losses, checkpoints.

    from lowbit.train import train
    result = train("mnist_mlp_w8a8", ["epochs=3"])
    result.final["val_top1"]

FP8 training from your own loop (what ``optim.master_dtype`` and ``scaler.name`` do in a recipe)::

    model = lowbit.convert(model, "fp8")
    opt = MasterWeights(torch.optim.SGD(model.parameters(), lr=0.1), "fp16")
    scaler = EnhancedLossScaler()
    for x, y in loader:
        opt.zero_grad()
        scaler.scale(loss_fn(model(x), y)).backward()
        scaler.step(opt)      # unscales; skips the step if a gradient overflowed
        scaler.update()       # back off / grow, never below the rising floor
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
from .loss_scaler import EnhancedLossScaler
from .losses import build_loss, squared_hinge_loss
from .master_weights import MasterWeights
from .optim import LRSchedule, build_optimizer, build_scheduler, param_groups

__all__ = [
    "Callback",
    "CheckpointError",
    "EnhancedLossScaler",
    "LRSchedule",
    "MasterWeights",
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
