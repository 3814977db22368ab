"""Bounded weight normalisation (Hoffer et al., "Norm matters", NeurIPS 2018).

The weight of each output channel is ``w = rho * v / ||v||``: the direction ``v`` is learned
and the norm ``rho`` is a fixed buffer set to the weight's norm at the time the normalisation
is applied (per output channel by default, or the mean over channels as in the authors'
code). Because ``rho`` is not learned, the weight norm is bounded and the layer's output
scale cannot drift, which is what makes it robust at low precision.

Implemented as a :mod:`torch.nn.utils.parametrize` parametrization, so the module keeps its
class, ``module.weight`` is the normalised weight, the learned direction is
``module.parametrizations.weight.original`` and ``rho`` sits in the state dict as
``parametrizations.weight.0.rho``. Note that ``w`` is invariant to the scale of ``v``; under
SGD ``||v||`` grows slowly, which lowers the effective learning rate (the authors re-normalise
``v`` every step; here ``v`` is left alone so that the optimizer state stays consistent).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "BoundedWeightNorm",
    "apply_bounded_weight_norm",
    "remove_bounded_weight_norm",
]

_DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
)


def _channel_norms(w: Tensor, dim: int) -> Tensor:
    """L2 norm of ``w`` over every dimension but ``dim``, shaped to broadcast against ``w``."""
    dims = [d for d in range(w.dim()) if d != dim]
    if not dims:
        return w.abs()
    return torch.linalg.vector_norm(w, dim=dims, keepdim=True)


class BoundedWeightNorm(nn.Module):
    """Parametrization ``v -> rho * v / ||v||`` with ``rho`` fixed (a buffer, not a parameter).

    Args:
        weight: the weight whose current per-channel norms become ``rho``.
        dim: the output-channel dimension (0 for Linear/Conv, 1 for ConvTranspose).
        per_channel: ``True`` keeps each channel's own norm; ``False`` uses the mean norm over
            channels for all of them (the authors' choice), which changes the weight once.
        eps: floor for ``||v||`` so that an all-zero channel stays zero instead of NaN.
    """

    def __init__(
        self, weight: Tensor, dim: int = 0, *, per_channel: bool = True, eps: float = 1e-12
    ) -> None:
        super().__init__()
        if not isinstance(weight, Tensor) or weight.dim() == 0:
            raise TypeError("weight must be a tensor with at least one dimension")
        if not -weight.dim() <= dim < weight.dim():
            raise ValueError(f"dim must be in [{-weight.dim()}, {weight.dim() - 1}], got {dim}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.dim = dim % weight.dim()
        self.per_channel = bool(per_channel)
        self.eps = float(eps)
        with torch.no_grad():
            rho = _channel_norms(weight.detach(), self.dim)
            if not self.per_channel:
                rho = torch.full_like(rho, float(rho.mean()))
        self.register_buffer("rho", rho)

    def forward(self, v: Tensor) -> Tensor:
        """The normalised weight ``rho * v / max(||v||, eps)``."""
        return v * (self.rho / _channel_norms(v, self.dim).clamp_min(self.eps))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, per_channel={self.per_channel}"


def _is_bounded(module: nn.Module, name: str) -> bool:
    if not parametrize.is_parametrized(module, name):
        return False
    return any(isinstance(p, BoundedWeightNorm) for p in module.parametrizations[name])


def apply_bounded_weight_norm(
    model: nn.Module,
    *,
    types: Iterable[type[nn.Module]] = _DEFAULT_TYPES,
    name: str = "weight",
    per_channel: bool = True,
) -> nn.Module:
    """Register :class:`BoundedWeightNorm` on ``name`` of every module of one of ``types``.

    Edits ``model`` in place and returns it. Modules that already carry the parametrization
    are skipped; ``ConvTranspose`` weights use ``dim=1`` (their output-channel dimension).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    types = tuple(types)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise TypeError("types must be a non-empty iterable of nn.Module subclasses")
    for module in list(model.modules()):
        if not isinstance(module, types) or _is_bounded(module, name):
            continue
        weight = getattr(module, name, None)
        if not isinstance(weight, Tensor):
            raise ValueError(f"{type(module).__name__} has no tensor attribute {name!r}")
        dim = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
        parametrize.register_parametrization(
            module, name, BoundedWeightNorm(weight, dim, per_channel=per_channel)
        )
    return model


def remove_bounded_weight_norm(model: nn.Module, *, name: str = "weight") -> nn.Module:
    """Bake the normalised weights back into plain parameters (in place); returns ``model``."""
    for module in list(model.modules()):
        if _is_bounded(module, name):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model
