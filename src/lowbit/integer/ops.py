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
    "Conv2dKernel",
    "ResidualEpilogue",
    "OnednnConv2d",
    "onednn_available",
    "onednn_accumulator_bound",
    "BACKENDS",
]

BACKENDS = ("auto", "torch", "compiled", "onednn", "vnni", "amx")


def check_backend(backend: str) -> str:
    """``backend`` if it is one of :data:`BACKENDS`, else a ValueError naming them."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _use_ext(backend: str) -> bool:
    if check_backend(backend) == "torch":
        return False
    if _ext.extension() is None:
        if backend in ("compiled", "onednn", "vnni", "amx"):
            raise RuntimeError(f"backend={backend!r}: the compiled integer kernels are "
                               "unavailable")
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


def _row_major(t: Tensor) -> Tensor:
    """``t`` with strides ``(cols, 1)``; a size-1 dimension can carry any stride after
    ``.t().contiguous()``, and torch's CPU ``_int_mm`` misreads a ``[1, N]`` right operand with
    strides ``(1, 1)`` (garbage accumulators for K = 1, seen with torch 2.13)."""
    if t.stride() == (t.shape[1], 1):
        return t
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)


def _int_mm(a: Tensor, b: Tensor) -> Tensor:
    """``torch._int_mm`` (int8 x int8 -> int32) on row-major operands."""
    return torch._int_mm(_row_major(a), _row_major(b))


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
    acc = _int_mm(x2, weight.t())
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
    """Integer 2-D convolution (NCHW) with per-channel requantization; integer ops only.

    Padding holds the input zero point, i.e. real zeros, as in the float model. ``backend``:
    ``"torch"`` (im2col + ``torch._int_mm``), ``"compiled"`` (the AVX-512 VNNI kernel of
    :class:`Conv2dKernel` where the CPU has it, else the compiled im2col) or ``"auto"``.
    Identical results on every path; the VNNI path returns a channels-last tensor.
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
    if _use_ext(backend) and groups == 1 and x.dtype in (torch.int8, torch.uint8):
        k = Conv2dKernel(weight, requant, input_zero_point=int(input_zero_point),
                         input_dtype=x.dtype, stride=(sh, sw), padding=(ph, pw),
                         dilation=(dh, dw), amx=backend == "amx")
        if k.compiled:
            return k(x)
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
            accs.append(_int_mm(weight[g * og:(g + 1) * og].reshape(og, -1), cols_t))
        acc = accs[0] if groups == 1 else torch.cat(accs, 0)
        zs = z * weight.reshape(o, -1).to(torch.int64).sum(1)
        y = requant(acc, dim=0, backend=backend, acc_offset=zs)
        return y.view(o, n, oh * ow).permute(1, 0, 2).reshape(n, o, oh, ow)
    x8, z = _as_int8(x, int(input_zero_point))
    accs = []
    for g in range(groups):
        xg = x8[:, g * cg:(g + 1) * cg] if groups > 1 else x8
        cols, oh, ow = _im2col_torch(xg, kh, kw, sh, sw, ph, pw, dh, dw, z)
        accs.append(_int_mm(cols, weight[g * og:(g + 1) * og].reshape(og, -1).t()))
    acc = accs[0] if groups == 1 else torch.cat(accs, 1)
    zs = z * weight.reshape(o, -1).to(torch.int64).sum(1)
    y = requant(acc, dim=-1, backend="torch", acc_offset=zs)
    return y.reshape(n, oh, ow, o).permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class ResidualEpilogue:
    """A residual add folded into a convolution's epilogue (integers per output channel ``o``).

    Before the requantization rule, the accumulator ``acc - zs`` becomes::

        x = clamp(gain[o]·(acc - zs) + lut[o, s'], clamp_lo[o], clamp_hi[o])

    with ``s`` the shortcut's 8-bit value at the same position, ``s' = s`` for uint8 and
    ``s + 128`` for int8 shortcuts (``lut`` holds the shortcut's own requantization for every
    byte value). All tensors int64: ``gain``/``clamp_lo``/``clamp_hi`` ``[O]``, ``lut [O, 256]``.

    ``shortcut`` (optional): the requantization the table holds, ``lut[o, s'] =
    shortcut(s)``; where its ``M·s + C`` fits in int32 over every byte value the compiled
    kernel evaluates it in 32-bit lanes instead of gathering from the table.
    """

    gain: Tensor
    lut: Tensor
    clamp_lo: Tensor
    clamp_hi: Tensor
    shortcut: Requantizer | None = None


def _int32_rule(rq: Requantizer, codes: tuple[int, int], channels: int) -> Tensor | None:
    """``rq`` as int32 rows (M, C, k, 2^k - 1, window >= 0) for 16-lane evaluation, or None
    where some ``M·s + C`` over ``codes``, a constant or the output range leaves int32."""
    lim = 2**31
    m, c, k, w = (t.to(torch.int64) for t in (rq.multiplier, rq.offset, rq.shift, rq.window))
    ends = torch.stack([m * codes[0] + c, m * codes[1] + c])
    if (rq.channels != channels or int(k.min()) < 0 or int(k.max()) > 30
            or int(ends.abs().max()) >= lim or int(m.abs().max()) >= lim
            or int(c.abs().max()) >= lim or not -lim <= rq.qmin <= rq.qmax < lim
            or not -lim <= rq.zero_point < lim or not -lim <= rq.qmin - rq.zero_point):
        return None
    return torch.stack([m, c, k, (1 << k) - 1, w.clamp_min(0)]).to(torch.int32)


_OUT_KINDS = {torch.int8: 0, torch.uint8: 1, torch.int32: 2}


def _amx_rows(ow: int) -> int:
    """Pixels per AMX tile for output rows of ``ow``: the largest divisor of ``ow`` up to 16,
    or 0 (use the VNNI loop) where that leaves fewer than 8 of a longer row."""
    m = max(d for d in range(1, min(16, ow) + 1) if ow % d == 0)
    return m if m >= 8 or m == ow else 0


class Conv2dKernel:
    """One integer conv2d layer prepared once (weights packed, per-channel constants laid out).

    ``kernel(x)`` equals :func:`int_conv2d` with the same arguments (``groups=1``);
    ``kernel(x, shortcut)`` also folds a :class:`ResidualEpilogue` in. The result is NCHW-shaped
    with channels-last memory. ``compiled`` tells whether the AVX-512 VNNI kernel runs (the
    input copied once to padded NHWC bytes, ``vpdpbusd`` int32 tiles kept in registers, the
    requantization rule in int64 on those registers, 8-bit or int32 stores); otherwise (no
    VNNI, no compiler, ``LOWBIT_NO_EXT=1``, a layer outside its limits, ``backend="torch"``)
    the pure-torch im2col + ``torch._int_mm`` path gives the same integers.

    ``amx=True`` runs the products on AMX-INT8 tiles instead (``TDPBUSD``: 16 pixels of one
    output row by 16 channels per tile, the same exact int32 sums, the same epilogue) where
    the CPU and the OS allow it; :attr:`amx`
    tells whether it will (a call whose output rows cannot be cut into tiles of 8 to 16
    pixels uses the VNNI loop). Few input channels waste most of each 64-byte tile row (3
    channels: 12 useful bytes per kernel row), yet even then the tiles can be the faster
    path: ``backend="auto"`` measures.
    """

    def __init__(self, weight: Tensor, requant: Requantizer, *, input_zero_point: int,
                 input_dtype: torch.dtype, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, residual: ResidualEpilogue | None = None,
                 backend: str = "auto", amx: bool = False) -> None:
        _check_weight(weight)
        if weight.dim() != 4:
            raise ValueError(f"weight must be [O, C, KH, KW], got {tuple(weight.shape)}")
        if input_dtype not in (torch.int8, torch.uint8):
            raise TypeError(f"input_dtype must be torch.int8 or torch.uint8, got {input_dtype}")
        o, c, kh, kw = weight.shape
        if requant.channels != o:
            raise ValueError(f"requant has {requant.channels} channels, the weight {o}")
        self.weight, self.requant, self.residual = weight, requant, residual
        self.stride, self.padding = _pair(stride, "stride"), _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.input_dtype = input_dtype
        self.z = int(input_zero_point)
        lo, hi = (-128, 127) if input_dtype == torch.int8 else (0, 255)
        if not lo <= self.z <= hi:
            raise ValueError(f"input_zero_point {self.z} is outside the {input_dtype} range")
        flip = 128 if input_dtype == torch.int8 else 0
        self.zu8 = self.z + flip  # the zero point of the uint8 view (int8 values + 128)
        self.row_sums = weight.reshape(o, -1).to(torch.int64).sum(1)
        self._want_amx, self.amx = bool(amx), False
        if residual is not None:
            for name in ("gain", "clamp_lo", "clamp_hi"):
                t = getattr(residual, name)
                if t.dtype != torch.int64 or t.shape != (o,):
                    raise ValueError(f"residual.{name} must be int64 [{o}]")
            if residual.lut.dtype != torch.int64 or residual.lut.shape != (o, 256):
                raise ValueError(f"residual.lut must be int64 [{o}, 256]")
        self._mod = self._prepare(backend)

    @property
    def compiled(self) -> bool:
        """Whether calls run the AVX-512 VNNI kernel."""
        return self._mod is not None

    def _prepare(self, backend: str) -> Any:
        if not _use_vnni(backend):
            return None
        r = self.requant
        o, c, kh, kw = self.weight.shape
        k = r.shift
        fits = (r.dtype in _OUT_KINDS
                and (r.dtype != torch.int32 or (-(2**31) <= r.qmin and r.qmax < 2**31))
                and int(k.min()) >= 0 and int(k.max()) <= 63
                and (c + 3) // 4 * 4 * kh * kw * 255 * 128 < 2**31
                and (self.residual is None or (int(self.residual.lut.min()) >= -(2**31)
                                               and int(self.residual.lut.max()) < 2**31)))
        if not fits:
            return None
        mod = _ext.vnni()
        op = (o + 15) // 16 * 16

        def pad(t: Tensor, fill: int = 0) -> Tensor:
            out = torch.full((op, *t.shape[1:]), fill, dtype=torch.int64)
            out[:o] = t.to(torch.int64)
            return out

        mask = torch.tensor([(1 << int(v)) - 1 for v in k.tolist()], dtype=torch.int64)
        res = self.residual
        gain = res.gain if res is not None else torch.ones(o, dtype=torch.int64)
        self._params = torch.stack([pad(self.zu8 * self.row_sums), pad(r.multiplier),
                                    pad(r.offset), pad(k), pad(mask), pad(r.window),
                                    pad(gain)]).contiguous()
        self._srule, self._sconst = torch.empty(0, dtype=torch.int32), (0, 0, 0)
        if res is not None:
            self._lut = pad(res.lut).to(torch.int32).contiguous()  # values fit: checked
            self._clamp = torch.stack([pad(res.clamp_lo), pad(res.clamp_hi)]).contiguous()
            rule = None
            if res.shortcut is not None:
                rule = _int32_rule(res.shortcut, (-128, 255), o)  # int8 or uint8 codes
            if rule is not None:
                self._srule = torch.zeros(5, op, dtype=torch.int32)
                self._srule[:, :o] = rule
                self._srule = self._srule.contiguous()
                sq = res.shortcut
                self._sconst = (sq.zero_point, sq.qmin, sq.qmax)
        else:
            self._lut = self._clamp = torch.empty(0, dtype=torch.int64)
        self._packed = mod.pack_conv_weight(self.weight.contiguous())
        self._out_kind = _OUT_KINDS[r.dtype]
        c4 = (c + 3) // 4 * 4
        self.amx = bool(self._want_amx and mod.amx_supported())
        self._packed_amx = (mod.pack_conv_weight_amx(self.weight.contiguous(), c4,
                                                     self.dilation[1])
                            if self.amx else torch.empty(0, dtype=torch.int8))
        return mod

    def _output_size(self, h: int, w: int) -> tuple[int, int]:
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        kh, kw = self.weight.shape[2:]
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def __call__(self, x: Tensor, shortcut: Tensor | None = None) -> Tensor:
        """The layer on ``x [N, C, H, W]`` (any memory format); ``shortcut [N, O, OH, OW]``
        8-bit, required exactly when the kernel has a residual epilogue."""
        if x.dtype != self.input_dtype or x.dim() != 4 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"x must be {self.input_dtype} [N, {self.weight.shape[1]}, H, W], "
                             f"got {x.dtype} {tuple(x.shape)}")
        if (shortcut is None) != (self.residual is None):
            raise ValueError("pass a shortcut exactly when the kernel has a residual epilogue")
        n = x.shape[0]
        o = self.weight.shape[0]
        oh, ow = self._output_size(x.shape[2], x.shape[3])
        sc = None
        if shortcut is not None:
            if shortcut.dtype not in (torch.int8, torch.uint8) or tuple(shortcut.shape) != (
                    n, o, oh, ow):
                raise ValueError(f"shortcut must be 8-bit [{n}, {o}, {oh}, {ow}], got "
                                 f"{shortcut.dtype} {tuple(shortcut.shape)}")
            sc = shortcut.permute(0, 2, 3, 1).contiguous()  # NHWC bytes
        if self._mod is not None:
            (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
            kh, kw = self.weight.shape[2:]
            r = self.requant
            rows = _amx_rows(ow) if self.amx else 0
            y = self._mod.conv2d_requant(
                x, self._packed, o, kh, kw, sh, sw, ph, pw, dh, dw, self.zu8, self._params,
                r.zero_point, r.qmin, r.qmax, self._out_kind, sc is not None,
                sc if sc is not None else self._lut, self._lut, self._clamp,
                self._packed_amx if rows else self._packed_amx[:0], rows, self._srule,
                *self._sconst)
        else:
            y = self._torch(x, sc, oh, ow)
        return y.permute(0, 3, 1, 2)  # NCHW view of NHWC memory

    def _torch(self, x: Tensor, sc: Tensor | None, oh: int, ow: int) -> Tensor:
        """The reference path: im2col + ``torch._int_mm``, epilogue in int64 torch ops."""
        x8, z = _as_int8(x, self.z)
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        o, _, kh, kw = self.weight.shape
        cols, _, _ = _im2col_torch(x8, kh, kw, sh, sw, ph, pw, dh, dw, z)
        acc = _int_mm(cols, self.weight.reshape(o, -1).t())  # [R, O]
        zs = z * self.row_sums
        if sc is None:
            y = self.requant(acc, dim=-1, backend="torch", acc_offset=zs)
        else:
            res = self.residual
            s = sc.reshape(-1, o).to(torch.int64) + (128 if sc.dtype == torch.int8 else 0)
            v = res.gain * (acc.to(torch.int64) - zs) + torch.gather(res.lut.t(), 0, s)
            v = torch.minimum(torch.maximum(v, res.clamp_lo), res.clamp_hi)
            y = self.requant(v, dim=-1, backend="torch")
        return y.reshape(x.shape[0], oh, ow, o)


def _use_vnni(backend: str) -> bool:
    return _use_ext(backend) and _ext.vnni() is not None


# ------------------------------------------------------------------ oneDNN int8 convolution
#: float32 holds every integer of magnitude up to 2^24: the accumulators oneDNN returns as
#: float32 (all scales 1.0) are exact below it.
ONEDNN_EXACT_LIMIT = 2**24

_onednn_state: dict[str, bool] = {}


def _cpu_has_int8_dot() -> bool:
    """VNNI (AVX-512 or AVX) or AMX-INT8: oneDNN's int8 products then sum in int32 without the
    int16 saturation of ``vpmaddubsw`` that older x86 code paths have."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _onednn_ops_present() -> bool:
    try:
        ops = torch.ops.onednn
        return all(hasattr(ops, name) for name in ("qconv_prepack", "qconv2d_pointwise"))
    except (AttributeError, RuntimeError):
        return False


def _onednn_probe() -> bool:
    """Convolutions whose u8·s8 pairs would saturate int16 (255·127·2 > 2^15) and whose sums
    reach 2^23, against float64: exact or not."""
    g = torch.Generator().manual_seed(0)
    c, o = 32, 16  # sum |w| <= 288·128: every bound below 2^24
    x = torch.where(torch.rand(3, c, 5, 5, generator=g) < 0.7, 255, 0).to(torch.uint8)
    x[0] = 255
    w = torch.where(torch.rand(o, c, 3, 3, generator=g) < 0.8, 127, -128).to(torch.int8)
    w[0] = 127  # 255·127·288 ~ 2^23.1 at the centre of image 0
    for z in (0, 77):
        conv = OnednnConv2d(w, input_zero_point=z, input_dtype=torch.uint8, padding=1,
                            _probing=True)
        want = torch.nn.functional.conv2d(x.double() - z, w.double(), padding=1)
        if not torch.equal(conv(x).double(), want):
            return False
    return True


def onednn_available() -> bool:
    """Whether oneDNN's int8 convolution (``torch.ops.onednn``) gives exact accumulators here:
    the ops exist in this torch, the CPU has VNNI or AMX-INT8, and a probe convolution agrees
    with float64 bit for bit. Checked once per process."""
    if "ok" not in _onednn_state:
        ok = False
        if _onednn_ops_present() and _cpu_has_int8_dot():
            try:
                ok = _onednn_probe()
            except Exception:  # an op that exists but rejects these arguments: not usable
                ok = False
        _onednn_state["ok"] = ok
    return _onednn_state["ok"]


def onednn_accumulator_bound(weight: Tensor, input_range: tuple[int, int], input_zero_point: int,
                             input_dtype: torch.dtype) -> Tensor:
    """int64 ``[O]``: a bound on every sum oneDNN may form for output channel ``o``.

    oneDNN reads uint8 codes ``u`` (int8 inputs are shifted by 128, with their zero point) and
    may sum ``w·u`` and the zero-point term ``z_u·sum(w)`` separately before subtracting; with
    ``u`` in ``[lo_u, hi_u]`` (``lo_u >= 0``) and the padding worth ``z_u``, each of them, and
    the exact accumulator ``sum w·(u - z_u)`` too, is at most ``max(hi_u, z_u)·sum_k |w[o, k]|``
    in magnitude.
    """
    shift = 128 if input_dtype == torch.int8 else 0
    lo, hi = int(input_range[0]) + shift, int(input_range[1]) + shift
    z = int(input_zero_point) + shift
    if not 0 <= lo <= hi <= 255 or not 0 <= z <= 255:
        raise ValueError(f"input range {tuple(input_range)} / zero point {input_zero_point} do "
                         f"not fit {input_dtype}")
    return max(hi, z) * weight.reshape(weight.shape[0], -1).to(torch.int64).abs().sum(1)


class OnednnConv2d:
    """oneDNN's int8 convolution as an exact integer accumulator (``groups=1``).

    ``conv(x)`` for int8/uint8 ``x [N, C, H, W]`` returns float32 ``[N, O, OH, OW]``
    (channels-last memory) holding exactly ``sum_k w[o, k]·(x_k - z)`` with padding worth the
    zero point: all scales are 1.0 and :func:`onednn_accumulator_bound` must stay below
    :data:`ONEDNN_EXACT_LIMIT`, which the constructor checks over ``input_range`` (default: the
    whole range of ``input_dtype``). The weight is packed once per input shape (oneDNN picks its
    blocking by shape). Raises RuntimeError where :func:`onednn_available` is false.
    """

    def __init__(self, weight: Tensor, *, input_zero_point: int, input_dtype: torch.dtype,
                 stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                 input_range: tuple[int, int] | None = None, _probing: bool = False) -> None:
        _check_weight(weight)
        if weight.dim() != 4:
            raise ValueError(f"weight must be [O, C, KH, KW], got {tuple(weight.shape)}")
        if input_dtype not in RANGES_8BIT:
            raise TypeError(f"input_dtype must be torch.int8 or torch.uint8, got {input_dtype}")
        if not _probing and not onednn_available():
            raise RuntimeError("oneDNN's exact int8 convolution is unavailable here (needs "
                               "torch.ops.onednn and a CPU with VNNI or AMX-INT8)")
        rng = RANGES_8BIT[input_dtype] if input_range is None else input_range
        bound = onednn_accumulator_bound(weight, rng, input_zero_point, input_dtype)
        if bound.numel() and int(bound.max()) >= ONEDNN_EXACT_LIMIT:
            raise ValueError(f"accumulators may reach {int(bound.max())} >= 2^24: float32 "
                             "results would not be exact")
        self.weight = weight.contiguous()
        self.input_dtype = input_dtype
        self.bound = bound
        self.zu8 = int(input_zero_point) + (128 if input_dtype == torch.int8 else 0)
        self.stride, self.padding = list(_pair(stride, "stride")), list(_pair(padding, "padding"))
        self.dilation = list(_pair(dilation, "dilation"))
        o = weight.shape[0]
        self._scales = torch.ones(o, dtype=torch.float32)
        self._zeros = torch.zeros(o, dtype=torch.int64)
        self._packed: dict[tuple[int, ...], Tensor] = {}

    @staticmethod
    def certified(weight: Tensor, *, input_zero_point: int, input_dtype: torch.dtype,
                  input_range: tuple[int, int] | None = None, **geometry: Any
                  ) -> OnednnConv2d | None:
        """The layer where oneDNN is available and the bound certifies it, else None."""
        if not onednn_available() or weight.dim() != 4 or input_dtype not in RANGES_8BIT:
            return None
        lo, hi = RANGES_8BIT[input_dtype]
        if input_range is not None:  # codes are stored in input_dtype: intersect
            lo, hi = max(lo, int(input_range[0])), min(hi, int(input_range[1]))
        if not lo <= int(input_zero_point) <= hi:
            return None
        rng = (lo, hi)
        bound = onednn_accumulator_bound(weight, rng, input_zero_point, input_dtype)
        if bound.numel() and int(bound.max()) >= ONEDNN_EXACT_LIMIT:
            return None
        return OnednnConv2d(weight, input_zero_point=input_zero_point, input_dtype=input_dtype,
                            input_range=rng, **geometry)

    def _weight_for(self, shape: tuple[int, ...]) -> Tensor:
        pw = self._packed.get(shape)
        if pw is None:
            if len(self._packed) >= 8:  # a few batch sizes at a time
                self._packed.clear()
            pw = torch.ops.onednn.qconv_prepack(self.weight, self._scales, 1.0, self.zu8,
                                                self.stride, self.padding, self.dilation, 1,
                                                list(shape))
            self._packed[shape] = pw
        return pw

    def __call__(self, x: Tensor) -> Tensor:
        if x.dtype != self.input_dtype or x.dim() != 4 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"x must be {self.input_dtype} [N, {self.weight.shape[1]}, H, W], "
                             f"got {x.dtype} {tuple(x.shape)}")
        xu = x.contiguous(memory_format=torch.channels_last)
        if x.dtype == torch.int8:  # u = x + 128, exactly (the zero point moved alike)
            xu = torch.bitwise_xor(xu.view(torch.uint8), 128)
        pw = self._weight_for(tuple(x.shape))
        return torch.ops.onednn.qconv2d_pointwise(
            xu, 1.0, self.zu8, pw, self._scales, self._zeros, None, self.stride, self.padding,
            self.dilation, 1, 1.0, 0, torch.float32, "none", [], "")


RANGES_8BIT = {torch.int8: (-128, 127), torch.uint8: (0, 255)}
