"""Quantized modules: ``Quantizer``, ``GradQuantizer``, ``QLinear`` and ``QConv2d``.

``QLinear``/``QConv2d`` subclass ``nn.Linear``/``nn.Conv2d`` (so ``isinstance``, optimizers,
initialisers and ``state_dict`` keys ``weight``/``bias`` keep working) and add three optional
quantizers:

* ``weight_quant`` fake-quantizes the weight at every call (the latent FP32 weight stays the
  parameter the optimizer updates);
* ``act_quant`` fake-quantizes the input activation;
* ``grad_quant`` is the identity in forward and quantizes the gradient flowing back from the
  output (:func:`lowbit.quant.quantize_grad`).

The matrix multiply itself is looked up by name in a small registry (:func:`register_gemm`,
default ``"default"``: the float op followed by ``grad_quant``). Later work (quantized
backward passes with gradient bifurcation, real FP8 GEMMs) plugs in there without touching
the modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.quant.functional import fake_quantize, quantize_grad
from lowbit.quant.observers import (
    _check_tensor,
    make_observer,
    qparams_from_range,
    tensor_range,
)
from lowbit.quant.spec import QuantSpec, _choices_error, _format_kind

__all__ = [
    "Quantizer",
    "GradQuantizer",
    "QLinear",
    "QConv2d",
    "register_gemm",
    "list_gemms",
    "quantized_modules",
    "clip_latent_weights",
    "set_calibrating",
    "freeze_observers",
]


def _spec_or_none(spec: Any) -> QuantSpec | None:
    return spec if spec is None else QuantSpec.parse(spec)


class _UnclippedFakeQuantize(torch.autograd.Function):
    """Fake quantization over a range that contains every input value.

    Nothing is clipped, so the clipped straight-through estimator reduces to the identity:
    the forward runs without storing a mask and the backward passes the gradient through.
    """

    @staticmethod
    def forward(ctx, x, quantizer, scale, zero_point):  # noqa: D102
        return quantizer._fq(x, scale, zero_point)  # grad mode is off here: no mask

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None, None, None


class Quantizer(nn.Module):
    """Fake-quantizes a tensor according to a :class:`~lowbit.quant.QuantSpec`.

    With a stateful observer (``"minmax"``, ``"ema"``, ``"percentile"``, ``"mse"``) the
    observer is updated in training mode (unless ``observer.frozen``) and the resulting
    ``scale``/``zero_point`` are kept in buffers, so they are saved by ``state_dict`` and
    used as they are in eval mode. With ``calibrating = True`` the observer is updated in
    any mode and the input passes through unquantized (observe-only calibration).

    Args:
        spec: the spec, or anything :meth:`QuantSpec.parse` accepts.
        axis: default channel axis when the spec has ``granularity`` channel/group but no
            ``axis`` (modules pass 0 for weights, the feature axis for activations).
        channels: number of channels along the axis, sizes the per-channel buffers.
        generator: ``torch.Generator`` for stochastic rounding (``None``: global RNG).
    """

    def __init__(self, spec: Any, *, axis: int | None = None, channels: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        spec = QuantSpec.parse(spec)
        if spec is None:
            raise TypeError("Quantizer needs a spec, got None (leave the quantizer out instead)")
        self.spec = spec
        self.fmt = spec.format
        self.kind = _format_kind(self.fmt)
        if spec.granularity == "tensor":
            self.axis = None
        else:
            self.axis = spec.axis if spec.axis is not None else axis
            if self.axis is None:
                raise ValueError(
                    f"granularity={spec.granularity!r} needs an axis: set QuantSpec.axis"
                )
        self.generator = generator
        self.calibrating = False
        if spec.stateful:
            n = channels if self.axis is not None else None
            self.observer = make_observer(spec.observer, axis=self.axis, channels=n,
                                          fmt=self.fmt, **spec.observer_kwargs)
            shape: tuple[int, ...] = () if self.axis is None else (n or 0,)
            self.register_buffer("scale", torch.ones(shape))
            self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        else:
            self.observer = None
        # the batch's own min/max covers every value: training needs no clipping mask
        self._batch_range_is_full = spec.observer in ("minmax", "ema")
        self._dynamic_range = (spec.observer == "dynamic" and self.kind in ("int", "float")
                               and spec.granularity != "group")

    def _fq(self, x: Tensor, scale: Tensor | None, zero_point: Tensor | None) -> Tensor:
        spec = self.spec
        return fake_quantize(x, self.fmt, scale=scale, zero_point=zero_point, axis=self.axis,
                             group_size=spec.group_size, rounding=spec.rounding,
                             generator=self.generator)

    def _refresh(self) -> None:
        scale, zp = self.observer.compute_qparams(self.fmt, symmetric=self.spec.symmetric)
        if self.scale.shape == scale.shape:  # in place: buffer identity matters (e.g. DDP)
            self.scale.copy_(scale)
            self.zero_point.copy_(zp)
        else:  # per-channel buffers sized by the first batch
            self.scale = scale
            self.zero_point = zp

    def refresh(self) -> None:
        """Recompute ``scale``/``zero_point`` from the observer (after updating it by hand)."""
        if self.observer is None:
            raise RuntimeError(f"observer={self.spec.observer!r} keeps no statistics")
        self._refresh()

    def dynamic_qparams(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and zero point the ``"dynamic"`` observer gives ``x`` (min/max of x)."""
        _check_tensor(x)
        mn, mx = tensor_range(x.detach(), self.axis)
        return qparams_from_range(mn, mx, self.fmt, symmetric=self.spec.symmetric)

    def forward(self, x: Tensor) -> Tensor:
        spec = self.spec
        if not spec.enabled:
            return x
        obs = self.observer
        if obs is None:
            if self._dynamic_range:
                # the range of x itself: nothing is clipped, the STE is the identity
                scale, zp = self.dynamic_qparams(x)
                return self._fq_unclipped(x, scale, None if self.kind == "float" else zp)
            # groups: fake_quantize takes the range of each group itself; minifloats with
            # observer "none" at their native range; binary/ternary as the format defines them
            return self._fq(x, None, None)
        if self.calibrating:
            if not obs.frozen:
                obs.update(x)
                self._refresh()
            return x
        if self.training and not obs.frozen:
            if spec.train_range == "batch":
                mn, mx = obs.batch_range(x)
                obs.update_range(mn, mx)
                self._refresh()
                scale, zp = qparams_from_range(mn, mx, self.fmt, symmetric=spec.symmetric)
                if self._batch_range_is_full:
                    return self._fq_unclipped(x, scale, zp)
                return self._fq(x, scale, zp)
            obs.update(x)
            self._refresh()
        elif not obs.initialized:
            raise RuntimeError(
                f"{self.spec.observer!r} observer has no statistics yet: train the model, or "
                "calibrate it (lowbit.nn.set_calibrating(model, True) and run batches) before "
                "evaluating"
            )
        return self._fq(x, self.scale, self.zero_point)

    def _fq_unclipped(self, x: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
        """fake_quantize with a range known to contain every value of x: identity gradient,
        no mask stored, no backward pass."""
        if not (x.requires_grad and torch.is_grad_enabled()):
            return self._fq(x, scale, zero_point)
        return _UnclippedFakeQuantize.apply(x, self, scale, zero_point)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        if self.observer is not None and self.axis is not None:
            for name in ("scale", "zero_point"):
                key = prefix + name
                current = getattr(self, name)
                if current.numel() == 0 and key in state_dict and state_dict[key].dim() == 1:
                    setattr(self, name, torch.empty(state_dict[key].shape, dtype=current.dtype,
                                                    device=current.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        s = self.spec
        parts = [f"fmt={self.fmt.name}", f"granularity={s.granularity}"]
        if self.axis is not None:
            parts.append(f"axis={self.axis}")
        if s.group_size is not None:
            parts.append(f"group_size={s.group_size}")
        parts.append(f"observer={s.observer}")
        if self.observer is not None and s.train_range != "running":
            parts.append(f"train_range={s.train_range}")
        if s.rounding != "nearest":
            parts.append(f"rounding={s.rounding}")
        if not s.enabled:
            parts.append("enabled=False")
        return ", ".join(parts)


class GradQuantizer(nn.Module):
    """Identity in forward; quantizes the incoming gradient in backward.

    The scale comes from the gradient itself (see :func:`lowbit.quant.quantize_grad`), so
    the spec's observer must be ``"dynamic"`` or ``"none"``. Stochastic rounding draws from
    ``generator`` (``None``: the global RNG).
    """

    def __init__(self, spec: Any, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        spec = QuantSpec.parse(spec)
        if spec is None:
            raise TypeError("GradQuantizer needs a spec, got None")
        if spec.stateful:
            raise ValueError(
                f"gradient quantizers take their scale from the gradient itself; observer must "
                f"be 'dynamic' or 'none', got {spec.observer!r}"
            )
        if spec.granularity == "group":
            raise ValueError("gradient quantizers support granularity 'tensor' or 'channel'")
        if spec.granularity == "channel" and spec.axis is None:
            raise ValueError("granularity='channel' for gradients needs QuantSpec.axis")
        self.spec = spec
        self.fmt = spec.format
        self.axis = spec.axis if spec.granularity == "channel" else None
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        if not self.spec.enabled:
            return x
        return quantize_grad(x, self.fmt, rounding=self.spec.rounding, generator=self.generator,
                             axis=self.axis)

    def extra_repr(self) -> str:
        parts = [f"fmt={self.fmt.name}", f"rounding={self.spec.rounding}"]
        if self.axis is not None:
            parts.append(f"axis={self.axis}")
        return ", ".join(parts)


# ------------------------------------------------------------------------------ gemm registry
GemmFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
_GEMMS: dict[str, GemmFn] = {}


def register_gemm(name: str, fn: GemmFn | None = None, *, overwrite: bool = False) -> Any:
    """Register ``fn(module, x_q, w_q) -> out`` under ``name`` (also usable as a decorator).

    ``module`` is the :class:`QLinear`/:class:`QConv2d` (``module.op(x, w, bias)`` is its
    float op, ``module.bias`` and ``module.grad_quant`` are available); ``x_q`` and ``w_q``
    are the already fake-quantized input and weight. The function owns the forward and
    backward of the product (e.g. a custom ``autograd.Function``).
    """
    if not isinstance(name, str) or not name:
        raise TypeError("gemm name must be a non-empty str")

    def deco(f: GemmFn) -> GemmFn:
        if not callable(f):
            raise TypeError(f"gemm {name!r} must be callable")
        if name in _GEMMS and not overwrite:
            raise ValueError(f"gemm {name!r} is already registered (pass overwrite=True)")
        _GEMMS[name] = f
        return f

    return deco if fn is None else deco(fn)


def list_gemms() -> list[str]:
    """Names accepted by the ``gemm`` argument of the quantized modules."""
    return sorted(_GEMMS)


@register_gemm("default")
def _default_gemm(module: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    out = module.op(x, w, module.bias)
    if module.grad_quant is not None:
        out = module.grad_quant(out)
    return out


def _check_gemm(gemm: str) -> str:
    if gemm not in _GEMMS:
        raise _choices_error("gemm", gemm, list_gemms())
    return gemm


class _QuantizedOp:
    """Shared behaviour of QLinear and QConv2d (not a module by itself)."""

    weight_quant: Quantizer | None
    act_quant: Quantizer | None
    grad_quant: GradQuantizer | None
    gemm: str
    _act_axis: int

    def _init_quantizers(self, weight: Any, act: Any, grad: Any, gemm: str, *,
                         out_channels: int, in_channels: int,
                         device: torch.device | str | None) -> None:
        self.gemm = _check_gemm(gemm)
        wspec, aspec, gspec = _spec_or_none(weight), _spec_or_none(act), _spec_or_none(grad)
        self.weight_quant = None if wspec is None else Quantizer(
            wspec, axis=0, channels=out_channels)
        self.act_quant = None if aspec is None else Quantizer(
            aspec, axis=self._act_axis, channels=in_channels)
        self.grad_quant = None if gspec is None else GradQuantizer(gspec)
        if device is not None and torch.device(device).type != "meta":
            for q in (self.weight_quant, self.act_quant):
                if q is not None:
                    q.to(device)

    def forward(self, x: Tensor) -> Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        w = self.weight if self.weight_quant is None else self.weight_quant(self.weight)
        return _GEMMS[self.gemm](self, x, w)

    def _quant_repr(self) -> str:
        def name(q: Any) -> str:
            return "fp32" if q is None else q.spec.describe()

        s = f"weight={name(self.weight_quant)}, act={name(self.act_quant)}"
        s += f", grad={name(self.grad_quant)}"
        if self.gemm != "default":
            s += f", gemm={self.gemm}"
        return s

    @property
    def weight_format(self) -> str:
        return "fp32" if self.weight_quant is None else self.weight_quant.fmt.name

    @property
    def act_format(self) -> str:
        return "fp32" if self.act_quant is None else self.act_quant.fmt.name


def _adopt(q: nn.Module, mod: nn.Module) -> nn.Module:
    """Give ``q`` the parameters (same objects), device and mode of ``mod``."""
    q.weight = mod.weight
    q.bias = mod.bias
    device = mod.weight.device
    for sub in (q.weight_quant, q.act_quant):
        if sub is not None:
            sub.to(device)
    q.train(mod.training)
    return q


class QLinear(_QuantizedOp, nn.Linear):
    """``nn.Linear`` with optional weight, input-activation and output-gradient quantizers.

    Args:
        weight, act, grad: specs (anything :meth:`QuantSpec.parse` accepts) or ``None``.
            Per-channel weight specs default to axis 0 (output features); per-channel
            activation specs to the last axis (input features).
        gemm: name of the product implementation (:func:`list_gemms`).
    """

    _act_axis = -1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight: Any = None, act: Any = None, grad: Any = None, gemm: str = "default",
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quantizers(weight, act, grad, gemm, out_channels=out_features,
                              in_channels=in_features, device=device)

    def op(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        """The float operation on (already quantized) operands."""
        return F.linear(x, w, bias)

    @classmethod
    def from_float(cls, mod: nn.Linear, *, weight: Any = None, act: Any = None,
                   grad: Any = None, gemm: str = "default") -> QLinear:
        """A QLinear sharing ``mod``'s parameters (the same Parameter objects)."""
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"from_float expects an nn.Linear, got {type(mod).__name__}")
        q = cls(mod.in_features, mod.out_features, mod.bias is not None, weight=weight, act=act,
                grad=grad, gemm=gemm, device="meta", dtype=mod.weight.dtype)
        return _adopt(q, mod)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._quant_repr()}"


class QConv2d(_QuantizedOp, nn.Conv2d):
    """``nn.Conv2d`` with optional weight, input-activation and output-gradient quantizers.

    Per-channel weight specs default to axis 0 (output channels); per-channel activation
    specs to axis 1 (input channels, NCHW). See :class:`QLinear`.
    """

    _act_axis = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", *, weight: Any = None, act: Any = None,
                 grad: Any = None, gemm: str = "default", device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device=device, dtype=dtype)
        self._init_quantizers(weight, act, grad, gemm, out_channels=out_channels,
                              in_channels=in_channels, device=device)

    def op(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        """The float convolution on (already quantized) operands."""
        return self._conv_forward(x, w, bias)

    @classmethod
    def from_float(cls, mod: nn.Conv2d, *, weight: Any = None, act: Any = None,
                   grad: Any = None, gemm: str = "default") -> QConv2d:
        """A QConv2d sharing ``mod``'s parameters (the same Parameter objects)."""
        if not isinstance(mod, nn.Conv2d):
            raise TypeError(f"from_float expects an nn.Conv2d, got {type(mod).__name__}")
        q = cls(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                mod.dilation, mod.groups, mod.bias is not None, mod.padding_mode, weight=weight,
                act=act, grad=grad, gemm=gemm, device="meta", dtype=mod.weight.dtype)
        return _adopt(q, mod)

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self._quant_repr()}"


# ------------------------------------------------------------------------------ model helpers
def quantized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every QLinear/QConv2d in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, _QuantizedOp):
            yield name, m


@torch.no_grad()
def clip_latent_weights(model: nn.Module, bound: float = 1.0) -> int:
    """Clamp the latent weights of binary/ternary-weight layers to ``[-bound, bound]``.

    Call after each ``optimizer.step()`` (the BinaryNet rule: the real-valued weights that
    accumulate updates stay inside the range where the hardtanh STE passes gradient).
    Returns the number of weight tensors clipped.
    """
    if not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0:
        raise ValueError(f"bound must be a positive finite number, got {bound!r}")
    n = 0
    for _, m in quantized_modules(model):
        wq = m.weight_quant
        if wq is not None and wq.kind in ("binary", "ternary"):
            m.weight.clamp_(-bound, bound)
            n += 1
    return n


def _activation_quantizers(model: nn.Module) -> Iterator[Quantizer]:
    for m in model.modules():
        if isinstance(m, Quantizer) and m.observer is not None:
            yield m


def set_calibrating(model: nn.Module, calibrating: bool = True) -> int:
    """Switch every stateful quantizer in ``model`` to (or out of) observe-only calibration.

    While calibrating, observers update in any mode (``model.eval()`` included) and inputs
    pass through unquantized. Returns the number of quantizers switched.
    """
    if not isinstance(calibrating, bool):
        raise TypeError("calibrating must be a bool")
    n = 0
    for q in _activation_quantizers(model):
        q.calibrating = calibrating
        n += 1
    return n


def freeze_observers(model: nn.Module, frozen: bool = True) -> int:
    """Stop (or restart) observer updates everywhere in ``model``; returns the count."""
    if not isinstance(frozen, bool):
        raise TypeError("frozen must be a bool")
    n = 0
    for q in _activation_quantizers(model):
        q.observer.frozen = frozen
        n += 1
    return n
