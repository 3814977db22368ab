"""Integer-only layer kernels: per-channel requantization, int8 GEMM and convolution.

Everything here runs on integer tensors only: int8/uint8 (or 4-bit values held in int8)
activations and weights, int32 accumulators from ``torch._int_mm``, int64 for ``M·acc + C``, and
the fixed-point rule of :mod:`lowbit.integer.fixed_point` (shift, tie window, clamp) to the next
layer's integers. Weights are symmetric (zero point 0); the activation zero point is folded out
of the accumulator with the weights' row sums, and padding uses the activation's zero point.

The real map a layer must reproduce, per output channel ``o``::

    y = clamp(R(a_o·acc + b_o) + z_out),   acc = sum_k w[o, k]·(x[k] - z_x)

with ``a_o = s_x·s_w[o]·(BN scale)/s_out`` and ``b_o = (bias + BN shift)/s_out`` as exact
rationals (:func:`requant_coefficients`); :func:`make_requantizer` certifies ``(M, C, k, w)`` over
the accumulator's proven bound (:func:`accumulator_bounds`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lowbit.integer import _ext
from lowbit.integer.exact import as_fractions, int_range
from lowbit.integer.fixed_point import FixedPointAffine, fixed_point_affine

__all__ = [
    "Requantizer",
    "accumulator_bounds",
    "requant_coefficients",
    "make_requantizer",
    "int_linear",
    "int_conv2d",
    "BACKENDS",
]

BACKENDS = ("auto", "torch", "compiled")


def _use_ext(backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if _ext.extension() is None:
        if backend == "compiled":
            raise RuntimeError("the compiled integer kernels are unavailable")
        return False
    return True

def _storage_dtype(qmin: int, qmax: int) -> torch.dtype:
    if -128 <= qmin and qmax <= 127:
        return torch.int8
    if 0 <= qmin and qmax <= 255:
        return torch.uint8
    if -(2**31) <= qmin and qmax < 2**31:
        return torch.int32
    return torch.int64


@dataclass(frozen=True)
class Requantizer:
    """Per-channel fixed-point requantization of integer accumulators, as torch tensors."""

    multiplier: Tensor  # int64 [C]
    offset: Tensor  # int64 [C]
    shift: Tensor  # int64 [C]
    window: Tensor  # int64 [C]
    zero_point: int
    qmin: int
    qmax: int
    dtype: torch.dtype
    acc_range: tuple[int, int]

    @classmethod
    def from_fixed_point(cls, fp: FixedPointAffine, dtype: torch.dtype | None = None
                         ) -> Requantizer:
        """Tensors of a certified :class:`FixedPointAffine`; ``M·x + C`` must fit in int64."""
        bits = int(fp.acc_bits().max())
        if bits > 63:
            raise ValueError(f"M·x + C needs {bits} bits, more than int64 holds")
        qmin, qmax = fp.output_range

        def t(v: np.ndarray) -> Tensor:
            return torch.tensor([int(x) for x in v.tolist()], dtype=torch.int64)

        return cls(t(fp.multiplier), t(fp.offset), t(fp.shift), t(fp.tie_window),
                   fp.output_zero_point, qmin, qmax, dtype or _storage_dtype(qmin, qmax),
                   fp.input_range)

    @property
    def channels(self) -> int:
        return self.multiplier.numel()

    def __call__(self, acc: Tensor, dim: int = -1, *, backend: str = "auto",
                 acc_offset: Tensor | None = None) -> Tensor:
        """Requantize integer ``acc - acc_offset`` with channels along ``dim``; integer ops only.

        ``acc_offset`` (int64 per channel, optional) is subtracted first: the activation zero
        point times the weights' row sums. ``backend``: ``"compiled"`` (fused C++ loop, for
        int32 2-D inputs and int8/uint8 outputs), ``"torch"``, or ``"auto"`` (compiled where it
        applies and builds).
        """
        if acc.is_floating_point() or acc.is_complex():
            raise TypeError(f"acc must be an integer tensor, got {acc.dtype}")
        dim = dim % acc.dim()
        if acc.shape[dim] != self.channels:
            raise ValueError(f"acc has {acc.shape[dim]} channels on dim {dim}, "
                             f"expected {self.channels}")
        zs = (torch.zeros(self.channels, dtype=torch.int64) if acc_offset is None
              else acc_offset.to(torch.int64))
        fits = (acc.dtype == torch.int32 and acc.dim() == 2
                and self.dtype in (torch.int8, torch.uint8))
        if backend == "compiled" and not fits:
            raise ValueError("the compiled requantization takes int32 2-D accumulators and "
                             "int8/uint8 outputs")
        if fits and _use_ext(backend):
            return _ext.extension().requant(
                acc.contiguous(), dim == 0, zs, self.multiplier, self.offset, self.shift,
                self.window, self.zero_point, self.qmin, self.qmax, self.dtype == torch.uint8)
        shape = [1] * acc.dim()
        shape[dim] = self.channels
        v = (acc.to(torch.int64) - zs.view(shape)) * self.multiplier.view(shape) + \
            self.offset.view(shape)
        k = self.shift.view(shape)
        q = v >> k
        r = v & ((1 << k) - 1)
        m = q - ((r < self.window.view(shape)) & ((q & 1) == 1)).to(torch.int64)
        return (m + self.zero_point).clamp_(self.qmin, self.qmax).to(self.dtype)


def accumulator_bounds(weight: Any, input_range: Any, input_zero_point: int) -> np.ndarray:
    """Exact ``[O, 2]`` bounds of ``sum_k w[o, k]·(x_k - z_x)`` over all inputs in range.

    ``weight``: integer weights ``[O, ...]`` (symmetric). The zero point must lie in the input
    range (padding with it contributes 0).
    """
    lo, hi = int_range(input_range, "input_range")
    z = int(input_zero_point)
    if not lo <= z <= hi:
        raise ValueError(f"input_zero_point {z} must lie in the input range [{lo}, {hi}]")
    w = torch.as_tensor(weight)
    if w.is_floating_point():
        raise TypeError("weight must hold integers")
    w = w.reshape(w.shape[0], -1).to(torch.int64)
    a, b = w * (lo - z), w * (hi - z)
    return torch.stack([torch.minimum(a, b).sum(1), torch.maximum(a, b).sum(1)], 1).numpy()


def requant_coefficients(input_scale: Any, weight_scale: Any, output_scale: Any, *,
                         bias: Any = None, bn_scale: Any = None, bn_shift: Any = None
                         ) -> tuple[list, list]:
    """Exact per-channel ``(a, b)`` with ``y/s_out = a·acc + b`` (``acc`` in integer units).

    Real output ``y = bn_scale·(s_x·s_w·acc + bias) + bn_shift`` (BN folded, optional), so
    ``a = bn_scale·s_x·s_w/s_out`` and ``b = (bn_scale·bias + bn_shift)/s_out``; every float is
    taken as the exact binary number it holds.
    """
    sw = as_fractions(weight_scale, "weight_scale")
    n = len(sw)

    def per(v: Any, name: str, default: int) -> list:
        vals = as_fractions(default if v is None else v, name)
        if len(vals) == 1:
            vals = vals * n
        if len(vals) != n:
            raise ValueError(f"{name} has {len(vals)} values, expected 1 or {n}")
        return vals

    sx = per(input_scale, "input_scale", 1)[0]
    so = per(output_scale, "output_scale", 1)[0]
    if sx <= 0 or so <= 0 or any(s <= 0 for s in sw):
        raise ValueError("scales must be positive")
    bias_, g, h = per(bias, "bias", 0), per(bn_scale, "bn_scale", 1), per(bn_shift, "bn_shift", 0)
    a = [gi * sx * swi / so for gi, swi in zip(g, sw)]
    b = [(gi * bi + hi) / so for gi, bi, hi in zip(g, bias_, h)]
    return a, b


def make_requantizer(weight: Any, a: Any, b: Any, *, input_range: Any, input_zero_point: int,
                     output_range: Any, output_zero_point: int, rounding: str = "half_even",
                     dtype: torch.dtype | None = None) -> tuple[Requantizer, FixedPointAffine]:
    """Certify the fixed point of a layer over its accumulators' proven bounds."""
    bounds = accumulator_bounds(weight, input_range, input_zero_point)
    fp = fixed_point_affine(a, b, bounds, output_range, rounding=rounding,
                            output_zero_point=output_zero_point)
    return Requantizer.from_fixed_point(fp, dtype), fp


def _as_int8(x: Tensor, zero_point: int) -> tuple[Tensor, int]:
    """int8 operand for ``_int_mm``: uint8 values move down by 128 (and their zero point)."""
    if x.dtype == torch.int8:
        return x, zero_point
    if x.dtype == torch.uint8:
        return torch.bitwise_xor(x, 128).view(torch.int8), zero_point - 128
    raise TypeError(f"activations must be int8 or uint8, got {x.dtype}")


def _check_weight(weight: Tensor) -> Tensor:
    if weight.dtype != torch.int8:
        raise TypeError(f"weight must be int8 (4-bit weights held in int8), got {weight.dtype}")
    return weight


def int_linear(x: Tensor, weight: Tensor, requant: Requantizer, *, input_zero_point: int,
               backend: str = "auto") -> Tensor:
    """``requant(sum_k w[o, k]·(x[..., k] - z_x))``; ``x [..., K]`` int8/uint8, ``w [O, K]`` int8."""
    _check_weight(weight)
    x8, z = _as_int8(x, int(input_zero_point))
    lead = x8.shape[:-1]
    x2 = x8.reshape(-1, x8.shape[-1])
    acc = torch._int_mm(x2, weight.t().contiguous())
    zs = z * weight.to(torch.int64).sum(1)
    return requant(acc, dim=-1, backend=backend, acc_offset=zs).reshape(*lead, weight.shape[0])


def _pair(v: Any, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return int(v[0]), int(v[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def _im2col_torch(x8: Tensor, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int,
                  dw: int, z: int) -> tuple[Tensor, int, int]:
    if ph or pw:
        x8 = torch.nn.functional.pad(x8, (pw, pw, ph, ph), value=z)
    win_h, win_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    p = x8.unfold(2, win_h, sh).unfold(3, win_w, sw)[..., ::dh, ::dw]
    n, c, oh, ow = p.shape[:4]
    return p.permute(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw), oh, ow


def int_conv2d(x: Tensor, weight: Tensor, requant: Requantizer, *, input_zero_point: int,
               stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
               backend: str = "auto") -> Tensor:
    """Integer 2-D convolution (NCHW) as im2col + ``torch._int_mm``, then requantization.

    Padding holds the input zero point, i.e. real zeros, as in the float model. ``backend``
    picks the compiled im2col/requantization or the pure-torch code (identical results).
    """
    _check_weight(weight)
    if x.dim() != 4:
        raise ValueError(f"x must be NCHW, got shape {tuple(x.shape)}")
    (sh, sw), (ph, pw), (dh, dw) = (_pair(stride, "stride"), _pair(padding, "padding"),
                                    _pair(dilation, "dilation"))
    n, c, _, _ = x.shape
    o, cg, kh, kw = weight.shape
    if c != cg * groups or o % groups:
        raise ValueError(f"channels {c} / weight {tuple(weight.shape)} / groups {groups} "
                         "do not match")
    og = o // groups
    if _use_ext(backend):  # channel-major: acc^T = W · cols^T, then one layout change
        z = int(input_zero_point) - (128 if x.dtype == torch.uint8 else 0)
        if x.dtype not in (torch.int8, torch.uint8):
            raise TypeError(f"activations must be int8 or uint8, got {x.dtype}")
        oh = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        accs = []
        for g in range(groups):
            xg = x[:, g * cg:(g + 1) * cg] if groups > 1 else x
            cols_t = _ext.extension().im2col_t(xg.contiguous(), kh, kw, sh, sw, ph, pw, dh, dw,
                                               z)
            accs.append(torch._int_mm(weight[g * og:(g + 1) * og].reshape(og, -1), cols_t))
        acc = accs[0] if groups == 1 else torch.cat(accs, 0)
        zs = z * weight.reshape(o, -1).to(torch.int64).sum(1)
        y = requant(acc, dim=0, backend=backend, acc_offset=zs)
        return y.view(o, n, oh * ow).permute(1, 0, 2).reshape(n, o, oh, ow)
    x8, z = _as_int8(x, int(input_zero_point))
    accs = []
    for g in range(groups):
        xg = x8[:, g * cg:(g + 1) * cg] if groups > 1 else x8
        cols, oh, ow = _im2col_torch(xg, kh, kw, sh, sw, ph, pw, dh, dw, z)
        accs.append(torch._int_mm(cols, weight[g * og:(g + 1) * og].reshape(og, -1).t()
                                  .contiguous()))
    acc = accs[0] if groups == 1 else torch.cat(accs, 1)
    zs = z * weight.reshape(o, -1).to(torch.int64).sum(1)
    y = requant(acc, dim=-1, backend="torch", acc_offset=zs)
    return y.reshape(n, oh, ow, o).permute(0, 3, 1, 2).contiguous()
