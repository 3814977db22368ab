"""Uniform affine fake quantization over a clipping range [lo, hi], with per-channel bits.

Post-training quantization chooses, per tensor or per channel, a range [lo, hi] and a bit width
M (bit allocation gives each channel its own M), so this quantizer takes ranges and bits as
tensors. The grid has 2^M levels, ``scale = (hi - lo) / (2^M - 1)``:

* ``true_zero=True`` (default, what integer kernels need): the range is first widened to
  contain 0 and the zero point is rounded to an integer, so 0 is exactly representable; the
  arithmetic matches ``torch.fake_quantize_per_channel_affine`` bit for bit.
* ``true_zero=False``: the grid is exactly ``lo + k * scale`` (float zero point), as assumed by
  the ACIQ analysis; this is also what the float-zero-point variant of torch's function computes.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = torch.finfo(torch.float32).eps


def _as_channel_tensor(value, like: Tensor, name: str, dtype=None) -> Tensor:
    t = torch.as_tensor(value, device=like.device)
    if dtype is not None:
        t = t.to(dtype)
    if t.dim() > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D per-channel tensor, got shape "
                         f"{tuple(t.shape)}")
    return t


def _broadcast(t: Tensor, x: Tensor, axis: int | None) -> Tensor:
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def range_to_qparams(
    lo: Tensor | float, hi: Tensor | float, bits: Tensor | int, *, true_zero: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """(scale, zero_point, qmax) of a 2^bits-level unsigned grid covering [lo, hi].

    Shapes follow ``lo``/``hi`` (scalar or per channel). With ``true_zero`` the range is
    widened to include 0 and the zero point is an integer (stored as float32).
    """
    lo = torch.as_tensor(lo, dtype=torch.float32)
    hi = torch.as_tensor(hi, dtype=torch.float32, device=lo.device)
    bits_t = torch.as_tensor(bits, device=lo.device)
    if bits_t.is_floating_point():
        if not torch.equal(bits_t, bits_t.round()):
            raise ValueError(f"bits must be integers, got {bits_t.tolist()}")
    bits_t = bits_t.to(torch.int64)
    if (bits_t < 1).any() or (bits_t > 24).any():
        raise ValueError(f"bits must lie in [1, 24], got {bits_t.tolist()}")
    if (hi < lo).any():
        raise ValueError("every hi must be >= lo")
    qmax = (torch.ones_like(bits_t) << bits_t) - 1
    qmax_f = qmax.to(torch.float32)
    if true_zero:
        lo = torch.minimum(lo, torch.zeros_like(lo))
        hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = torch.clamp((hi - lo) / qmax_f, min=_EPS)
    if true_zero:
        zero_point = torch.clamp(torch.round(-lo / scale), torch.zeros_like(qmax_f), qmax_f)
    else:
        zero_point = -lo / scale
    return scale, zero_point, qmax


def fake_quant_range(
    x: Tensor,
    lo: Tensor | float,
    hi: Tensor | float,
    bits: Tensor | int,
    *,
    axis: int | None = None,
    true_zero: bool = True,
) -> Tensor:
    """Quantize-dequantize ``x`` on a 2^bits-level uniform grid spanning [lo, hi].

    ``lo``, ``hi`` and ``bits`` are scalars (per tensor) or 1-D tensors along ``axis``
    (per channel; different channels may have different bit widths). Values outside the
    range saturate. Result has ``x``'s shape and dtype.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if axis is not None:
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"axis {axis} out of range for a {x.dim()}-D tensor")
        axis = axis % x.dim()
    lo_t = _as_channel_tensor(lo, x, "lo", torch.float32)
    hi_t = _as_channel_tensor(hi, x, "hi", torch.float32)
    bits_t = _as_channel_tensor(bits, x, "bits")
    per_channel = max(lo_t.dim(), hi_t.dim(), bits_t.dim()) == 1
    if per_channel:
        if axis is None:
            raise ValueError("per-channel lo/hi/bits need an axis")
        n = x.shape[axis]
        lo_t, hi_t, bits_t = (t.expand(n) if t.dim() == 0 else t for t in (lo_t, hi_t, bits_t))
        if not lo_t.shape[0] == hi_t.shape[0] == bits_t.shape[0] == n:
            raise ValueError(f"per-channel lo/hi/bits must have {n} entries (x.shape[{axis}])")
    scale, zero_point, qmax = range_to_qparams(lo_t, hi_t, bits_t, true_zero=true_zero)
    ax = axis if per_channel else None
    scale_b = _broadcast(scale, x, ax)
    zp_b = _broadcast(zero_point, x, ax)
    qmax_b = _broadcast(qmax.to(torch.float32), x, ax)
    xf = x.to(torch.float32)
    inv_scale = torch.reciprocal(scale_b)
    if true_zero:
        q = torch.round(xf * inv_scale) + zp_b
    else:
        q = torch.round(xf * inv_scale + zp_b)
    q = torch.minimum(torch.clamp(q, min=0.0), qmax_b)
    return ((q - zp_b) * scale_b).to(x.dtype)


def sqnr_db(x: Tensor, x_hat: Tensor) -> float:
    """Signal-to-quantization-noise ratio 10*log10(sum x^2 / sum (x - x_hat)^2) in dB."""
    signal = x.double().pow(2).sum()
    noise = (x.double() - x_hat.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10.0 * torch.log10(signal / noise))
