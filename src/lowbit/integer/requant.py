"""Requantization schemes used by today's runtimes, for comparison with the exact result.

Each scheme maps integer inputs ``x`` (an int8 activation or an int32 accumulator) through
``t = a·(x - z_in) + b`` to ``clamp(round(t) + z_out)`` its own way:

``float64`` / ``float32``
    one multiply and one add in that precision, then round half to even (``float32`` is
    PyTorch's standalone quantized BatchNorm).
``float32_int_bias``
    FBGEMM / ONNX Runtime: the bias is an int32 in accumulator units (``round(b/a)``), the sum
    is converted to float32, multiplied by a float32 scale, rounded half to even.
``rounded_fixed_point``
    ``M = round(a·2^k)``, ``C = round(b·2^k)`` to nearest, then an exactly rounding shift by
    ``k`` (the rounding mode of the comparison): what a fixed-point scheme does without a search.
``gemmlowp``
    TFLite / gemmlowp: int32 bias, a Q31 multiplier in ``[0.5, 1)`` and an exponent, a
    rounding doubling high multiply followed by a rounding divide by a power of two (two
    roundings, both half away from zero).
``tflite_single_rounding``
    TFLite's ``TFLITE_SINGLE_ROUNDING`` build: the same Q31 multiplier, one rounding.
``divisor_2_24``
    research stacks (RequantShift, dyadic scales): ``floor((mul·x + add) / 2^24)`` with
    ``mul = round(a·2^24)`` and ``add = round(b·2^24) + 2^23``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np

from lowbit.integer.exact import (
    ExactAffine,
    as_fractions,
    check_rounding,
    exact_outputs,
    int_range,
)
from lowbit.integer.fixed_point import fixed_point_affine

__all__ = [
    "SCHEMES",
    "requantize",
    "quantize_multiplier",
    "saturating_rounding_doubling_high_mul",
    "rounding_divide_by_pot",
    "rounded_fixed_point_min_shift",
    "disagreements",
]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _round_half_away(f: Fraction) -> int:
    """``std::round`` on an exact value: half away from zero."""
    n = math.floor(abs(f) + Fraction(1, 2))
    return n if f >= 0 else -n


def _round_exact(f: Fraction, rounding: str) -> int:
    fl = math.floor(f)
    rem = f - fl
    if rem != Fraction(1, 2):
        return fl + (1 if rem > Fraction(1, 2) else 0)
    if rounding == "half_up":
        return fl + 1
    return fl if fl % 2 == 0 else fl + 1


def quantize_multiplier(m: float) -> tuple[int, int]:
    """TFLite ``QuantizeMultiplier``: ``m ≈ q·2^(shift-31)``, ``|q|`` in ``[2^30, 2^31)``."""
    if m == 0.0:
        return 0, 0
    frac, shift = math.frexp(m)
    q = _round_half_away(Fraction(frac) * 2**31)
    if abs(q) == 2**31:
        q //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return q, shift


def saturating_rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` on int32 values held in int64 arrays."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    s = ab + nudge
    q = np.where(s >= 0, s >> 31, -((-s) >> 31))  # C++ division truncates towards zero
    return np.where((a == b) & (a == INT32_MIN), INT32_MAX, q)


def rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray | int) -> np.ndarray:
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded half away from zero."""
    x = np.asarray(x, dtype=np.int64)
    e = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << e) - 1
    rem = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> e) + (rem > threshold)


def _int_bias(a: Fraction, b: Fraction) -> int:
    """The bias as an int32 in accumulator units, as the runtimes store it: round(b/a)."""
    if a == 0:
        return 0
    return _round_half_away(Fraction(float(b) / float(a)))


def _scheme_float(dtype) -> Callable:
    def run(fa, fb, xs, z_in, rounding, k):
        a = np.array([float(v) for v in fa], dtype=dtype)[:, None]
        b = np.array([float(v) for v in fb], dtype=dtype)[:, None]
        x = (xs - z_in).astype(dtype)[None, :]
        t = (a * x).astype(dtype) + b
        return _round_float(t, rounding)
    return run


def _round_float(t: np.ndarray, rounding: str) -> np.ndarray:
    if rounding == "half_even":
        return np.rint(t).astype(np.int64)
    return np.floor(t + t.dtype.type(0.5)).astype(np.int64)


def _scheme_float32_int_bias(fa, fb, xs, z_in, rounding, k):
    out = np.empty((len(fa), xs.size), dtype=np.int64)
    for c, (a, b) in enumerate(zip(fa, fb)):
        acc = (xs - z_in) + _int_bias(a, b)
        t = acc.astype(np.float32) * np.float32(float(a))
        out[c] = _round_float(t, rounding)
    return out


def _shift_round(v: np.ndarray, k: int, rounding: str) -> np.ndarray:
    """``v / 2^k`` rounded exactly (half to even or half up) in integers."""
    if k == 0:
        return v
    u = v + (1 << (k - 1))
    q = u >> k
    if rounding == "half_up":
        return q
    return q - (((u & ((1 << k) - 1)) == 0) & ((q & 1) == 1))


def _scheme_rounded_fixed_point(fa, fb, xs, z_in, rounding, k):
    if k is None:
        raise ValueError("the rounded_fixed_point scheme needs a shift k")
    ks = np.broadcast_to(np.asarray(k, dtype=np.int64), (len(fa),))
    out = np.empty((len(fa), xs.size), dtype=np.int64)
    x = (xs - z_in).astype(object)
    for kk in np.unique(ks).tolist():
        rows = np.nonzero(ks == kk)[0]
        M = np.array([_round_exact(fa[c] * 2**kk, "half_even") for c in rows], dtype=object)
        C = np.array([_round_exact(fb[c] * 2**kk, "half_even") for c in rows], dtype=object)
        v = M[:, None] * x[None, :] + C[:, None]
        big = max(int(np.abs(v).max(initial=0)), 1).bit_length() + 1
        if big < 62:
            v = v.astype(np.int64)
        out[rows] = np.asarray(_shift_round(v, kk, rounding)).astype(np.int64)
    return out


def _scheme_gemmlowp(single: bool) -> Callable:
    def run(fa, fb, xs, z_in, rounding, k):
        out = np.empty((len(fa), xs.size), dtype=np.int64)
        for c, (a, b) in enumerate(zip(fa, fb)):
            q, shift = quantize_multiplier(float(a))
            acc = (xs - z_in) + _int_bias(a, b)
            if single:
                total = 31 - shift
                if total <= 0:
                    out[c] = acc * q * (1 << -total)
                else:
                    out[c] = (acc * q + (1 << (total - 1))) >> total
                continue
            left, right = max(shift, 0), max(-shift, 0)
            out[c] = rounding_divide_by_pot(
                saturating_rounding_doubling_high_mul(acc * (1 << left), q), right)
        return out
    return run


def _scheme_divisor(bits: int) -> Callable:
    def run(fa, fb, xs, z_in, rounding, k):
        out = np.empty((len(fa), xs.size), dtype=np.int64)
        for c, (a, b) in enumerate(zip(fa, fb)):
            mul = _round_exact(a * 2**bits, "half_even")
            add = _round_exact(b * 2**bits, "half_even") + (1 << (bits - 1))
            out[c] = (mul * (xs - z_in) + add) >> bits
        return out
    return run


SCHEMES: dict[str, Callable] = {
    "float64": _scheme_float(np.float64),
    "float32": _scheme_float(np.float32),
    "float32_int_bias": _scheme_float32_int_bias,
    "rounded_fixed_point": _scheme_rounded_fixed_point,
    "gemmlowp": _scheme_gemmlowp(single=False),
    "tflite_single_rounding": _scheme_gemmlowp(single=True),
    "divisor_2_24": _scheme_divisor(24),
}


def requantize(scheme: str, a: Any, b: Any, inputs: Any, output_range: Any, *,
               input_zero_point: int = 0, output_zero_point: int = 0,
               rounding: str = "half_even", shift: Any = None) -> np.ndarray:
    """Outputs ``[channels, len(inputs)]`` of one of :data:`SCHEMES` (int64, clamped).

    ``shift`` (one or per channel) is used by ``rounded_fixed_point`` only. ``rounding`` picks
    the tie rule of the schemes whose rounding is not fixed by the runtime they model.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
    check_rounding(rounding)
    qmin, qmax = int_range(output_range, "output_range")
    fa, fb = as_fractions(a, "a"), as_fractions(b, "b")
    n = max(len(fa), len(fb))
    fa = fa * n if len(fa) == 1 else fa
    fb = fb * n if len(fb) == 1 else fb
    if len(fa) != len(fb):
        raise ValueError("a and b must have the same number of channels (or one)")
    xs = np.asarray(inputs, dtype=np.int64).reshape(-1)
    m = SCHEMES[scheme](fa, fb, xs, int(input_zero_point), rounding, shift)
    return np.clip(m + int(output_zero_point), qmin, qmax)


def rounded_fixed_point_min_shift(a: Any, b: Any, inputs: Any, output_range: Any, *,
                                  input_zero_point: int = 0, output_zero_point: int = 0,
                                  rounding: str = "half_even", max_shift: int = 62
                                  ) -> np.ndarray:
    """Smallest ``k`` at which rounding ``M`` and ``C`` to nearest is exact, per channel.

    ``-1`` where no ``k <= max_shift`` works (e.g. ties that the shift's rounding cannot see).
    """
    fa, fb = as_fractions(a, "a"), as_fractions(b, "b")
    xs = np.asarray(inputs, dtype=np.int64).reshape(-1)
    exact = exact_outputs(ExactAffine.from_affine(fa, fb, input_zero_point), xs, output_range,
                          rounding=rounding, output_zero_point=output_zero_point)
    out = np.full(len(fa), -1, dtype=np.int64)
    pending = np.arange(len(fa))
    for k in range(max_shift + 1):
        if pending.size == 0:
            break
        got = requantize("rounded_fixed_point", [fa[i] for i in pending],
                         [fb[i] for i in pending], xs, output_range,
                         input_zero_point=input_zero_point, output_zero_point=output_zero_point,
                         rounding=rounding, shift=k)
        ok = (got == exact[pending]).all(axis=1)
        out[pending[ok]] = k
        pending = pending[~ok]
    return out


def disagreements(a: Any, b: Any, input_range: Any, output_range: Any, *,
                  input_zero_point: int = 0, output_zero_point: int = 0,
                  rounding: str = "half_even", shift: Any = None,
                  schemes: list[str] | None = None) -> dict[str, int]:
    """Number of ``(channel, input)`` pairs where each scheme differs from the exact output.

    Every integer of ``input_range`` is an input. ``"certified"`` is
    :func:`~lowbit.integer.fixed_point.fixed_point_affine`; ``shift`` feeds
    ``rounded_fixed_point`` (skipped when None).
    """
    lo, hi = int_range(input_range, "input_range")
    xs = np.arange(lo, hi + 1, dtype=np.int64)
    exact = exact_outputs(ExactAffine.from_affine(a, b, input_zero_point), xs, output_range,
                          rounding=rounding, output_zero_point=output_zero_point)
    names = schemes if schemes is not None else ["certified"] + [
        s for s in SCHEMES if s != "rounded_fixed_point" or shift is not None]
    out = {}
    for name in names:
        if name == "certified":
            fp = fixed_point_affine(a, b, (lo, hi), output_range, rounding=rounding,
                                    input_zero_point=input_zero_point,
                                    output_zero_point=output_zero_point)
            got = fp.apply(np.broadcast_to(xs, exact.shape).copy(), axis=0)
            out[name] = int((got != exact).sum())
            continue
        got = requantize(name, a, b, xs, output_range, input_zero_point=input_zero_point,
                         output_zero_point=output_zero_point, rounding=rounding, shift=shift)
        out[name] = int((got != exact).sum())
    return out
