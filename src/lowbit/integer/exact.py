"""Exact rational reference for an integer affine map with rounding and clamping.

A per-channel affine map on integer inputs ``x`` (a quantized activation or an int32
accumulator) is ``t(x) = a·(x - z_in) + b`` in units of the output scale; the exact integer
output is ``clamp(R(t(x)) + z_out, qmin, qmax)`` with ``R`` a rounding rule. ``a`` and ``b`` are
taken as exact rationals: a float is the binary number it stores (``Fraction(0.1)``), not the
decimal it was typed as, and folding scales in (``a·s_in/s_out``) is done in rationals too.

Two implementations that must agree: :func:`reference_outputs` (plain ``fractions.Fraction``,
one value at a time, the definition) and :func:`exact_outputs` (vectorised: float64 for the
bulk, Python integers for every input within a proven error band of a rounding boundary).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

__all__ = [
    "ROUNDING_MODES",
    "ExactAffine",
    "as_fractions",
    "batchnorm_affine",
    "fold_scales",
    "round_fraction",
    "int_range",
    "reference_outputs",
    "exact_outputs",
]

ROUNDING_MODES = ("half_even", "half_up")


def check_rounding(rounding: str) -> str:
    """Validate a rounding-mode name (``"half_even"`` or ``"half_up"``)."""
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    return rounding


def _to_fraction(v: Any, name: str) -> Fraction:
    if isinstance(v, Fraction):
        return v
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be numeric, got a bool")
    if isinstance(v, (int, np.integer)):
        return Fraction(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not math.isfinite(f):
            raise ValueError(f"{name} must be finite, got {f}")
        return Fraction(f)
    raise TypeError(f"{name} must hold ints, floats or Fractions, got {type(v).__name__}")


def as_fractions(values: Any, name: str = "values") -> list[Fraction]:
    """Exact rationals of a scalar, sequence, NumPy array or torch tensor (1-D per channel)."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # torch tensor, without importing
        values = values.detach().cpu().double().numpy() if values.is_floating_point() else (
            values.detach().cpu().numpy())
    if isinstance(values, np.ndarray):
        if values.ndim > 1:
            raise ValueError(f"{name} must be a scalar or 1-D (one value per channel)")
        values = values.reshape(-1).tolist() if values.dtype != object else list(values.reshape(-1))
    elif isinstance(values, (Fraction, int, float, np.integer, np.floating)):
        values = [values]
    elif not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a number or a sequence of numbers")
    out = [_to_fraction(v, name) for v in values]
    if not out:
        raise ValueError(f"{name} must not be empty")
    return out


def _broadcast(vals: list[Fraction], n: int, name: str) -> list[Fraction]:
    if len(vals) == n:
        return vals
    if len(vals) == 1:
        return vals * n
    raise ValueError(f"{name} has {len(vals)} values, expected 1 or {n} (one per channel)")


def batchnorm_affine(gamma: Any, beta: Any, mean: Any, var: Any, eps: float = 1e-5
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel inference BatchNorm as ``y = a·x + b`` in float64.

    ``a = gamma / sqrt(var + eps)`` and ``b = beta - mean·a``, evaluated in float64; these float64
    values define the float model that the integer one must reproduce exactly.
    """
    arrs = [np.asarray(as_fractions(v, n), dtype=np.float64)
            for v, n in ((gamma, "gamma"), (beta, "beta"), (mean, "mean"), (var, "var"))]
    g, bt, mu, vr = np.broadcast_arrays(*arrs)
    if np.any(vr + eps <= 0):
        raise ValueError("var + eps must be positive")
    a = g / np.sqrt(vr + eps)
    return a, bt - mu * a


def fold_scales(a: Any, b: Any, *, input_scale: Any = 1, output_scale: Any = 1
                ) -> tuple[list[Fraction], list[Fraction]]:
    """Fold quantization scales into a real affine map, exactly.

    A real map ``y = a·x + b`` applied to ``x = s_in·(q - z_in)`` and quantized with ``s_out``
    becomes ``t = a'·(q - z_in) + b'`` with ``a' = a·s_in/s_out`` and ``b' = b/s_out``.
    """
    fa, fb = as_fractions(a, "a"), as_fractions(b, "b")
    n = max(len(fa), len(fb))
    s_in = _broadcast(as_fractions(input_scale, "input_scale"), n, "input_scale")
    s_out = _broadcast(as_fractions(output_scale, "output_scale"), n, "output_scale")
    if any(s <= 0 for s in s_in + s_out):
        raise ValueError("input_scale and output_scale must be positive")
    fa, fb = _broadcast(fa, n, "a"), _broadcast(fb, n, "b")
    return ([x * si / so for x, si, so in zip(fa, s_in, s_out)],
            [y / so for y, so in zip(fb, s_out)])


def int_range(spec: Any, name: str) -> tuple[int, int]:
    """An integer range from a format name (``"int8"``), a format object or a ``(lo, hi)`` pair."""
    if isinstance(spec, str):
        try:
            from lowbit.formats import get_format
        except ImportError as exc:  # pragma: no cover - formats layer missing
            raise ValueError(f"{name}: cannot resolve format name {spec!r} ({exc})") from exc
        spec = get_format(spec)
    if hasattr(spec, "qmin") and hasattr(spec, "qmax"):
        lo, hi = spec.qmin, spec.qmax
    elif isinstance(spec, Sequence) and len(spec) == 2:
        lo, hi = spec
    else:
        raise TypeError(f"{name} must be an integer format name like 'int8', a format with "
                        f"qmin/qmax, or a (lo, hi) pair; got {spec!r}")
    if isinstance(lo, (bool, np.bool_)) or isinstance(hi, (bool, np.bool_)) or not (
            isinstance(lo, (int, np.integer)) and isinstance(hi, (int, np.integer))):
        raise TypeError(f"{name} bounds must be integers, got ({lo!r}, {hi!r})")
    lo, hi = int(lo), int(hi)
    if lo > hi:
        raise ValueError(f"{name} must have lo <= hi, got ({lo}, {hi})")
    return lo, hi


def round_fraction(t: Fraction, rounding: str = "half_even") -> int:
    """Round an exact rational to an integer; ties to even or up (towards +inf)."""
    check_rounding(rounding)
    fl = math.floor(t)
    rem = t - fl
    if rem > Fraction(1, 2):
        return fl + 1
    if rem < Fraction(1, 2):
        return fl
    if rounding == "half_up":
        return fl + 1
    return fl if fl % 2 == 0 else fl + 1


@dataclass(frozen=True)
class ExactAffine:
    """Per-channel exact maps ``t_c(x) = (A_c·x + B_c) / D_c`` on raw integer inputs ``x``.

    Built from ``t = a·(x - z_in) + b``; ``D_c > 0``. Python integers, never rounded.
    """

    num_a: tuple[int, ...]
    num_b: tuple[int, ...]
    den: tuple[int, ...]

    @classmethod
    def from_affine(cls, a: Any, b: Any, input_zero_point: int = 0) -> ExactAffine:
        fa, fb = as_fractions(a, "a"), as_fractions(b, "b")
        n = max(len(fa), len(fb))
        fa, fb = _broadcast(fa, n, "a"), _broadcast(fb, n, "b")
        if isinstance(input_zero_point, bool) or not isinstance(input_zero_point,
                                                                 (int, np.integer)):
            raise TypeError(f"input_zero_point must be an int, got {input_zero_point!r}")
        z = int(input_zero_point)
        na, nb, dd = [], [], []
        for x, y in zip(fa, fb):
            d = math.lcm(x.denominator, y.denominator)
            A = x.numerator * (d // x.denominator)
            na.append(A)
            nb.append(y.numerator * (d // y.denominator) - A * z)
            dd.append(d)
        return cls(tuple(na), tuple(nb), tuple(dd))

    @property
    def channels(self) -> int:
        return len(self.den)

    def slope(self, c: int) -> Fraction:
        return Fraction(self.num_a[c], self.den[c])

    def intercept(self, c: int) -> Fraction:
        """``t_c(0)``."""
        return Fraction(self.num_b[c], self.den[c])


def reference_outputs(a: Any, b: Any, inputs: Sequence[int], output_range: Any, *,
                      rounding: str = "half_even", input_zero_point: int = 0,
                      output_zero_point: int = 0) -> list[list[int]]:
    """The definition, with ``fractions.Fraction``: ``clamp(R(a(x-z_in)+b) + z_out)``.

    Returns one list of outputs per channel, for every ``x`` in ``inputs``. Slow by design.
    """
    check_rounding(rounding)
    qmin, qmax = int_range(output_range, "output_range")
    fa, fb = as_fractions(a, "a"), as_fractions(b, "b")
    n = max(len(fa), len(fb))
    fa, fb = _broadcast(fa, n, "a"), _broadcast(fb, n, "b")
    out = []
    for ac, bc in zip(fa, fb):
        row = []
        for x in inputs:
            v = round_fraction(ac * (int(x) - input_zero_point) + bc, rounding) + output_zero_point
            row.append(min(max(v, qmin), qmax))
        out.append(row)
    return out


SATURATE = 2**50


def round_exact_int(A: int, B: int, D: int, x: int, rounding: str = "half_even") -> int:
    """``R((A·x + B) / D)`` in Python integers (``D > 0``)."""
    q, rem = divmod(2 * (A * x + B) + D, 2 * D)  # floor(t + 1/2), remainder 0 at a tie
    if rounding == "half_even" and rem == 0 and q % 2 != 0:
        q -= 1
    return q


def exact_round(affine: ExactAffine, xs: np.ndarray, rounding: str = "half_even"
                ) -> np.ndarray:
    """Exactly rounded ``R(t_c(x))``, int64 ``[C, N]``; ``xs`` is ``[N]`` or per channel ``[C, N]``.

    float64 evaluates the bulk; every entry whose float64 value lies within a bound on its error
    of a rounding boundary (a half-integer) is redone in Python integers. Values beyond
    ``±2^50`` are saturated there (they clamp like the exact value for any output format).
    """
    check_rounding(rounding)
    C = affine.channels
    xs = np.asarray(xs, dtype=np.int64)
    if xs.ndim == 1:
        xs = np.broadcast_to(xs[None, :], (C, xs.size))
    if xs.ndim != 2 or xs.shape[0] != C:
        raise ValueError(f"xs must be 1-D or [channels={C}, N], got shape {xs.shape}")
    if xs.size and np.abs(xs).max() >= 2**52:
        raise ValueError("inputs must satisfy |x| < 2**52")
    a_f = np.array([A / D for A, D in zip(affine.num_a, affine.den)], dtype=np.float64)
    b_f = np.array([B / D for B, D in zip(affine.num_b, affine.den)], dtype=np.float64)
    if not (np.all(np.isfinite(a_f)) and np.all(np.isfinite(b_f))):
        raise ValueError("affine coefficients overflow float64")
    ax = a_f[:, None] * xs.astype(np.float64)
    s = ax + b_f[:, None] + 0.5
    big = np.abs(s) >= SATURATE
    s = np.where(big, np.sign(s) * SATURATE, s)
    # |float64 - exact| is a few ulp of the magnitudes involved; 2**-40 is a wide margin
    guard = 2.0**-40 * (np.abs(ax) + np.abs(b_f)[:, None] + 1.0)
    out = np.floor(s).astype(np.int64)
    near = (np.abs(s - np.rint(s)) <= guard) & ~big
    if near.any():
        rows, cols = np.nonzero(near)
        for r, c in zip(rows.tolist(), cols.tolist()):
            out[r, c] = round_exact_int(affine.num_a[r], affine.num_b[r], affine.den[r],
                                        int(xs[r, c]), rounding)
    return out


def exact_outputs(affine: ExactAffine, xs: np.ndarray, output_range: Any, *,
                  rounding: str = "half_even", output_zero_point: int = 0) -> np.ndarray:
    """``clamp(R(t_c(x)) + z_out, qmin, qmax)`` exactly, int64 ``[C, len(xs)]``."""
    qmin, qmax = int_range(output_range, "output_range")
    if max(abs(qmin), abs(qmax), abs(output_zero_point)) >= SATURATE // 4:
        raise ValueError("output range and zero point must lie within ±2**48")
    n = exact_round(affine, xs, rounding)
    return np.clip(n + output_zero_point, qmin, qmax)
