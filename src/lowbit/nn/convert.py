"""convert(): swap ``nn.Linear``/``nn.Conv2d`` for quantized modules, by scheme name.

A scheme (:class:`QuantScheme`) holds the specs for weights, input activations and output
gradients. Schemes are registered by short names (:func:`register_scheme`); the built-in ones:

============  ==================  ==================  =====================  ==========
name          weights             activations         gradients              first/last
============  ==================  ==================  =====================  ==========
fp32          -                   -                   -                      -
w8a8          int8 per channel    uint8 batch / EMA   -                      same
w8a8g8        int8 per channel    uint8 batch / EMA   int8, stochastic (*)   same
w4a4g8        int4 per channel    uint4 batch / EMA   int8, stochastic (*)   w8a8g8
w4a8          int4 per channel    uint8 batch / EMA   -                      w8a8
w4a4          int4 per channel    uint4 batch / EMA   -                      w8a8
w3a3          int3 per channel    uint3 batch / EMA   -                      w8a8
w2a2          int2 per channel    uint2 batch / EMA   -                      w8a8
w2a2g6        int2 per channel    uint2 batch / EMA   int6, stochastic       w8a8
w1a2          binary (+-1)        uint2 batch / EMA   -                      w8a8
w1a2g6        binary (+-1)        uint2 batch / EMA   int6, stochastic       w8a8
w1a1          binary (+-1)        binary (+-1)        -                      w8a8
w1a1g6        binary (+-1)        binary (+-1)        int6, stochastic       w8a8
w1a8, w2a8    binary / int2       uint8 batch / EMA   -                      same
fp8           e5m2                e5m2                e5m2, stochastic (+)   fp32
fp8-rne       e5m2                e5m2                e5m2, nearest (+)      fp32
fp8-hybrid    e4m3 per-tensor     e4m3 per-tensor     e5m2 per-tensor        fp32
              scaled (current)    scaled (current)    scaled, stochastic
============  ==================  ==================  =====================  ==========

Integer weight scales come from the current max |w| of each output channel (symmetric).
Integer activations are affine (unsigned, zero point from the range): in training each batch
is quantized with its own min/max (so nothing is clipped and the straight-through gradient
is the identity, as in the 8-bit training paper's code) while an exponential moving average
of those ranges (PyTorch semantics, momentum 0.1) is kept in buffers and used in eval mode.
The ``g6`` schemes add the QNN paper's 6-bit gradients; ``w1a8``/``w2a8`` are the QNN
first layer (low-bit weights, 8-bit fixed-point inputs), meant for ``overrides``.
``fp8`` follows the FP8 training paper (1-5-2 everywhere, no per-tensor scaling; loss scaling
is the trainer's job); ``fp8-hybrid`` is today's recipe (e4m3 forward with per-tensor scales
from the current max |x|, e5m2 backward with power-of-two per-tensor scales).
The 8-bit-training and FP8 schemes use the quantized backward GEMMs of :mod:`lowbit.nn.qgemm`
(``gemm`` field): (*) gradient bifurcation, the error reaching the layer below is int8 while
the weight gradient is computed from an int16 stochastic copy (Banner et al.); (+) the
weight gradient is rounded to e5m2 too, stochastically, and overflow becomes inf (never
saturates) so the loss scaler skips the step; ``fp8-rne`` rounds errors and weight
gradients to nearest instead (the paper's ablation).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from lowbit.nn import qgemm as _qgemm  # noqa: F401  (registers the quantized-backward gemms)
from lowbit.nn.batchnorm import BATCHNORM_VARIANTS, replace_batchnorm
from lowbit.nn.modules import QConv2d, QLinear, _check_gemm
from lowbit.nn.qlstm import QLSTM
from lowbit.nn.shift_bn import to_shift_batchnorm
from lowbit.quant.spec import QuantSpec, _choices_error, _format_kind

__all__ = [
    "QuantScheme",
    "register_scheme",
    "get_scheme",
    "list_schemes",
    "convert",
    "weight_spec",
    "act_spec",
    "grad_spec",
]


def weight_spec(fmt: Any) -> QuantSpec:
    """The default weight spec for a format: integers per output channel, scale from max |w|
    (``"dynamic"``); minifloats unscaled; binary/ternary as the format defines them."""
    spec = QuantSpec.parse(fmt)
    if _format_kind(spec.format) == "int":
        return QuantSpec.parse(spec, granularity="channel", axis=0, observer="dynamic")
    return QuantSpec.parse(spec, observer="none")


def act_spec(fmt: Any) -> QuantSpec:
    """The default activation spec: integers per tensor, quantized in training with the
    batch's own min/max while an EMA of it (momentum 0.1) is kept for eval (the 8-bit
    training paper's rule); other formats unscaled."""
    spec = QuantSpec.parse(fmt)
    if _format_kind(spec.format) == "int":
        return QuantSpec.parse(spec, observer="ema", train_range="batch")
    return QuantSpec.parse(spec, observer="none")


def grad_spec(fmt: Any) -> QuantSpec:
    """The default gradient spec: per tensor, stochastic rounding, scale from the gradient."""
    spec = QuantSpec.parse(fmt)
    obs = "dynamic" if _format_kind(spec.format) == "int" else "none"
    return QuantSpec.parse(spec, observer=obs, rounding="stochastic")


def _role_spec(value: Any, role: str) -> QuantSpec | None:
    if value is None or isinstance(value, QuantSpec):
        return value
    if isinstance(value, str):
        return {"weight": weight_spec, "act": act_spec, "grad": grad_spec}[role](value)
    if isinstance(value, Mapping):
        return QuantSpec.parse(value)
    raise TypeError(
        f"{role} must be a QuantSpec, a format name, a dict of QuantSpec fields or None, "
        f"got {type(value).__name__}"
    )


@dataclass(frozen=True)
class QuantScheme:
    """Specs for the quantized layers of a model.

    Args:
        weight, act, grad: :class:`QuantSpec`, a format name (expanded with the role's
            defaults: :func:`weight_spec`, :func:`act_spec`, :func:`grad_spec`), a dict of
            spec fields, or ``None`` (not quantized).
        first_last: what the first and last Linear/Conv2d get: ``"same"``, ``"fp32"``,
            ``"int8"`` (alias of ``"w8a8"``), or any registered scheme name.
        gemm: product implementation (see :func:`lowbit.nn.modules.register_gemm`).
        name: label shown in reprs and summaries.
    """

    weight: Any = None
    act: Any = None
    grad: Any = None
    first_last: str = "w8a8"
    gemm: str = "default"
    name: str = "custom"

    def __post_init__(self) -> None:
        for role in ("weight", "act", "grad"):
            object.__setattr__(self, role, _role_spec(getattr(self, role), role))
        if not isinstance(self.first_last, str):
            raise TypeError(f"first_last must be a str, got {type(self.first_last).__name__}")
        _check_gemm(self.gemm)

    __hash__ = None  # type: ignore[assignment]

    @property
    def is_float(self) -> bool:
        """True when the scheme quantizes nothing."""
        return self.weight is None and self.act is None and self.grad is None

    def describe(self) -> str:
        def d(s: QuantSpec | None) -> str:
            return "fp32" if s is None else s.describe()

        return f"{self.name}: weight={d(self.weight)}, act={d(self.act)}, grad={d(self.grad)}"


_SCHEMES: dict[str, QuantScheme] = {}
_ALIASES = {"int8": "w8a8", "none": "fp32"}


def register_scheme(name: str, scheme: QuantScheme, *, overwrite: bool = False) -> QuantScheme:
    """Make ``scheme`` available to :func:`convert` as ``name``."""
    if not isinstance(name, str) or not name:
        raise TypeError("scheme name must be a non-empty str")
    if not isinstance(scheme, QuantScheme):
        raise TypeError(f"scheme must be a QuantScheme, got {type(scheme).__name__}")
    if (name in _SCHEMES or name in _ALIASES) and not overwrite:
        raise ValueError(f"scheme {name!r} is already registered (pass overwrite=True)")
    scheme = replace(scheme, name=name)
    _SCHEMES[name] = scheme
    return scheme


def list_schemes() -> list[str]:
    """Registered scheme names."""
    return sorted(_SCHEMES)


def get_scheme(scheme: str | QuantScheme | None) -> QuantScheme:
    """Resolve a scheme name (``None`` means ``"fp32"``) or pass a QuantScheme through."""
    if scheme is None:
        return _SCHEMES["fp32"]
    if isinstance(scheme, QuantScheme):
        return scheme
    if isinstance(scheme, str):
        for key in (scheme, scheme.lower()):
            key = _ALIASES.get(key, key)
            if key in _SCHEMES:
                return _SCHEMES[key]
        raise _choices_error("scheme", scheme, list_schemes())
    raise TypeError(
        f"scheme must be a scheme name, a QuantScheme or None, got {type(scheme).__name__}"
    )


def _builtin(name: str, weight: Any, act: Any, grad: Any = None, first_last: str = "w8a8",
             **kw: Any) -> None:
    register_scheme(name, QuantScheme(weight, act, grad, first_last=first_last, **kw))


_builtin("fp32", None, None, first_last="same")
_builtin("w8a8", "int8", "uint8", first_last="same")
_builtin("w8a8g8", "int8", "uint8", "int8", first_last="same", gemm="bifurcated")
_builtin("w4a4g8", "int4", "uint4", "int8", first_last="w8a8g8", gemm="bifurcated")
_builtin("w4a8", "int4", "uint8")
_builtin("w4a4", "int4", "uint4")
_builtin("w3a3", "int3", "uint3")
_builtin("w2a2", "int2", "uint2")
_builtin("w2a2g6", "int2", "uint2", "int6")
_builtin("w1a2", "binary", "uint2")
_builtin("w1a2g6", "binary", "uint2", "int6")
_builtin("w1a1", "binary", "binary")
_builtin("w1a1g6", "binary", "binary", "int6")
_builtin("w1a8", "binary", "uint8", first_last="same")
_builtin("w2a8", "int2", "uint8", first_last="same")
_builtin("fp8", "e5m2", "e5m2", "e5m2", first_last="fp32", gemm="fp8")
_builtin("fp8-rne", "e5m2", "e5m2", QuantSpec("e5m2", observer="none", rounding="nearest"),
         first_last="fp32", gemm="fp8-nearest")
_builtin("fp8-hybrid", QuantSpec("e4m3", observer="dynamic"),
         QuantSpec("e4m3", observer="dynamic"),
         QuantSpec("e5m2", observer="dynamic", rounding="stochastic"), first_last="fp32",
         gemm="qbackward")

#: BatchNorm replacements ``convert(norm=...)`` knows (besides ``None``/``"bn"``: keep).
NORMS = (*sorted(BATCHNORM_VARIANTS), "shift")

_SWAPPABLE = {nn.Linear: QLinear, nn.Conv2d: QConv2d, nn.LSTM: QLSTM}
_EDGE_TYPES = (nn.Linear, nn.Conv2d)  # what the first/last rule looks at


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert(model: nn.Module, scheme: str | QuantScheme | None, *,
            overrides: Mapping[str, str | QuantScheme | None] | None = None,
            inplace: bool = False, skip_first_last: bool = True,
            first_last: str | None = None, norm: str | None = None,
            norm_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Swap the ``nn.Linear``/``nn.Conv2d``/``nn.LSTM`` modules of ``model`` for
    QLinear/QConv2d/:class:`~lowbit.nn.qlstm.QLSTM`.

    Only modules whose type is exactly ``nn.Linear``, ``nn.Conv2d`` or ``nn.LSTM`` are
    swapped; everything else (BatchNorm, activations, subclasses such as attention
    projections, modules already quantized) is left as it is. Parameters are shared with the
    original modules (the same ``Parameter`` objects), so with ``inplace=True`` an optimizer
    built before the conversion keeps working. No global state is touched.

    Args:
        model: the float model.
        scheme: a registered scheme name (see :func:`list_schemes`), a :class:`QuantScheme`,
            or ``None``/``"fp32"`` (no-op).
        overrides: ``{module-name pattern: scheme or None}``; patterns are ``fnmatch``
            patterns over the names of ``model.named_modules()``; ``None`` keeps the module
            in float. When several patterns match a module the last one wins; overrides win
            over the first/last rule. A pattern that matches no module is an error.
        inplace: edit ``model`` instead of a deep copy.
        skip_first_last: apply the first/last rule (the first and last Linear/Conv2d modules,
            in registration order, get ``first_last`` precision instead of the scheme's;
            LSTMs always get the scheme).
            ``False`` is the same as ``first_last="same"``.
        first_last: ``"int8"`` (= ``"w8a8"``), ``"same"``, ``"fp32"`` or a scheme name;
            ``None`` takes the scheme's own default (``w8a8`` for low-bit integer schemes,
            ``fp32`` for the FP8 schemes). The rule only applies when ``scheme`` quantizes.
        norm: also swap every ``BatchNorm1d``/``BatchNorm2d`` for a BatchNorm variant of
            :mod:`lowbit.nn.batchnorm`: ``"range"`` (Range BN, Banner et al. 2018), ``"l1"``
            or ``"linf"`` (Hoffer et al. 2018), ``"shift"`` (shift-based BN of BinaryNet/QNN,
            :func:`lowbit.nn.shift_bn.to_shift_batchnorm`); ``None``/``"bn"`` keeps them.
        norm_kwargs: keyword arguments for the variant, e.g. ``{"act_format": "int8",
            "grad_format": "int8"}`` to run it in 8 bits, ``{"num_chunks": 16}``; for
            ``"shift"`` only ``{"momentum": m}``.

    Returns:
        The converted model (``model`` itself when ``inplace``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    main = get_scheme(scheme)
    if norm == "bn":
        norm = None
    if norm is not None and norm not in NORMS:
        raise ValueError(f"norm must be None, 'bn' or one of {list(NORMS)}, got {norm!r}")
    if norm is None and norm_kwargs:
        raise ValueError("norm_kwargs given without a norm to apply them to")
    if norm == "shift" and set(norm_kwargs or {}) - {"momentum"}:
        raise ValueError(
            f"norm='shift' takes only norm_kwargs={{'momentum': ...}}, got {dict(norm_kwargs)!r}"
        )
    if first_last is not None and not isinstance(first_last, str):
        raise TypeError(f"first_last must be a str or None, got {type(first_last).__name__}")
    if not skip_first_last:
        if first_last not in (None, "same"):
            raise ValueError(
                f"skip_first_last=False conflicts with first_last={first_last!r}; pass one"
            )
        first_last = "same"
    fl_name = main.first_last if first_last is None else first_last
    fl_scheme = None if fl_name == "same" else get_scheme(fl_name)

    resolved_overrides: list[tuple[str, QuantScheme]] = []
    if overrides is not None:
        if not isinstance(overrides, Mapping):
            raise TypeError(f"overrides must be a mapping, got {type(overrides).__name__}")
        names = [n for n, _ in model.named_modules() if n]
        for pattern, value in overrides.items():
            if not isinstance(pattern, str):
                raise TypeError(f"override patterns must be str, got {type(pattern).__name__}")
            if not any(fnmatchcase(n, pattern) for n in names):
                msg = f"override pattern {pattern!r} matches no module of the model"
                close = difflib.get_close_matches(pattern, names, n=3)
                if close:
                    msg += f" (close names: {', '.join(close)})"
                raise ValueError(msg)
            resolved_overrides.append((pattern, get_scheme(value)))

    if not inplace:
        model = copy.deepcopy(model)
    candidates = [(n, m) for n, m in model.named_modules() if type(m) in _SWAPPABLE]
    edge_names: set[str] = set()
    edges = [n for n, m in candidates if type(m) in _EDGE_TYPES]
    if fl_scheme is not None and not main.is_float and edges:
        edge_names = {edges[0], edges[-1]}

    for name, mod in candidates:
        chosen = fl_scheme if name in edge_names else main
        for pattern, value in resolved_overrides:
            if fnmatchcase(name, pattern):
                chosen = value
        if chosen.is_float:
            continue
        qcls = _SWAPPABLE[type(mod)]
        # QLSTM has no pluggable gemm: its gates use the default product (the quantized
        # backward of the 8-bit and FP8 schemes applies to Linear/Conv2d only).
        gemm = "default" if qcls is QLSTM else chosen.gemm
        new = qcls.from_float(mod, weight=chosen.weight, act=chosen.act, grad=chosen.grad,
                              gemm=gemm)
        if name:
            _set_submodule(model, name, new)
        else:  # the model itself is a Linear/Conv2d
            model = new
    if norm == "shift":
        to_shift_batchnorm(model, **dict(norm_kwargs or {}))
    elif norm is not None:
        model = replace_batchnorm(model, norm, inplace=True, **dict(norm_kwargs or {}))
    return model
