"""Shift-based AdaMax (Courbariaux, Hubara et al., BNN/QNN) and Glorot learning-rate scales.

Per parameter, with gradient ``g`` at step ``t`` (the authors' Torch7
``adaMax_binary_clip_shift``)::

    m = beta1 * m + (1 - beta1) * g
    u = max(beta2 * u, |g|)
    p = p - AP2(lr / (1 - beta1^t)) * lr_scale * m / (AP2(u) + eps)

where ``AP2(z) = sign(z) * 2^round(log2|z|)``: the step size and the inverse of the infinity
norm are powers of two, so the update's multiplications are bit shifts (``lr_scale`` should be
a power of two too, see :func:`glorot_lr_scale`). Optional per-group ``clip`` clamps the
parameters to ``[-clip, clip]`` after the step (binary latent weights). The Torch7 code
overwrote its ``u`` state with ``AP2(u) + eps`` every step; here ``u`` is kept exact and only
the update uses ``AP2(u)``, as in the paper's algorithm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.nn.shift_bn import ap2

__all__ = ["ShiftAdaMax", "glorot_lr_scale", "glorot_param_groups"]


def _ap2_scalar(x: float) -> float:
    return float(ap2(torch.tensor(x, dtype=torch.float64)))


class ShiftAdaMax(torch.optim.Optimizer):
    """AdaMax whose step multiplications are replaced by power-of-two shifts.

    Defaults follow the Torch7 CIFAR-10 run: ``lr=2**-6``, ``betas=(0.9, 0.999)``,
    ``eps=2**-27``. Group options: ``lr_scale`` (per-layer factor, e.g. Glorot), ``clip``
    (``None`` or a bound for the parameters after each step), ``weight_decay`` (L2 added to the
    gradient).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 2**-6,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 2**-27,
        weight_decay: float = 0.0,
        *,
        lr_scale: float = 1.0,
        clip: float | None = None,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two values in [0, 1), got {betas!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if not lr_scale > 0:
            raise ValueError(f"lr_scale must be > 0, got {lr_scale!r}")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be None or > 0, got {clip!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        lr_scale=lr_scale, clip=clip)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise TypeError("ShiftAdaMax does not support sparse gradients")
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                m, u = state["exp_avg"], state["exp_inf"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                torch.maximum(u.mul_(beta2), grad.abs(), out=u)
                step_size = _ap2_scalar(group["lr"] / (1 - beta1 ** state["step"]))
                update = m / (ap2(u) + group["eps"])
                p.add_(update, alpha=-step_size * group["lr_scale"])
                if group["clip"] is not None:
                    p.clamp_(-group["clip"], group["clip"])
        return loss


def _fans(module: nn.Module) -> tuple[int, int]:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() < 2:
        raise TypeError(
            f"glorot_lr_scale needs a layer with a weight of rank >= 2 (Linear, ConvNd), got "
            f"{type(module).__name__}"
        )
    receptive = math.prod(weight.shape[2:])
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        fan_in = weight.shape[0] * receptive
        fan_out = weight.shape[1] * receptive
    else:
        fan_out = weight.shape[0] * receptive
        fan_in = weight.shape[1] * receptive
    return fan_in, fan_out


def glorot_lr_scale(module: nn.Module, *, power_of_two: bool = False) -> float:
    """Per-layer learning-rate factor ``1 / sqrt(1.5 / (fan_in + fan_out))`` (the inverse of the
    Glorot uniform range, BNN/QNN); ``power_of_two`` rounds it with AP2 as the Torch7 code did."""
    fan_in, fan_out = _fans(module)
    scale = 1.0 / math.sqrt(1.5 / (fan_in + fan_out))
    return _ap2_scalar(scale) if power_of_two else scale


def glorot_param_groups(
    model: nn.Module, *, power_of_two: bool = True, clip: float | None = None
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`ShiftAdaMax`: each layer weight of rank >= 2 gets its own
    group with ``lr_scale=glorot_lr_scale(layer)`` (and ``clip``); all other parameters (biases,
    BN) share one group with ``lr_scale=1``. Follows the Theano code, which scaled only the
    binary weights."""
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(weight, nn.Parameter) and weight.dim() >= 2 and weight.requires_grad
                and id(weight) not in seen):
            seen.add(id(weight))
            groups.append({"params": [weight],
                           "lr_scale": glorot_lr_scale(module, power_of_two=power_of_two),
                           "clip": clip})
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    if rest:
        groups.append({"params": rest, "lr_scale": 1.0, "clip": None})
    return groups
