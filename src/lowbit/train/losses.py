"""Training losses by name: cross-entropy and the squared hinge loss of the BNN papers."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "squared_hinge_loss", "build_loss"]

LOSSES = ("cross_entropy", "squared_hinge")


def squared_hinge_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over batch and classes of ``max(0, 1 - t * y)^2`` with ``t`` the ±1 one-hot target.

    This is the loss of Courbariaux/Hubara's BinaryNet MNIST and CIFAR-10 nets.
    """
    if logits.ndim != 2:
        raise ValueError(f"squared_hinge_loss: logits must be [N, C], got {tuple(logits.shape)}")
    t = torch.full_like(logits, -1.0)
    t.scatter_(1, target.view(-1, 1), 1.0)
    return torch.clamp(1.0 - t * logits, min=0.0).square().mean()


def build_loss(name: str, *, label_smoothing: float = 0.0) -> Callable[..., torch.Tensor]:
    """``loss(logits [N, C], target [N]) -> scalar`` for ``"cross_entropy"`` or ``"squared_hinge"``."""
    if name == "cross_entropy":
        ls = float(label_smoothing)
        return lambda logits, target: F.cross_entropy(logits, target, label_smoothing=ls)
    if name == "squared_hinge":
        if label_smoothing:
            raise ValueError("loss.label_smoothing applies only to cross_entropy")
        return squared_hinge_loss
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}")
