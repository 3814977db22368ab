"""Fake quantization (quantize then dequantize) with straight-through gradients.

:func:`fake_quantize` is the quantizer contract of lowbit; :func:`quantize_grad` rounds the
gradient flowing backwards instead. Float32 tensors use a fused C++ kernel
(:mod:`lowbit.kernels.fake_quant`) when it is available; everything else, and the reference the
kernel is tested against, is the plain-torch code in this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.formats import (
    BinaryFormat,
    FloatFormat,
    Format,
    IntFormat,
    TernaryFormat,
    get_format,
)
from lowbit.formats.rounding import (
    check_rounding,
    draw_seed,
    random_bits31,
    round_to_float_format,
    stochastic_round,
)

__all__ = ["fake_quantize", "quantize_grad", "choose_qparams"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TINY = torch.finfo(torch.float32).tiny
_TWO31 = float(2**31)

ScaleLike = float | torch.Tensor


# --------------------------------------------------------------------------------------------
# argument checking and layouts
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    """Which elements share a scale: one per tensor, per channel along ``axis``, or per group of
    ``group_size`` consecutive elements along ``axis`` (the last group may be shorter)."""

    shape: tuple[int, ...]
    axis: int | None = None
    group_size: int | None = None

    @property
    def kind(self) -> str:
        if self.axis is None:
            return "tensor"
        return "channel" if self.group_size is None else "group"

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Shape of the scale / zero point tensors for this layout."""
        if self.axis is None:
            return ()
        if self.group_size is None:
            return (self.shape[self.axis],)
        shape = list(self.shape)
        shape[self.axis] = -(-shape[self.axis] // self.group_size)
        return tuple(shape)

    def expand(self, p: torch.Tensor) -> torch.Tensor:
        """Broadcast per-tensor/channel/group parameters ``p`` (param_shape) against x."""
        if self.axis is None:
            return p.reshape(())
        if self.group_size is None:
            view = [1] * len(self.shape)
            view[self.axis] = -1
            return p.reshape(view)
        full = p.repeat_interleave(self.group_size, dim=self.axis)
        return full.narrow(self.axis, 0, self.shape[self.axis])

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """x rearranged so that each scale's elements lie along the last dim (zero padded for a
        short last group); the leading dims have param_shape's layout (axis moved last)."""
        if self.axis is None:
            return x.reshape(1, -1)
        if self.group_size is None:
            return x.movedim(self.axis, 0).reshape(self.shape[self.axis], -1)
        k = self.group_size
        xm = x.movedim(self.axis, -1)
        n = xm.shape[-1]
        pad = -n % k
        if pad:
            xm = torch.nn.functional.pad(xm, (0, pad))
        return xm.reshape(*xm.shape[:-1], (n + pad) // k, k)

    def ungroup(self, stats: torch.Tensor) -> torch.Tensor:
        """Per-scale statistics from :meth:`grouped` back to param_shape."""
        if self.axis is None:
            return stats.reshape(())
        if self.group_size is None:
            return stats.reshape(-1)
        return stats.movedim(-1, self.axis)

    def group_counts(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Number of real (unpadded) elements behind each statistic of :meth:`grouped`."""
        if self.axis is None:
            return torch.tensor(float(math.prod(self.shape)), dtype=dtype, device=device)
        if self.group_size is None:
            count = math.prod(self.shape) // self.shape[self.axis]
            return torch.tensor(float(count), dtype=dtype, device=device)
        n, k = self.shape[self.axis], self.group_size
        counts = torch.full((-(-n // k),), float(k), dtype=dtype, device=device)
        if n % k:
            counts[-1] = n % k
        return counts


def _check_tensor(x: object, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64), "
            f"got {x.dtype}"
        )
    return x


def _make_layout(x: torch.Tensor, axis: int | None, group_size: int | None) -> _Layout:
    shape = tuple(x.shape)
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
        if axis is None:
            axis = -1
    if axis is None:
        return _Layout(shape)
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int or None, got {type(axis).__name__}")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(
            f"axis {axis} does not exist for a tensor with {len(shape)} dims "
            f"(valid: {-len(shape)}..{len(shape) - 1} or None)"
        )
    return _Layout(shape, axis % len(shape), group_size)


def _check_param_shape(p: torch.Tensor, layout: _Layout, name: str) -> torch.Tensor:
    """Accept a single value (broadcast) or exactly the layout's parameter shape."""
    want = layout.param_shape
    if p.numel() == 1 and (p.dim() == 0 or layout.kind == "tensor"):
        return p.reshape(()) if layout.kind == "tensor" else p.reshape(()).expand(want)
    if tuple(p.shape) != want:
        hint = {
            "tensor": "a single value (pass axis= for per-channel parameters)",
            "channel": f"shape {want} (one per channel along axis {layout.axis})",
            "group": f"shape {want} (one per group of {layout.group_size} along axis "
            f"{layout.axis})",
        }[layout.kind]
        raise ValueError(f"{name} has shape {tuple(p.shape)}; expected {hint}")
    return p


def _bad_scale(value: float) -> ValueError:
    return ValueError(
        f"scale must be finite and at least {_TINY:.3g} (the smallest normal float32), "
        f"got {value!r}"
    )


def _as_scale(scale: ScaleLike, layout: _Layout) -> torch.Tensor:
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.Tensor)):
        raise TypeError(f"scale must be a float, a tensor or None, got {type(scale).__name__}")
    if isinstance(scale, torch.Tensor):
        if scale.is_complex() or scale.dtype == torch.bool:
            raise TypeError(f"scale must be a real tensor, got {scale.dtype}")
        s = scale.detach().to(torch.float32)
    else:
        s = torch.tensor(float(scale), dtype=torch.float32)
    s = _check_param_shape(s, layout, "scale")
    if s.numel() == 1:
        value = s.reshape(-1)[0].item()
        if not (_TINY <= value < math.inf):
            raise _bad_scale(value)
    elif not bool(((s >= _TINY) & (s < math.inf)).all()):
        raise _bad_scale(s[~((s >= _TINY) & (s < math.inf))][0].item())
    return s


def _as_zero_point(zero_point: object, layout: _Layout, fmt: IntFormat) -> torch.Tensor:
    if isinstance(zero_point, bool) or not isinstance(zero_point, (int, float, torch.Tensor)):
        raise TypeError(
            f"zero_point must be an int, an integer tensor or None, got {type(zero_point).__name__}"
        )
    if isinstance(zero_point, torch.Tensor):
        if zero_point.is_complex() or zero_point.dtype == torch.bool:
            raise TypeError(f"zero_point must be a real tensor, got {zero_point.dtype}")
        z = zero_point.detach().to(torch.float64)
    else:
        z = torch.tensor(float(zero_point), dtype=torch.float64)
    z = _check_param_shape(z, layout, "zero_point")
    if z.numel() == 1:
        lo = hi = z.reshape(-1)[0].item()
        integral = lo == round(lo) if math.isfinite(lo) else False
    else:
        lo, hi = z.min().item(), z.max().item()
        integral = bool((z == torch.round(z)).all())
    if not integral:
        raise ValueError("zero_point must hold integers")
    if not (fmt.qmin <= lo and hi <= fmt.qmax):
        raise ValueError(
            f"zero_point must lie in [{fmt.qmin}, {fmt.qmax}] for {fmt.name}, got {lo:g}..{hi:g}"
        )
    return z.to(torch.int32)


# --------------------------------------------------------------------------------------------
# scale derivation (scale=None)
# --------------------------------------------------------------------------------------------
def _finite_grouped(x: torch.Tensor, layout: _Layout) -> torch.Tensor:
    g = layout.grouped(x.detach())
    return g if bool(torch.isfinite(g).all()) else torch.where(torch.isfinite(g), g, 0)


def choose_qparams(
    x: torch.Tensor,
    fmt: str | Format,
    *,
    axis: int | None = None,
    group_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (scale, zero_point) that :func:`fake_quantize` derives when ``scale=None``.

    Signed integer formats are symmetric: ``scale = max|x| / qmax`` and ``zero_point = 0``.
    Unsigned formats are affine over ``[min(x, 0), max(x, 0)]`` (so 0 is exact):
    ``scale = (max - min) / (qmax - qmin)`` and ``zero_point = qmin - round(min / scale)``.
    Statistics are taken per tensor, per channel along ``axis``, or per group of ``group_size``
    along ``axis``; non-finite values are left out; the scale is at least the smallest normal
    float32. Returns a float32 scale and an int32 zero point of the layout's parameter shape.
    """
    x = _check_tensor(x)
    fmt = get_format(fmt)
    if not isinstance(fmt, IntFormat):
        raise ValueError(f"choose_qparams needs an integer format, got {fmt.name}")
    layout = _make_layout(x, axis, group_size)
    if x.numel() == 0:
        raise ValueError("cannot derive a scale from an empty tensor")
    # min and max first; the full-tensor finiteness filter only runs when a statistic is not
    # finite (amin/amax propagate NaN and inf), so the common case reads x once
    if layout.kind == "tensor" and x.is_contiguous():
        lo, hi = (t.reshape(1) for t in torch.aminmax(x.detach()))
    elif layout.kind == "channel":  # reduce in place: no rearranged copy of x
        dims = tuple(d for d in range(x.dim()) if d != layout.axis)
        xd = x.detach()  # (empty dims would reduce over everything: a 1-d x is its own stats)
        lo, hi = (xd.amin(dims), xd.amax(dims)) if dims else (xd, xd)
    else:  # (amin and amax beat aminmax(dim=-1) by 20x on CPU in torch 2.13)
        g = layout.grouped(x.detach())
        lo, hi = g.amin(-1), g.amax(-1)
    if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
        g = _finite_grouped(x, layout)
        lo, hi = g.amin(-1), g.amax(-1)
    if fmt.signed:
        amax = torch.maximum(-lo, hi)
        scale = (amax.to(torch.float32) / fmt.qmax).clamp_min(_TINY)
        zp = torch.zeros_like(scale, dtype=torch.int32)
    else:
        lo = lo.clamp(max=0).to(torch.float32)
        hi = hi.clamp(min=0).to(torch.float32)
        scale = ((hi - lo) / float(fmt.qmax - fmt.qmin)).clamp_min(_TINY)
        zp = (fmt.qmin - torch.round(lo / scale)).clamp(fmt.qmin, fmt.qmax).to(torch.int32)
    return layout.ungroup(scale), layout.ungroup(zp)


def _mean_abs(x: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """mean |x| per tensor / channel / group (non-finite values count as 0), param_shape."""
    g = _finite_grouped(x, layout).abs()
    return layout.ungroup(g.sum(-1) / layout.group_counts(g.dtype, g.device))


def _twn_params(x: torch.Tensor, layout: _Layout, threshold: float):
    """TWN threshold delta = threshold * mean|x| and alpha = mean of |x| over |x| > delta
    (0 when nothing is kept), both in param_shape."""
    g = _finite_grouped(x, layout).abs()
    delta = threshold * (g.sum(-1) / layout.group_counts(g.dtype, g.device))
    kept = g > delta.unsqueeze(-1)
    alpha = (g * kept).sum(-1) / kept.sum(-1).clamp_min(1)
    return layout.ungroup(delta), layout.ungroup(alpha)


# --------------------------------------------------------------------------------------------
# reference (plain torch) forward passes: each returns (out, mask) with mask = STE pass-through
# --------------------------------------------------------------------------------------------
def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rand31(x: torch.Tensor, rounding: str, seed: int | None) -> torch.Tensor | None:
    return random_bits31(seed, x.shape, x.device) if rounding == "stochastic" else None


def _int_reference(x, fmt, scale, zp, rounding, seed, per_tensor):
    """Mirrors ATen's fake_quantize kernels: ``zp + nearbyint(x * (1/scale))`` with the
    reciprocal in float32 and the product in the input's precision (float32 for halves); the
    dequantized value is computed in float32 except for float64 with per-channel scales."""
    wd = _work_dtype(x)
    od = torch.float32 if per_tensor else wd
    inv = (1.0 / scale).to(wd)
    zpw = zp.to(wd)
    v = x.to(wd) * inv
    if rounding == "nearest":
        r = torch.round(v)
    else:
        r = stochastic_round(v, rand31=_rand31(x, rounding, seed))
    q = r + zpw
    mask = (q >= fmt.qmin) & (q <= fmt.qmax)
    out = (q.clamp(fmt.qmin, fmt.qmax) - zpw).to(od) * scale.to(od)
    return out.to(x.dtype), mask


def _float_reference(x, fmt, scale, rounding, seed, saturate):
    wd = _work_dtype(x)
    xs = x.to(wd) if scale is None else x.to(wd) / scale.to(wd)
    y = round_to_float_format(xs, fmt, rounding, rand31=_rand31(x, rounding, seed),
                              saturate=saturate)
    if scale is not None:
        y = y * scale.to(wd)
    return y.to(x.dtype), xs.abs() <= fmt.max


def _sign_pm1(xs, rounding, seed):
    """±1 with sign(0) = +1; stochastic: P(+1) = hardtanh-clipped (x + 1) / 2 (QNN)."""
    if rounding == "nearest":
        b = torch.where(xs >= 0, 1.0, -1.0)
    else:
        p = ((xs + 1) / 2).clamp(0, 1)
        up = _rand31(xs, rounding, seed) < torch.trunc(p.double() * _TWO31).to(torch.int64)
        b = torch.where(up, 1.0, -1.0)
    return b.to(xs.dtype)


def _binary_reference(x, fmt, scale, layout, rounding, seed):
    wd = _work_dtype(x)
    xw = x.to(wd)
    xs = xw if scale is None else xw / scale.to(wd)
    b = _sign_pm1(xs, rounding, seed)
    if scale is not None:
        b = b * scale.to(wd)
    elif fmt.scaled:
        b = b * layout.expand(_mean_abs(xw, layout).to(wd))
    out = torch.where(torch.isnan(xs), xs, b)
    return out.to(x.dtype), xs.abs() <= 1


def _ternary_reference(x, fmt, scale, layout, rounding, seed):
    wd = _work_dtype(x)
    xw = x.to(wd)
    if scale is not None:
        xs = xw / scale.to(wd)
        alpha = scale.to(wd)
        t = xs.clamp(-1, 1)
        t = torch.round(t) if rounding == "nearest" else stochastic_round(
            t, rand31=_rand31(x, rounding, seed))
    else:
        xs = xw
        delta, alpha = _twn_params(xw, layout, fmt.threshold)
        alpha = layout.expand(alpha.to(wd)) if fmt.scaled else torch.ones((), dtype=wd)
        if rounding == "nearest":
            t = torch.where(xw.abs() > layout.expand(delta.to(wd)), torch.sign(xw), 0.0)
        else:
            unit = torch.where(alpha > 0, alpha, 1.0)  # all-zero input: alpha 0, t 0
            t = stochastic_round((xw / unit).clamp(-1, 1), rand31=_rand31(x, rounding, seed))
        t = torch.where(torch.isnan(xw), xw, t)
    out = t * alpha
    return out.to(x.dtype), xs.abs() <= 1


# --------------------------------------------------------------------------------------------
# the autograd wrapper
# --------------------------------------------------------------------------------------------
class _FakeQuantizeSTE(torch.autograd.Function):
    """Forward: a precomputed plan; backward: grad where the STE mask is set, else 0."""

    @staticmethod
    def forward(ctx, x, plan):  # noqa: D102
        out, mask = plan(x, True)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (mask,) = ctx.saved_tensors
        return _apply_mask(grad, mask), None


def _apply_mask(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.uint8:  # bit-packed mask from the fused kernel
        from lowbit.kernels import fake_quant as _k

        return _k.masked_grad(grad, mask)
    return grad * mask  # as torch's fake_quantize backward (so -0.0 and inf * 0 = NaN alike)


def _kernel():
    """The fused-kernel module when it can be used, else None."""
    try:
        from lowbit.kernels import fake_quant as _k
    except ImportError:
        return None
    return _k if _k.available() else None


def fake_quantize(
    x: torch.Tensor,
    fmt: str | Format,
    *,
    scale: ScaleLike | None = None,
    zero_point: int | torch.Tensor | None = None,
    axis: int | None = None,
    group_size: int | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    saturate: bool = True,
) -> torch.Tensor:
    """Quantize ``x`` onto ``fmt`` and dequantize, returning a tensor of x's dtype and shape.

    Scales are per tensor (``axis=None``), per channel along ``axis`` (a 1-D ``scale`` of length
    ``x.shape[axis]``), or per group of ``group_size`` consecutive elements along ``axis``
    (default: the last dim; ``scale`` then has x's shape with that dim replaced by the number of
    groups, the last group may be shorter).

    * Integer formats: with ``scale`` (and ``zero_point``, default 0) the result equals
      ``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine`` with
      ``quant_min=fmt.qmin, quant_max=fmt.qmax`` bit for bit for finite inputs of every
      floating dtype; NaN stays NaN (torch maps it to quant_min) and ±inf saturate (torch's
      per-channel kernel sends them to quant_min). With ``scale=None`` the scale comes from the
      data, see :func:`choose_qparams` (symmetric from max|x| for signed, min/max affine for
      unsigned).
    * Float formats (``e4m3``, ``e5m2``, ``e{E}m{M}``, ``fp16``, ``bf16``): round to the format,
      equal to ``x.to(torch.float8_e4m3fn / float8_e5m2 / float16 / bfloat16)`` and back inside
      the range; beyond ``±fmt.max`` values saturate (``saturate=False``: become ±inf); NaN stays
      NaN. A ``scale`` divides before and multiplies after; ``scale=None`` means no scaling.
      (A float64 input is rounded once and exactly; torch's own cast first rounds it to float32.)
    * ``binary``: ``sign(x)`` with ``sign(0)=+1``; ``binary-scaled`` multiplies by mean|x| (per
      tensor, channel or group). ``ternary``: TWN, see :class:`lowbit.formats.TernaryFormat`.
      With an explicit ``scale`` both round ``x/scale`` onto {-1, (0,) +1} and multiply back.

    ``rounding="stochastic"`` rounds to one of the two neighbouring grid points, unbiased,
    reproducibly from ``generator`` (default: torch's global generator); for binary it draws
    +1 with probability ``clip((x+1)/2, 0, 1)`` (QNN).

    Gradient (straight-through estimator, none for the scale): ``grad`` where the value was not
    clipped, else 0. Integer formats: where ``qmin <= round(x/scale) + zero_point <= qmax``;
    float formats: where ``|x/scale| <= fmt.max``; binary and ternary: the hardtanh STE of QNN,
    where ``|x/scale| <= 1`` (``scale`` = 1 when not given). Computed as ``grad * mask``, as
    torch's fake_quantize backward does.

    Float32 CPU tensors (per tensor, per channel, or groups along the last dim) run in a fused
    C++ kernel built on first use (:mod:`lowbit.kernels.fake_quant`), bit-identical to the
    plain-torch path here; ``LOWBIT_NO_EXT=1`` forces the plain-torch path.
    """
    x = _check_tensor(x)
    fmt = get_format(fmt)
    check_rounding(rounding)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
    if not isinstance(saturate, bool):
        raise TypeError(f"saturate must be a bool, got {type(saturate).__name__}")
    layout = _make_layout(x, axis, group_size)
    s = None if scale is None else _as_scale(scale, layout).to(x.device)
    if zero_point is not None and not isinstance(fmt, IntFormat):
        raise ValueError(f"zero_point only applies to integer formats, not {fmt.name}")
    if zero_point is not None and s is None:
        raise ValueError("zero_point needs a scale; pass scale= too (or neither)")
    if isinstance(fmt, FloatFormat) and s is None and layout.kind != "tensor":
        raise ValueError(
            f"axis/group_size need an explicit scale for float format {fmt.name} "
            "(scale=None means no scaling)"
        )
    if x.numel() == 0:
        return x.clone()

    if isinstance(fmt, IntFormat):
        if s is None:
            s, zp = choose_qparams(x, fmt, axis=layout.axis, group_size=layout.group_size)
        else:
            zp = _as_zero_point(0 if zero_point is None else zero_point, layout, fmt).to(x.device)
        plan = _int_plan(fmt, s, zp, layout, rounding, generator)
    elif isinstance(fmt, FloatFormat):
        plan = _float_plan(fmt, s, layout, rounding, generator, saturate)
    elif isinstance(fmt, BinaryFormat):
        plan = _binary_plan(fmt, s, layout, rounding, generator)
    else:
        assert isinstance(fmt, TernaryFormat)
        seed = draw_seed(generator) if rounding == "stochastic" else None
        s_full = None if s is None else layout.expand(s)

        def plan(t, need_mask):
            return _ternary_reference(t, fmt, s_full, layout, rounding, seed)

    if x.requires_grad and torch.is_grad_enabled():
        return _FakeQuantizeSTE.apply(x, plan)
    return plan(x, False)[0]


def _int_plan(fmt, s, zp, layout, rounding, generator):
    seed = draw_seed(generator) if rounding == "stochastic" else None
    k = _kernel()

    def plan(x, need_mask):
        if k is not None and k.supports(x, layout):
            return k.int_fake_quant(x, s, zp, layout, fmt.qmin, fmt.qmax, seed, need_mask)
        return _int_reference(x, fmt, layout.expand(s), layout.expand(zp), rounding, seed,
                              layout.kind == "tensor")

    return plan


def _float_plan(fmt, s, layout, rounding, generator, saturate):
    seed = draw_seed(generator) if rounding == "stochastic" else None
    k = _kernel()

    def plan(x, need_mask):
        if k is not None and k.supports(x, layout):
            return k.float_fake_quant(x, fmt, s, layout, seed, saturate, need_mask)
        s_full = None if s is None else layout.expand(s)
        return _float_reference(x, fmt, s_full, rounding, seed, saturate)

    return plan


def _binary_plan(fmt, s, layout, rounding, generator):
    seed = draw_seed(generator) if rounding == "stochastic" else None
    k = _kernel()

    def plan(x, need_mask):
        if k is not None and k.supports(x, layout):
            mul = s if s is not None else _mean_abs(x, layout) if fmt.scaled else None
            return k.binary_fake_quant(x, s, mul, layout, seed, need_mask)
        s_full = None if s is None else layout.expand(s)
        return _binary_reference(x, fmt, s_full, layout, rounding, seed)

    return plan


# --------------------------------------------------------------------------------------------
# gradient quantization
# --------------------------------------------------------------------------------------------
class _QuantizeGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, options):  # noqa: D102
        ctx.options = options
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        fmt, rounding, generator, axis, saturate = ctx.options
        if isinstance(fmt, FloatFormat):
            return fake_quantize(grad, fmt, rounding=rounding, generator=generator,
                                 saturate=saturate), None
        # a non-finite gradient passes unchanged so that a loss scaler can see it
        # (min and max propagate NaN and inf: one cheap pass instead of isfinite(grad).all())
        lo, hi = torch.aminmax(grad)
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            return grad, None
        return fake_quantize(grad, fmt, axis=axis, rounding=rounding, generator=generator), None


def quantize_grad(
    x: torch.Tensor,
    fmt: str | Format,
    *,
    rounding: str = "stochastic",
    generator: torch.Generator | None = None,
    axis: int | None = None,
    saturate: bool = False,
) -> torch.Tensor:
    """Identity in the forward pass; in the backward pass the incoming gradient is fake-quantized.

    Integer, binary and ternary formats take the scale from the gradient itself (max|g| for
    signed formats, see :func:`choose_qparams`), per tensor or per ``axis``; a gradient holding
    inf/NaN is passed through unchanged. Float formats round the gradient unscaled (as in FP8
    training with loss scaling); with the default ``saturate=False`` an overflow becomes ±inf so
    that a dynamic loss scaler notices it (``saturate=True``: clamp to ±fmt.max).
    """
    x = _check_tensor(x)
    fmt = get_format(fmt)
    check_rounding(rounding)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
    layout = _make_layout(x, axis, None)
    if isinstance(fmt, FloatFormat) and layout.axis is not None:
        raise ValueError(f"axis does not apply to float format {fmt.name} (gradients are unscaled)")
    if not (x.requires_grad and torch.is_grad_enabled()):
        return x
    return _QuantizeGrad.apply(x, (fmt, rounding, generator, layout.axis, saturate))
