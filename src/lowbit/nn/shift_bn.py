"""Shift-based batch normalization (Courbariaux, Hubara et al., BNN/QNN).

Every multiplication by a scale is a multiplication by a power of two (a bit shift):
``AP2(z) = sign(z) * 2^round(log2|z|)``. In training, per channel::

    c = x - mean(x);  var = mean(AP2(c) * c);  s = AP2(1 / sqrt(var + eps))
    y = c * s * AP2(gamma) + beta

as in the authors' Torch7 ``BatchNormalizationShiftPow2``; the backward pass is the ordinary BN
gradient with ``AP2(c)`` and ``s`` in place of ``c`` and ``1/std`` (the same code), and gamma's
gradient is ``sum(AP2(c * s) * grad)``. Running statistics follow PyTorch's BatchNorm exactly
(``running_mean`` and ``running_var`` updated as ``(1 - momentum) * old + momentum * new``, the
variance with Bessel's correction; ``momentum=None`` for a cumulative average), so state dicts are
interchangeable with ``nn.BatchNorm``; evaluation uses ``s = AP2(1 / sqrt(running_var + eps))``.
The Torch7 code kept an average of ``1/std`` instead; the default momentum is its 0.125.

:func:`to_shift_batchnorm` swaps a model's BatchNorm layers for these (what
``convert(..., norm="shift")`` and the recipe key ``quant.norm = "shift"`` do), so a model
rebuilt from its recipe, e.g. by ``lowbit eval``, is the one that was trained.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["ShiftBatchNorm1d", "ShiftBatchNorm2d", "ap2", "to_shift_batchnorm"]


def ap2(x: Tensor) -> Tensor:
    """Power-of-two approximation ``sign(x) * 2^round(log2|x|)`` (``0 -> 0``), elementwise.

    The rounding is done on the exponent exactly: with ``|x| = m * 2^e``, ``m`` in ``[0.5, 1)``,
    the result is ``2^e`` when ``(2m)^2 >= 2`` and ``2^(e-1)`` otherwise (exact for float32 and
    narrower inputs). Not differentiable (zero gradient almost everywhere).
    """
    if not x.dtype.is_floating_point:
        raise TypeError(f"ap2 needs a floating-point tensor, got {x.dtype}")
    mantissa, exponent = torch.frexp(x)
    twice = mantissa.abs().double() * 2.0
    exponent = exponent - 1 + (twice * twice >= 2.0).to(exponent.dtype)
    magnitude = torch.ldexp(torch.ones_like(x), exponent)
    return torch.where(x == 0, torch.zeros_like(x), torch.copysign(magnitude, x))


class _ShiftBNFunction(torch.autograd.Function):
    """Training-mode shift BN with the Torch7 backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float,
                dims: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        mean = x.mean(dim=dims, keepdim=True)
        c = x - mean
        c_ap2 = ap2(c)
        var = (c_ap2 * c).mean(dim=dims, keepdim=True)
        s = ap2(torch.rsqrt(var + eps))
        xhat = c * s
        g = ap2(gamma).view(shape) if gamma is not None else None
        y = xhat * g if g is not None else xhat
        if beta is not None:
            y = y + beta.view(shape)
        ctx.dims = dims
        ctx.has_gamma = gamma is not None
        ctx.has_beta = beta is not None
        ctx.save_for_backward(c_ap2, s, xhat, g)
        ctx.mark_non_differentiable(mean, var)
        return y, mean.flatten(), var.flatten()

    @staticmethod
    def backward(ctx, grad: Tensor, _gm: Tensor, _gv: Tensor):  # type: ignore[override]
        c_ap2, s, xhat, g = ctx.saved_tensors
        dims = ctx.dims
        mean_g = grad.mean(dim=dims, keepdim=True)
        mean_cg = (c_ap2 * grad).mean(dim=dims, keepdim=True)
        dx = s * (grad - mean_g - c_ap2 * (s * s) * mean_cg)
        if g is not None:
            dx = dx * g
        dgamma = (ap2(xhat) * grad).sum(dim=dims) if ctx.has_gamma else None
        dbeta = grad.sum(dim=dims) if ctx.has_beta else None
        return dx, dgamma, dbeta, None, None


class _ShiftBatchNorm(_BatchNorm):
    """Shared implementation; subclasses fix the input rank."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.125,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be None or in [0, 1], got {momentum!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)

    def _use_batch_stats(self) -> bool:
        return self.training or self.running_mean is None

    def _ema_factor(self) -> float:
        if self.momentum is not None:
            return self.momentum
        return 1.0 / float(self.num_batches_tracked)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, self.num_features] + [1] * (x.dim() - 2)
        if self._use_batch_stats():
            n = x.numel() // x.shape[1]
            if n < 2:
                raise ValueError(
                    f"shift batch norm needs more than 1 value per channel in training, got "
                    f"input shape {tuple(x.shape)}"
                )
            y, mean, var = _ShiftBNFunction.apply(x, self.weight, self.bias, self.eps, dims)
            if self.training and self.track_running_stats:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    f = self._ema_factor()
                    self.running_mean.mul_(1 - f).add_(mean, alpha=f)
                    self.running_var.mul_(1 - f).add_(var * (n / (n - 1)), alpha=f)
            return y
        y = (x - self.running_mean.view(shape)) * self.inference_scale().view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y

    def inference_scale(self) -> Tensor:
        """Per-channel multiplier used in evaluation: ``AP2(1/sqrt(running_var + eps)) *
        AP2(gamma)``, a signed power of two (a shift)."""
        if self.running_var is None:
            raise ValueError("inference_scale needs track_running_stats=True")
        scale = ap2(torch.rsqrt(self.running_var + self.eps))
        if self.weight is not None:
            scale = scale * ap2(self.weight.detach())
        return scale


class ShiftBatchNorm1d(_ShiftBatchNorm):
    """Shift-based BN over ``[N, C]`` or ``[N, C, L]`` inputs (drop-in for ``nn.BatchNorm1d``)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input [N, C] / [N, C, L], got {x.dim()}D input")


class ShiftBatchNorm2d(_ShiftBatchNorm):
    """Shift-based BN over ``[N, C, H, W]`` inputs (drop-in for ``nn.BatchNorm2d``)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input [N, C, H, W], got {x.dim()}D input")


def to_shift_batchnorm(model: nn.Module, *, momentum: float | None | str = "keep") -> int:
    """Swap, in place, every ``nn.BatchNorm1d``/``2d`` of ``model`` (exactly those types;
    other variants, e.g. Range BN, are left alone) for :class:`ShiftBatchNorm1d`/``2d``.

    The new layers share the old ones' parameters (an optimizer built before keeps working),
    copy their running statistics, ``eps``, affine/tracking flags and train/eval mode; the state
    dict keys do not change. ``momentum="keep"`` keeps each layer's momentum, a number (or
    ``None``, cumulative) sets it for all of them (the Torch7 code used 0.125). Returns the
    number of layers swapped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not (momentum == "keep" or momentum is None
            or (isinstance(momentum, (int, float)) and not isinstance(momentum, bool)
                and 0.0 <= momentum <= 1.0)):
        raise ValueError(f"momentum must be 'keep', None or in [0, 1], got {momentum!r}")
    targets: dict[type, type[_ShiftBatchNorm]] = {
        nn.BatchNorm1d: ShiftBatchNorm1d, nn.BatchNorm2d: ShiftBatchNorm2d}
    count = 0
    for parent in list(model.modules()):
        for name, bn in list(parent.named_children()):
            cls = targets.get(type(bn))
            if cls is None:
                continue
            mom = bn.momentum if momentum == "keep" else momentum
            new = cls(bn.num_features, eps=bn.eps, momentum=mom, affine=bn.affine,
                      track_running_stats=bn.track_running_stats, device="meta")
            if bn.affine:
                new.weight, new.bias = bn.weight, bn.bias
            for buf in ("running_mean", "running_var", "num_batches_tracked"):
                value = getattr(bn, buf)
                setattr(new, buf, None if value is None else value.detach().clone())
            new.train(bn.training)
            setattr(parent, name, new)
            count += 1
    return count
