"""Optimizers by name and learning-rate schedules.

``build_optimizer`` puts weight decay only on weights of rank >= 2 (convolution and linear
kernels, embeddings): BatchNorm scales and shifts, biases and other 0-/1-d parameters (e.g.
learned quantizer scales) get none.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["OPTIMIZERS", "SCHEDULES", "param_groups", "build_optimizer", "LRSchedule",
           "build_scheduler"]

OPTIMIZERS = ("sgd", "adam", "adamax", "shift_adamax")
SCHEDULES = ("none", "step", "multistep", "cosine", "exponential")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed weights (ndim >= 2) and undecayed BN parameters and biases."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _fusable(groups: Sequence[Mapping[str, Any]]) -> bool:
    """Whether torch's fused SGD/Adam kernels accept every parameter of ``groups``."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") and not p.is_sparse
        for p in params)


def _shift_adamax() -> type:
    try:
        mod = importlib.import_module("lowbit.train.shift_adamax")
    except ModuleNotFoundError as exc:
        if exc.name != "lowbit.train.shift_adamax":
            raise
        raise ValueError(
            "optimizer 'shift_adamax' needs lowbit.train.shift_adamax, which is not installed "
            "in this copy of lowbit; choose one of sgd, adam, adamax"
        ) from None
    return mod.ShiftAdaMax


def build_optimizer(
    model_or_groups: nn.Module | Iterable[dict[str, Any]], name: str, *, lr: float,
    momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8, fused: bool = True,
) -> torch.optim.Optimizer:
    """An optimizer by name: ``"sgd"``, ``"adam"``, ``"adamax"`` or ``"shift_adamax"``.

    Given a module, the parameters are split by :func:`param_groups` so that weight decay
    skips BatchNorm parameters and biases. Weight decay is L2 added to the gradient (classic
    SGD/Adam semantics).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if isinstance(model_or_groups, nn.Module):
        groups = param_groups(model_or_groups, weight_decay)
    else:
        groups = [dict(g, params=[g["params"]] if isinstance(g["params"], torch.Tensor)
                       else list(g["params"])) for g in model_or_groups]
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    betas = (float(betas[0]), float(betas[1]))
    extra = {"fused": True} if fused and _fusable(groups) else {}
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum,
                               nesterov=nesterov and momentum > 0, weight_decay=weight_decay,
                               **extra)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                **extra)
    if name == "adamax":
        return torch.optim.Adamax(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return _shift_adamax()(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class LRSchedule:
    """Learning-rate factor as a function of (fractional) epoch: warm-up, then a decay rule.

    Picklable (it is a plain object), so ``LambdaLR`` state dicts round-trip.
    """

    def __init__(
        self, name: str, *, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0,
        step_size: int = 30, milestones: Sequence[int] = (), gamma: float = 0.1,
        min_factor: float = 0.0,
    ) -> None:
        if name not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.name, self.epochs, self.steps_per_epoch = name, int(epochs), int(steps_per_epoch)
        self.warmup_epochs, self.step_size = float(warmup_epochs), int(step_size)
        self.milestones, self.gamma = sorted(int(m) for m in milestones), float(gamma)
        self.min_factor = float(min_factor)

    def factor(self, epoch: float) -> float:
        """Multiplier of the base learning rate at (fractional) ``epoch``."""
        warm = 1.0
        if self.warmup_epochs > 0 and epoch < self.warmup_epochs:
            warm = (epoch + 1.0 / self.steps_per_epoch) / self.warmup_epochs
        whole = math.floor(epoch + 1e-9)
        if self.name == "none":
            f = 1.0
        elif self.name == "step":
            f = self.gamma ** (whole // self.step_size)
        elif self.name == "multistep":
            f = self.gamma ** sum(1 for m in self.milestones if whole >= m)
        elif self.name == "exponential":
            f = self.gamma**whole
        else:  # cosine, per step
            t = min(max(epoch / max(self.epochs, 1), 0.0), 1.0)
            f = self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
        return warm * f

    def __call__(self, step: int) -> float:
        return self.factor(step / self.steps_per_epoch)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], *, epochs: int,
    steps_per_epoch: int, base_lr: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` from a ``schedule`` config table."""
    min_factor = float(cfg.get("min_lr", 0.0)) / base_lr if base_lr > 0 else 0.0
    sched = LRSchedule(
        cfg.get("name", "none"), epochs=epochs, steps_per_epoch=steps_per_epoch,
        warmup_epochs=cfg.get("warmup_epochs", 0.0), step_size=cfg.get("step_size", 30),
        milestones=cfg.get("milestones", ()), gamma=cfg.get("gamma", 0.1), min_factor=min_factor,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, sched)
