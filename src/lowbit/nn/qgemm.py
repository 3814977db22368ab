"""Quantized backward passes for ``QLinear``/``QConv2d``: low-precision errors and weight
gradients, with gradient bifurcation.

A product ``y = x W^T + b`` (or a convolution) has three GEMMs: the forward one, the *dgrad*
GEMM ``dx = e W`` that sends the error ``e = dL/dy`` on to the layer below, and the *wgrad*
GEMM ``dW = e^T x``. Here each input of each GEMM can be rounded on its own:

==============  ===================================  =======================================
GEMM            inputs                               rounded by
==============  ===================================  =======================================
forward         activation ``x``, weight ``W``       the module's ``act``/``weight`` specs
                                                     (done before the gemm; not repeated)
dgrad           error ``e``, weight ``W``            the module's ``grad`` spec (the error
                                                     sent to the layer below)
wgrad           error copy ``e'``, activation ``x``  ``wgrad_error``: ``"same"`` (``e'`` is
                                                     the rounded ``e``), ``None`` (FP32), or
                                                     its own spec (gradient bifurcation,
                                                     e.g. a 16-bit copy)
(output)        weight gradient ``dW``               ``wgrad`` (e.g. e5m2, stochastic)
==============  ===================================  =======================================

This is the one mechanism behind both full 8-bit training (Banner et al. 2018: 8-bit
stochastic errors to the layer below, a 16-bit error copy for ``dW``) and FP8 training
(Mellempudi et al. 2019: e5m2 everywhere, errors and weight gradients stochastically
rounded). Each layer runs one ``torch.autograd.Function``: one forward product, and a
backward made of the two backward products only (``torch.ops.aten.convolution_backward``
for convolutions), never a second forward convolution.

Rounding of a backward tensor (:func:`quantize_backward`), by the spec's format and observer:

* signed integer formats: symmetric scale ``max|g| / qmax`` per tensor, per ``axis`` index
  (``granularity="channel"``) or per group of ``group_size`` (``"group"``, integers only);
* minifloats with ``observer="none"``: unscaled, as with loss scaling; a value beyond the
  format's max becomes ``±inf`` (never saturates) so that a dynamic loss scaler sees it;
* minifloats with ``observer="dynamic"``: scaled per tensor (or channel) by the power of two
  that brings ``max|g|`` within range (today's per-tensor scaled FP8); powers of two keep
  ``value / scale`` exactly on the format's grid.

A gradient holding inf/NaN is passed on unrounded, so overflow stays visible to the loss
scaler. Errors are rounded as they arrive, that is while still multiplied by the loss scale
(unscaling first would push small errors under the format's range). Stochastic rounding
draws independent per-element bits from the module's ``grad_quant.generator`` (``None``: the
global generator), in a fixed order per backward call: error, error copy, weight gradient.
Rounding a value already on the grid returns it unchanged.

Gemms registered here (see :func:`register_qgemm` for new ones):

``"qbackward"``       error rounded by ``grad``, used by both backward GEMMs; FP32 ``dW``
``"bifurcated"``      plus a separate int16 stochastic error copy for ``dW`` (Banner et al.)
``"bifurcated-fp32"`` the error copy for ``dW`` left in FP32 (their published code)
``"fp8"``             the e5m2 error for both backward GEMMs, ``dW`` rounded to e5m2
                      stochastically, non-saturating (Mellempudi et al.)
``"fp8-nearest"``     the same with ``dW`` rounded to nearest (the paper's ablation)

The bias gradient is the sum of the wgrad-path error copy, kept in FP32.

Real FP8 products (opt in): ``"fp8-scaled-mm"``, ``"fp8-nearest-scaled-mm"`` and
``"fp8-hybrid-scaled-mm"`` round exactly as ``"fp8"``, ``"fp8-nearest"`` and ``"qbackward"``
(the gemm of the ``fp8-hybrid`` scheme) do, but store the three GEMMs' inputs as real
``torch.float8_e5m2``/``float8_e4m3fn`` tensors with a per-tensor scale (:func:`to_float8`,
lossless for values already on the format's grid) and multiply them with
``torch._scaled_mm`` (FP32 accumulation and output; :func:`float8_mm`). Only ``nn.Linear``
runs there: convolutions keep the simulated product. Where the kernel is missing
(:func:`scaled_mm_supported`: CUDA needs compute capability 8.9+ and has no e5m2 x e5m2
kernel) a GEMM falls back to the simulated product of the same float8 values; the
recorder's :attr:`GemmRecord.kernel` says which ran. Use one with
``dataclasses.replace(get_scheme("fp8"), gemm="fp8-scaled-mm")``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lowbit.formats import get_format
from lowbit.nn.modules import register_gemm
from lowbit.quant.functional import fake_quantize
from lowbit.quant.spec import QuantSpec, _format_kind

__all__ = [
    "QuantizedBackward",
    "GemmRecord",
    "backward_spec",
    "quantize_backward",
    "quantized_linear",
    "quantized_conv2d",
    "float8_linear",
    "record_gemm_inputs",
    "register_qgemm",
    "list_qgemms",
    "get_qgemm",
    "float8_dtype",
    "to_float8",
    "float8_mm",
    "scaled_mm_supported",
]

_SAME = "same"
_TINY = torch.finfo(torch.float32).tiny


# ------------------------------------------------------------------------------------ specs
def backward_spec(value: Any, arg: str = "spec") -> QuantSpec | None:
    """A validated spec for a backward tensor, or ``None`` (left unrounded).

    A format name gets the gradient defaults: integers scaled from ``max|g|``
    (``observer="dynamic"``), minifloats unscaled (``observer="none"``), stochastic rounding.
    A dict is read as QuantSpec fields with those same defaults. Only integer and minifloat
    formats, and only the stateless observers ``"dynamic"``/``"none"``, are accepted.
    """
    if value is None:
        return None
    if isinstance(value, str):
        spec = QuantSpec.parse(value)
        kind = _format_kind(spec.format)
        spec = QuantSpec.parse(spec, observer="dynamic" if kind == "int" else "none",
                               rounding="stochastic")
    elif isinstance(value, Mapping):
        fields = dict(value)
        if "fmt" not in fields:
            raise ValueError(f"{arg}: a dict spec needs a 'fmt' key, got keys {sorted(fields)}")
        kind = _format_kind(QuantSpec.parse(fields["fmt"]).format)
        fields.setdefault("observer", "dynamic" if kind == "int" else "none")
        fields.setdefault("rounding", "stochastic")
        spec = QuantSpec(**fields)
    elif isinstance(value, QuantSpec):
        spec = value
    else:
        raise TypeError(
            f"{arg} must be a format name, a dict of QuantSpec fields, a QuantSpec or None, "
            f"got {type(value).__name__}"
        )
    kind = _format_kind(spec.format)
    if kind not in ("int", "float"):
        raise ValueError(
            f"{arg}: format {spec.format_name!r} cannot round a gradient; choose an integer "
            "format (int8, int16, ...) or a minifloat (e5m2, e4m3, fp16, bf16, ...)"
        )
    if kind == "int" and not spec.format.signed:
        raise ValueError(f"{arg}: gradients are signed; use int{spec.format.bits}, not "
                         f"{spec.format_name!r}")
    if spec.observer not in ("dynamic", "none"):
        raise ValueError(
            f"{arg}: gradients take their scale from themselves; observer must be 'dynamic' or "
            f"'none', got {spec.observer!r}"
        )
    if spec.granularity != "tensor" and spec.axis is None:
        raise ValueError(f"{arg}: granularity={spec.granularity!r} needs an explicit axis")
    if kind == "float" and spec.granularity == "group":
        raise ValueError(f"{arg}: minifloat gradients are scaled per 'tensor' or 'channel'")
    if kind == "float" and spec.observer == "none" and spec.granularity != "tensor":
        raise ValueError(f"{arg}: an unscaled minifloat (observer='none') has no granularity")
    return spec


def _pow2_scale(amax: Tensor, fmt: Any) -> Tensor:
    """The smallest power of two s with amax / s <= fmt.max (at least the tiniest normal)."""
    ratio = (amax.double() / float(fmt.max)).clamp_min(_TINY)
    _, e = torch.frexp(ratio)  # ratio = m * 2**e with 0.5 <= m < 1
    s = torch.ldexp(torch.ones_like(ratio), e.to(ratio.dtype))
    s = torch.where(s / 2 >= ratio, s / 2, s)  # ratio an exact power of two
    return s.clamp_min(_TINY).float()


def quantize_backward(g: Tensor, spec: QuantSpec | None,
                      generator: torch.Generator | None = None) -> Tensor:
    """Round one backward tensor (an error or a weight gradient) as ``spec`` says.

    See the module docstring for the rules; ``spec=None`` (or a disabled spec) returns ``g``.
    A tensor holding inf/NaN is returned unchanged (integer and scaled formats) or with its
    non-finite values kept (unscaled minifloats), so a loss scaler sees the overflow. Integer
    results equal ``fake_quantize(g, fmt, axis=..., rounding=..., generator=...)`` bit for bit.
    """
    if spec is None or not spec.enabled:
        return g
    fmt = spec.format
    kind = _format_kind(fmt)
    if kind == "float" and spec.observer == "none":
        return fake_quantize(g, fmt, rounding=spec.rounding, generator=generator, saturate=False)
    gd = g.detach()
    if spec.granularity == "group":  # integers only (checked by backward_spec)
        if not bool(torch.isfinite(gd).all()):
            return g
        return fake_quantize(g, fmt, axis=spec.axis, group_size=spec.group_size,
                             rounding=spec.rounding, generator=generator)
    # one pass for the range, which also reveals inf/NaN (both propagate through max)
    axis = None
    if spec.granularity == "tensor":
        lo, hi = torch.aminmax(gd)
        amax = torch.maximum(-lo, hi)
    else:
        axis = spec.axis % g.dim()
        amax = gd.abs().amax(dim=[d for d in range(g.dim()) if d != axis])
    if not bool(torch.isfinite(amax).all()):
        return g
    if kind == "int":  # symmetric, as choose_qparams
        scale = (amax.to(torch.float32) / fmt.qmax).clamp_min(_TINY)
        return fake_quantize(g, fmt, scale=scale, axis=axis, rounding=spec.rounding,
                             generator=generator)
    return fake_quantize(g, fmt, scale=_pow2_scale(amax, fmt), axis=axis,
                         rounding=spec.rounding, generator=generator, saturate=True)


@dataclass(frozen=True)
class QuantizedBackward:
    """How the backward GEMMs of a layer round their inputs (beside the error spec).

    Args:
        wgrad_error: the error copy that computes the weight gradient: ``"same"`` (the error
            as rounded for the layer below), ``None`` (the error as received, FP32) or a spec
            (format name, dict or QuantSpec; see :func:`backward_spec`) for a separate copy
            (gradient bifurcation: ``"int16"``, ``"fp16"``, ...).
        wgrad: spec for the weight gradient the wgrad GEMM produces, or ``None`` (FP32).
    """

    wgrad_error: Any = _SAME
    wgrad: Any = None

    def __post_init__(self) -> None:
        if not (isinstance(self.wgrad_error, str) and self.wgrad_error == _SAME):
            object.__setattr__(self, "wgrad_error", backward_spec(self.wgrad_error, "wgrad_error"))
        object.__setattr__(self, "wgrad", backward_spec(self.wgrad, "wgrad"))

    __hash__ = None  # type: ignore[assignment]

    def describe(self) -> str:
        def d(s: Any) -> str:
            if s is None:
                return "fp32"
            return s if isinstance(s, str) else s.describe()

        return f"wgrad_error={d(self.wgrad_error)}, wgrad={d(self.wgrad)}"


# ---------------------------------------------------------------------------- the recorder
@dataclass(frozen=True)
class GemmRecord:
    """The inputs of one GEMM, as captured by :func:`record_gemm_inputs`.

    ``stage`` is ``"forward"`` (``a`` = activation, ``b`` = weight), ``"dgrad"`` (``a`` =
    error sent below, ``b`` = weight), ``"wgrad"`` (``a`` = error copy, ``b`` = activation) or
    ``"weight_grad"`` (``a`` = the rounded weight gradient, ``b`` = None). ``tag`` is the
    module given to the gemm (or None for the functional forms). ``kernel`` is
    ``"scaled_mm"`` when the product ran on real float8 tensors (``a`` and ``b`` are then
    their dequantized values) and ``"float"`` otherwise.
    """

    stage: str
    a: Tensor
    b: Tensor | None
    tag: Any = None
    kernel: str = "float"


_recorders: list[list[GemmRecord]] = []  # process-wide: CUDA backward runs in another thread
_recorders_lock = threading.Lock()


def _record(stage: str, a: Tensor, b: Tensor | None, tag: Any, kernel: str = "float") -> None:
    if _recorders:
        r = GemmRecord(stage, a.detach().clone(), None if b is None else b.detach().clone(), tag,
                       kernel)
        with _recorders_lock:
            for lst in _recorders:
                lst.append(r)


@contextmanager
def record_gemm_inputs() -> Iterator[list[GemmRecord]]:
    """Collect a :class:`GemmRecord` for every GEMM run by the quantized-backward functions
    (forward and backward, in any thread) while the block runs. For tests and inspection."""
    lst: list[GemmRecord] = []
    with _recorders_lock:
        _recorders.append(lst)
    try:
        yield lst
    finally:
        with _recorders_lock:  # by identity: two recorders may hold equal lists
            del _recorders[next(i for i, r in enumerate(_recorders) if r is lst)]


# ------------------------------------------------------------------------- autograd funcs
@dataclass(frozen=True)
class _Plan:
    error: QuantSpec | None
    wgrad_error: Any
    wgrad: QuantSpec | None
    generator: torch.Generator | None
    tag: Any

    def errors(self, g: Tensor, need_dgrad: bool, need_wgrad: bool) -> tuple[Tensor, Tensor]:
        """(error for dgrad, error copy for wgrad), drawn in that order."""
        same = isinstance(self.wgrad_error, str)
        e = g
        if need_dgrad or (need_wgrad and same):
            e = quantize_backward(g, self.error, self.generator)
        if not need_wgrad:
            return e, g
        ew = e if same else quantize_backward(g, self.wgrad_error, self.generator)
        return e, ew


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, plan):  # noqa: D102
        _record("forward", x, w, plan.tag)
        ctx.save_for_backward(x, w)
        ctx.plan = plan
        return F.linear(x, w, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # noqa: D102
        x, w = ctx.saved_tensors
        plan: _Plan = ctx.plan
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        e, ew = plan.errors(g, need_x, need_w or need_b)
        gx = gw = gb = None
        if need_x:
            _record("dgrad", e, w, plan.tag)
            gx = e.matmul(w)
        if need_w or need_b:
            ew2 = ew.reshape(-1, ew.shape[-1])
            if need_w:
                x2 = x.reshape(-1, x.shape[-1])
                _record("wgrad", ew2, x2, plan.tag)
                gw = quantize_backward(ew2.t().mm(x2), plan.wgrad, plan.generator)
                _record("weight_grad", gw, None, plan.tag)
            if need_b:
                gb = ew2.sum(0)
        return gx, gw, gb, None


class _Conv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, plan, stride, padding, dilation, groups):  # noqa: D102
        _record("forward", x, w, plan.tag)
        ctx.save_for_backward(x, w)
        ctx.plan = plan
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = b is not None
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # noqa: D102
        x, w = ctx.saved_tensors
        plan: _Plan = ctx.plan
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        e, ew = plan.errors(g, need_x, need_w or need_b)
        bwd = torch.ops.aten.convolution_backward
        gx = gw = gb = None
        if need_x:
            _record("dgrad", e, w, plan.tag)
            gx = bwd(e, x, w, None, stride, padding, dilation, False, [0, 0], groups,
                     [True, False, False])[0]
        if need_w or need_b:
            if need_w:
                _record("wgrad", ew, x, plan.tag)
            bias_sizes = [w.shape[0]] if need_b else None
            _, gw, gb = bwd(ew, x, w, bias_sizes, stride, padding, dilation, False, [0, 0],
                            groups, [False, need_w, need_b])
            if need_w:
                gw = quantize_backward(gw, plan.wgrad, plan.generator)
                _record("weight_grad", gw, None, plan.tag)
        return gx, gw, gb, None, None, None, None, None


def _plan(error: Any, backward: QuantizedBackward, generator: torch.Generator | None,
          tag: Any) -> _Plan:
    if not isinstance(backward, QuantizedBackward):
        raise TypeError(f"backward must be a QuantizedBackward, got {type(backward).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
    return _Plan(backward_spec(error, "error"), backward.wgrad_error, backward.wgrad, generator, tag)


def _pair(v: Any, name: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(
            isinstance(i, int) and not isinstance(i, bool) for i in v):
        return (int(v[0]), int(v[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def quantized_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                     error: Any = None, backward: QuantizedBackward | None = None,
                     generator: torch.Generator | None = None, _tag: Any = None) -> Tensor:
    """``F.linear(x, weight, bias)`` whose backward rounds the error with ``error`` (a spec,
    see :func:`backward_spec`) and the weight-gradient path as ``backward`` says.

    ``x`` and ``weight`` are used as given (round them beforehand for a quantized forward).
    """
    plan = _plan(error, backward or QuantizedBackward(), generator, _tag)
    return _LinearFn.apply(x, weight, bias, plan)


def quantized_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1,
                     padding: Any = 0, dilation: Any = 1, groups: int = 1, *,
                     error: Any = None, backward: QuantizedBackward | None = None,
                     generator: torch.Generator | None = None, _tag: Any = None) -> Tensor:
    """``F.conv2d`` (integer padding) with the quantized backward of
    :func:`quantized_linear`. The backward computes the input and weight gradients with
    ``torch.ops.aten.convolution_backward``; no forward convolution is repeated."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    plan = _plan(error, backward or QuantizedBackward(), generator, _tag)
    return _Conv2dFn.apply(x, weight, bias, plan, list(_pair(stride, "stride")),
                           list(_pair(padding, "padding")), list(_pair(dilation, "dilation")),
                           groups)


# ------------------------------------------------------------------- real FP8 products
_FLOAT8_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in (("e5m2", "float8_e5m2"),
                                                  ("e4m3", "float8_e4m3fn"))
    if hasattr(torch, attr)
}
_SCALINGS = ("none", "pow2", "amax")
_probe_cache: dict[tuple[torch.dtype, torch.dtype], bool] = {}


def float8_dtype(fmt: Any) -> torch.dtype:
    """The torch float8 dtype storing format ``fmt`` exactly: ``"e5m2"`` ->
    ``torch.float8_e5m2``, ``"e4m3"`` (OCP e4m3fn) -> ``torch.float8_e4m3fn``."""
    name = get_format(fmt).name
    if name not in _FLOAT8_DTYPES:
        raise ValueError(f"fmt: real float8 storage exists for {sorted(_FLOAT8_DTYPES)}, "
                         f"not {name!r}")
    return _FLOAT8_DTYPES[name]


def to_float8(t: Tensor, fmt: Any, *, scaling: str = "none") -> tuple[Tensor, Tensor]:
    """Store ``t`` as a real float8 tensor ``t8`` and a float32 scalar ``scale`` with
    ``t8.float() * scale`` equal to ``t``.

    The result is exact when ``t`` already lies on the format's grid under the matching
    scaling (as the fake quantizers leave it); otherwise ``t / scale`` is rounded to nearest.

    Args:
        t: the tensor (any float dtype).
        fmt: ``"e5m2"`` or ``"e4m3"``.
        scaling: ``"none"`` (scale 1: unscaled minifloats, the FP8 paper), ``"pow2"`` (the
            smallest power of two with ``max|t| / scale <= fmt.max``: the power-of-two
            scaled gradients of :func:`quantize_backward`) or ``"amax"``
            (``max|t| / fmt.max``: the per-tensor ``"dynamic"`` observer of the forward
            quantizers, whose largest value lands on ``fmt.max``).

    A non-finite ``t`` is cast with scale 1, so inf/NaN survive (e4m3fn turns inf into NaN).
    """
    if scaling not in _SCALINGS:
        raise ValueError(f"scaling must be one of {list(_SCALINGS)}, got {scaling!r}")
    if not isinstance(t, Tensor):
        raise TypeError(f"t must be a Tensor, got {type(t).__name__}")
    dtype = float8_dtype(fmt)
    f = get_format(fmt)
    one = torch.ones((), dtype=torch.float32, device=t.device)
    t = t.detach()
    if scaling == "none" or t.numel() == 0:
        return t.to(dtype), one
    amax = t.abs().amax().float()
    if not bool(torch.isfinite(amax)):
        return t.to(dtype), one
    if scaling == "pow2":
        scale = _pow2_scale(amax, f)
    else:
        scale = (amax / float(f.max)).clamp_min(_TINY)
    return (t.float() / scale).to(dtype), scale


def scaled_mm_supported(device: torch.device | str, a_dtype: torch.dtype = torch.float8_e4m3fn,
                        b_dtype: torch.dtype = torch.float8_e4m3fn) -> bool:
    """Whether ``torch._scaled_mm`` multiplies these float8 dtypes on ``device``.

    CUDA: compute capability 8.9 or newer, and not e5m2 x e5m2 (cuBLASLt has no such
    kernel). CPU: probed once per dtype pair with a tiny product (this torch's CPU build
    runs all four pairs through oneDNN). Other devices: False.
    """
    device = torch.device(device)
    if not hasattr(torch, "_scaled_mm"):
        return False
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        e5m2 = _FLOAT8_DTYPES.get("e5m2")
        if a_dtype == e5m2 and b_dtype == e5m2:
            return False
        return torch.cuda.get_device_capability(device) >= (8, 9)
    if device.type != "cpu":
        return False
    key = (a_dtype, b_dtype)
    if key not in _probe_cache:
        try:
            a = torch.ones(16, 16).to(a_dtype)
            b = torch.ones(16, 16).to(b_dtype)
            one = torch.ones(())
            out = torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
            _probe_cache[key] = bool((out == 16).all())
        except (RuntimeError, NotImplementedError, TypeError):
            _probe_cache[key] = False
    return _probe_cache[key]


def _padded(t: Tensor, rows: int, cols: int) -> Tensor:
    """``t`` as a contiguous row-major ``[rows, cols]`` tensor, zero padded."""
    if tuple(t.shape) == (rows, cols):
        return t.contiguous()
    out = t.new_zeros(rows, cols)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def float8_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, *,
              pad_to: int | None = None) -> Tensor:
    """``(a * scale_a) @ (b * scale_b)`` in float32 from float8 matrices, by
    ``torch._scaled_mm`` (FP32 accumulation, ``use_fast_accum=False``).

    ``a`` is made row-major and ``b`` column-major, as cuBLASLt wants; with ``pad_to``
    (default 16 on CUDA, where every dimension must be a multiple of 16, else 1) the
    operands are zero padded, which adds exact zeros to every sum, and the result cut back.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"float8_mm needs [m, k] @ [k, n] matrices, got {tuple(a.shape)} @ "
                         f"{tuple(b.shape)}")
    if pad_to is None:
        pad_to = 16 if a.is_cuda else 1
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1:
        raise ValueError(f"pad_to must be a positive int, got {pad_to!r}")
    m, k = a.shape
    n = b.shape[1]

    def up(v: int) -> int:
        return -(-v // pad_to) * pad_to

    a2 = _padded(a, up(m), up(k))
    b2 = _padded(b.t(), up(n), up(k)).t()  # column-major [k, n]
    out = torch._scaled_mm(a2, b2, scale_a=scale_a.float().reshape(()),
                           scale_b=scale_b.float().reshape(()), out_dtype=torch.float32,
                           use_fast_accum=False)
    return out[:m, :n]


@dataclass(frozen=True)
class _Float8Operand:
    fmt: Any
    scaling: str


def _operand(spec: QuantSpec | None, what: str, backward: bool) -> _Float8Operand:
    """How a GEMM input rounded by ``spec`` is stored in float8 (or a ValueError)."""
    if spec is None or not spec.enabled:
        raise ValueError(f"the real-FP8 gemms need the {what} quantized to e5m2 or e4m3; it "
                         "is left in FP32 (use the simulated gemm for this layer)")
    name = spec.format_name
    if name not in _FLOAT8_DTYPES:
        raise ValueError(f"the real-FP8 gemms store e5m2 or e4m3; the {what} is {name!r}")
    if spec.granularity != "tensor":
        raise ValueError(f"the real-FP8 gemms take one scale per tensor; the {what} is scaled "
                         f"per {spec.granularity!r}")
    if spec.observer == "none":
        return _Float8Operand(spec.format, "none")
    if spec.observer == "dynamic":
        return _Float8Operand(spec.format, "pow2" if backward else "amax")
    raise ValueError(f"the real-FP8 gemms need the {what} scale from the tensor itself "
                     f"(observer 'none' or 'dynamic'), got observer {spec.observer!r}")


@dataclass(frozen=True)
class _Float8Plan:
    x: _Float8Operand
    w: _Float8Operand
    error: _Float8Operand
    wgrad_error: _Float8Operand | None  # None: "same"


def _parse_or_none(spec: Any) -> QuantSpec | None:
    return None if spec is None else QuantSpec.parse(spec)


def _mm8(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, str]:
    """(a8 * sa) @ (b8 * sb) on the float8 kernel where there is one, else in float32."""
    (a8, sa), (b8, sb) = a, b
    if scaled_mm_supported(a8.device, a8.dtype, b8.dtype):
        return float8_mm(a8, b8, sa, sb), "scaled_mm"
    return (a8.float() * sa).mm(b8.float() * sb), "float"


def _deq(t: tuple[Tensor, Tensor]) -> Tensor:
    return t[0].float() * t[1]


class _Float8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, plan, fplan):  # noqa: D102
        x2 = x.reshape(-1, x.shape[-1])
        x8 = to_float8(x2, fplan.x.fmt, scaling=fplan.x.scaling)
        w8 = to_float8(w, fplan.w.fmt, scaling=fplan.w.scaling)
        wt8 = (w8[0].t(), w8[1])
        y, kernel = _mm8(x8, wt8)
        if _recorders:  # dequantize only for a recorder
            _record("forward", _deq(x8).reshape(x.shape), _deq(w8), plan.tag, kernel)
        if b is not None:
            y = y + b
        ctx.save_for_backward(x8[0], x8[1], w8[0], w8[1])
        ctx.plan, ctx.fplan, ctx.x_shape = plan, fplan, x.shape
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # noqa: D102
        x8, sx, w8, sw = ctx.saved_tensors
        plan: _Plan = ctx.plan
        fplan: _Float8Plan = ctx.fplan
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        e, ew = plan.errors(g, need_x, need_w or need_b)
        e2 = e.reshape(-1, e.shape[-1])
        e8 = to_float8(e2, fplan.error.fmt, scaling=fplan.error.scaling) if (
            need_x or fplan.wgrad_error is None) else None
        gx = gw = gb = None
        if need_x:
            gx, kernel = _mm8(e8, (w8, sw))
            if _recorders:  # dequantize only for a recorder
                _record("dgrad", _deq(e8).reshape(e.shape), _deq((w8, sw)), plan.tag, kernel)
            gx = gx.reshape(ctx.x_shape)
        if need_w or need_b:
            ew2 = ew.reshape(-1, ew.shape[-1])
            if fplan.wgrad_error is None:
                ew8 = e8
            else:
                ew8 = to_float8(ew2, fplan.wgrad_error.fmt, scaling=fplan.wgrad_error.scaling)
            if need_w:
                gw, kernel = _mm8((ew8[0].t(), ew8[1]), (x8, sx))
                if _recorders:  # dequantize only for a recorder
                    _record("wgrad", _deq(ew8), _deq((x8, sx)), plan.tag, kernel)
                gw = quantize_backward(gw, plan.wgrad, plan.generator)
                _record("weight_grad", gw, None, plan.tag)
            if need_b:
                gb = ew2.sum(0)
        return gx, gw, gb, None, None


def float8_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                  x_spec: Any, weight_spec: Any, error: Any,
                  backward: QuantizedBackward | None = None,
                  generator: torch.Generator | None = None, _tag: Any = None) -> Tensor:
    """:func:`quantized_linear` with its three GEMMs run on real float8 tensors
    (:func:`to_float8`, :func:`float8_mm`).

    ``x`` and ``weight`` must already be rounded by ``x_spec`` and ``weight_spec`` (what the
    module's quantizers do); those specs, the ``error`` spec and the wgrad error copy must
    be per-tensor e5m2/e4m3, unscaled (observer ``"none"``) or ``"dynamic"``. The rounding
    (and the random draws of stochastic rounding) are those of :func:`quantized_linear`,
    so the two agree up to the order of the FP32 accumulation.
    """
    backward = backward or QuantizedBackward()
    plan = _plan(error, backward, generator, _tag)
    same = isinstance(backward.wgrad_error, str)
    fplan = _Float8Plan(
        _operand(_parse_or_none(x_spec), "input activation", False),
        _operand(_parse_or_none(weight_spec), "weight", False),
        _operand(plan.error, "error", True),
        None if same else _operand(backward.wgrad_error, "weight-gradient error copy", True),
    )
    return _Float8LinearFn.apply(x, weight, bias, plan, fplan)


# ------------------------------------------------------------------------------ the gemms
_QGEMMS: dict[str, QuantizedBackward] = {}


def _module_error(module: nn.Module) -> tuple[QuantSpec | None, torch.Generator | None]:
    gq = getattr(module, "grad_quant", None)
    if gq is None:
        return None, None
    return (gq.spec if gq.spec.enabled else None), gq.generator


def _quantizer_spec(q: Any) -> QuantSpec | None:
    return None if q is None else q.spec


def _make_gemm(cfg: QuantizedBackward, kernel: str = "simulated"):
    def gemm(module: nn.Module, x: Tensor, w: Tensor) -> Tensor:
        error, generator = _module_error(module)
        if kernel == "scaled_mm" and isinstance(module, nn.Linear):
            return float8_linear(x, w, module.bias,
                                 x_spec=_quantizer_spec(getattr(module, "act_quant", None)),
                                 weight_spec=_quantizer_spec(getattr(module, "weight_quant",
                                                                     None)),
                                 error=error, backward=cfg, generator=generator, _tag=module)
        if isinstance(module, nn.Conv2d):
            padding: Any = module.padding
            if module.padding_mode != "zeros" or isinstance(padding, str):
                if padding != "valid":
                    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
                    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
                padding = 0
            return quantized_conv2d(x, w, module.bias, module.stride, padding, module.dilation,
                                    module.groups, error=error, backward=cfg,
                                    generator=generator, _tag=module)
        if isinstance(module, nn.Linear):
            return quantized_linear(x, w, module.bias, error=error, backward=cfg,
                                    generator=generator, _tag=module)
        raise TypeError(
            f"the quantized-backward gemms serve Linear and Conv2d modules, got "
            f"{type(module).__name__}"
        )

    return gemm


_KERNELS = ("simulated", "scaled_mm")


def register_qgemm(name: str, backward: QuantizedBackward | None = None, *,
                   wgrad_error: Any = _SAME, wgrad: Any = None, kernel: str = "simulated",
                   overwrite: bool = False) -> QuantizedBackward:
    """Register a quantized-backward gemm under ``name`` (usable as ``QuantScheme(gemm=name)``).

    Pass a :class:`QuantizedBackward`, or its fields ``wgrad_error`` and ``wgrad``. The error
    sent to the layer below is rounded by each module's own ``grad`` spec. ``kernel``:
    ``"simulated"`` (float products of the rounded values) or ``"scaled_mm"`` (Linear layers
    multiply real float8 tensors, see :func:`float8_linear`; convolutions stay simulated).
    """
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {list(_KERNELS)}, got {kernel!r}")
    if backward is None:
        backward = QuantizedBackward(wgrad_error=wgrad_error, wgrad=wgrad)
    elif not isinstance(backward, QuantizedBackward):
        raise TypeError(f"backward must be a QuantizedBackward, got {type(backward).__name__}")
    if kernel == "scaled_mm" and not isinstance(backward.wgrad_error, str):
        _operand(backward.wgrad_error, "weight-gradient error copy", True)  # raises if not FP8
    register_gemm(name, _make_gemm(backward, kernel), overwrite=overwrite)
    _QGEMMS[name] = backward
    return backward


def list_qgemms() -> list[str]:
    """Names of the registered quantized-backward gemms."""
    return sorted(_QGEMMS)


def get_qgemm(name: str) -> QuantizedBackward:
    """The configuration behind a quantized-backward gemm name."""
    if name not in _QGEMMS:
        raise ValueError(f"gemm={name!r} is not a quantized-backward gemm; choose one of "
                         f"{', '.join(map(repr, list_qgemms()))}")
    return _QGEMMS[name]


register_qgemm("qbackward", wgrad_error=_SAME)
register_qgemm("bifurcated", wgrad_error="int16")
register_qgemm("bifurcated-fp32", wgrad_error=None)
register_qgemm("fp8", wgrad_error=_SAME, wgrad="e5m2")
register_qgemm("fp8-nearest", wgrad_error=_SAME,
               wgrad=QuantSpec("e5m2", observer="none", rounding="nearest"))
register_qgemm("fp8-scaled-mm", get_qgemm("fp8"), kernel="scaled_mm")
register_qgemm("fp8-nearest-scaled-mm", get_qgemm("fp8-nearest"), kernel="scaled_mm")
register_qgemm("fp8-hybrid-scaled-mm", get_qgemm("qbackward"), kernel="scaled_mm")
