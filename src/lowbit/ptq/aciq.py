"""ACIQ: analytical clipping for M-bit uniform quantization (Banner, Nahshan, Soudry, 2019).

A tensor whose values follow a zero-centred prior (Laplace(b) or Gaussian(sigma)) is clipped to
[-alpha, alpha] and the clipped range is split into 2^M uniform bins of width 2*alpha/2^M. The
expected mean-squared error is

    MSE(alpha) = clip(alpha) + alpha^2 / (3 * 4^M)

where the second term is the rounding noise Delta^2/12 of the bins (the paper's approximation:
it neglects the small probability mass outside [-alpha, alpha]) and the first term is the
expected squared distance of the two tails to the clipping value, in closed form:

    Laplace(b):      clip(alpha) = 2 b^2 exp(-alpha / b)
    Gaussian(sigma): clip(alpha) = (sigma^2 + alpha^2) erfc(alpha / (sigma sqrt 2))
                                   - alpha sigma sqrt(2/pi) exp(-alpha^2 / (2 sigma^2))

Both objectives are strictly convex in alpha (their second derivatives are
2 exp(-alpha/b) + 2/(3*4^M) and 2 erfc(alpha/(sigma sqrt 2)) + 2/(3*4^M)), so the optimum is the
unique root of the first derivative, found here by a bracketed, safeguarded Newton iteration in
float64 (no table, no scipy). alpha scales linearly with b or sigma.

Half range (non-negative, post-ReLU tensors). Model the tensor as X = max(Y, 0) with Y from the
zero-centred prior, or more generally a tensor with an arbitrary fraction (1 - p) of exact zeros
whose positive part is the positive half of the prior (exponential(b) for Laplace, half-normal
(sigma) for Gaussian). The grid spans [0, alpha] with 2^M levels, so Delta = alpha / 2^M and zero
is exact (the zeros cost nothing). Only the right tail is clipped. Per element:

    MSE_half(alpha) = p * [ clip(alpha) + alpha^2 / (3 * 4^(M+1)) ]

because the one-sided tail of the positive part carries the whole two-sided clip term of the
prior, and (alpha/2^M)^2/12 = alpha^2/(3*4^(M+1)). The factor p does not move the minimiser, so
the half-range optimum at M bits equals the full-range optimum at M + 1 bits (the paper's code
tables are the full tables shifted by one bit; its Laplace entry 5.02 for 3 bits is a truncation
of the optimum 5.0286). With p = 1/2 (a zero-centred pre-activation) this is also half the
full-range objective at M + 1 bits. The scale of the positive part is estimated as
b = mean(x | x > 0) (exponential MLE) and sigma = sqrt(mean(x^2 | x > 0)) (half-normal MLE).
"""

from __future__ import annotations

import math
from functools import lru_cache

DISTRIBUTIONS = ("laplace", "gaussian")

_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _check_distribution(distribution: str) -> str:
    if not isinstance(distribution, str) or distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}"
        )
    return distribution


def _check_bits(bits: float) -> float:
    if isinstance(bits, bool) or not isinstance(bits, (int, float)):
        raise TypeError(f"bits must be a number >= 0, got {type(bits).__name__}")
    bits = float(bits)
    if not math.isfinite(bits) or bits < 0:
        raise ValueError(f"bits must be a finite number >= 0, got {bits}")
    return bits


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def clip_mse(alpha: float, distribution: str = "laplace", scale: float = 1.0) -> float:
    """Expected squared clipping error of both tails beyond +-alpha of a zero-centred prior."""
    _check_distribution(distribution)
    scale = _check_positive("scale", scale)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
    a = float(alpha) / scale
    return scale * scale * _clip_unit(a, distribution)


def _clip_unit(a: float, distribution: str) -> float:
    if distribution == "laplace":
        return 2.0 * math.exp(-a)
    return (1.0 + a * a) * math.erfc(a / _SQRT2) - a * _SQRT_2_OVER_PI * math.exp(-0.5 * a * a)


def _clip_unit_d1(a: float, distribution: str) -> float:
    """d/da of the unit-scale clipping error."""
    if distribution == "laplace":
        return -2.0 * math.exp(-a)
    return 2.0 * a * math.erfc(a / _SQRT2) - 4.0 * _INV_SQRT_2PI * math.exp(-0.5 * a * a)


def _clip_unit_d2(a: float, distribution: str) -> float:
    if distribution == "laplace":
        return 2.0 * math.exp(-a)
    return 2.0 * math.erfc(a / _SQRT2)


def aciq_mse(
    alpha: float,
    bits: float,
    distribution: str = "laplace",
    scale: float = 1.0,
    half_range: bool = False,
) -> float:
    """ACIQ's analytic expected MSE of clipping at ``alpha`` and quantizing to ``bits`` bits.

    Full range: clip(alpha) + alpha^2/(3*4^M). Half range: the per-element MSE of a tensor
    with half its mass at exact zero, 0.5 * [clip(alpha) + alpha^2/(3*4^(M+1))] (see the
    module docstring for the derivation).
    """
    bits = _check_bits(bits)
    rounding_bits = bits + 1.0 if half_range else bits
    total = clip_mse(alpha, distribution, scale) + float(alpha) ** 2 / (3.0 * 4.0**rounding_bits)
    return 0.5 * total if half_range else total


def aciq_clip(
    bits: float,
    distribution: str = "laplace",
    scale: float = 1.0,
    half_range: bool = False,
) -> float:
    """Clipping value alpha minimising ACIQ's expected MSE for ``bits``-bit quantization.

    ``scale`` is the Laplace b (mean |x - mean|) or the Gaussian sigma (std); for
    ``half_range`` (non-negative tensors, grid [0, alpha]) the scale of the positive part.
    The constant is computed by root-finding, not looked up.
    """
    bits = _check_bits(bits)
    _check_distribution(distribution)
    scale = _check_positive("scale", scale)
    if not isinstance(half_range, bool):
        raise TypeError(f"half_range must be a bool, got {type(half_range).__name__}")
    effective_bits = bits + 1.0 if half_range else bits
    return scale * _unit_alpha(effective_bits, distribution)


@lru_cache(maxsize=512)
def _unit_alpha(bits: float, distribution: str) -> float:
    """Root of d/da [clip(a) + a^2/(3*4^bits)] for unit scale (safeguarded Newton)."""
    c = 2.0 / (3.0 * 4.0**bits)  # derivative of the rounding term is c * a

    def grad(a: float) -> float:
        return _clip_unit_d1(a, distribution) + c * a

    def hess(a: float) -> float:
        return _clip_unit_d2(a, distribution) + c

    lo, hi = 0.0, 1.0
    while grad(hi) <= 0.0:  # grad(0) < 0 and grad -> +inf: expand the bracket
        lo, hi = hi, 2.0 * hi
    x = 0.5 * (lo + hi)
    for _ in range(200):
        g = grad(x)
        if g == 0.0:
            return x
        if g < 0.0:
            lo = x
        else:
            hi = x
        step = x - g / hess(x)
        # accept Newton only inside the bracket; otherwise bisect
        x_new = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(x_new - x) <= 1e-15 * max(1.0, abs(x)) or hi - lo <= 1e-15 * max(1.0, hi):
            return x_new
        x = x_new
    return x


def golden_section(f, lo: float, hi: float, *, tol: float = 1e-12, max_iter: int = 200) -> float:
    """Minimiser of a unimodal scalar function on [lo, hi] by golden-section search (float64)."""
    lo, hi = float(lo), float(hi)
    if not hi > lo:
        raise ValueError(f"need lo < hi, got lo={lo}, hi={hi}")
    invphi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c = b - invphi * (b - a)
    d = a + invphi * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(max_iter):
        if b - a <= tol * max(1.0, abs(a) + abs(b)):
            break
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - invphi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + invphi * (b - a)
            fd = f(d)
    return 0.5 * (a + b)
