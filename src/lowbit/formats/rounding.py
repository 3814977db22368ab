"""Rounding onto integer grids and minifloat formats, in plain torch (the reference semantics).

Two rounding modes:

* ``"nearest"``: round half to even (IEEE default, ``torch.round``).
* ``"stochastic"``: a value ``t`` between grid points ``lo < t < hi`` rounds up with probability
  ``(t - lo) / (hi - lo)``; values on the grid stay put. The random numbers are 31-bit integers
  ``r`` from a counter-based generator (:func:`random_bits31`): ``t`` rounds up iff
  ``r < floor(frac * 2^31)``. So the result is unbiased for every ``frac`` that is a multiple of
  ``2^-31`` (all float32 values in the normal range of a format) and otherwise biased by less than
  ``2^-31`` of a grid step. The generator is keyed by a 64-bit seed drawn from a
  ``torch.Generator`` and by each element's position, so results are reproducible and the fused
  C++ kernel (``lowbit.kernels.fake_quant``) produces the same bits.
"""

from __future__ import annotations

import torch

from .types import FloatFormat

__all__ = [
    "ROUNDING_MODES",
    "check_rounding",
    "draw_seed",
    "random_bits31",
    "round_nearest_even",
    "stochastic_round",
    "round_to_float_format",
]

ROUNDING_MODES = ("nearest", "stochastic")

# splitmix64 constants, as signed int64 (torch has no uint64 arithmetic)
_GAMMA = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64
_TWO31 = float(2**31)


def check_rounding(rounding: str) -> str:
    """Validate a rounding mode name."""
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    return rounding


def draw_seed(generator: torch.Generator | None = None) -> int:
    """Draw a 64-bit seed (as a signed int) from ``generator`` (default: torch's global one)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
    lo = torch.randint(0, 2**32, (2,), generator=generator, dtype=torch.int64)
    seed = (int(lo[0]) << 32) | int(lo[1])
    return seed - 2**64 if seed >= 2**63 else seed


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def random_bits31(
    seed: int, shape: torch.Size | tuple[int, ...], device: torch.device | str | None = None
) -> torch.Tensor:
    """31-bit random integers (int64 tensor of ``shape``), element ``i`` (row-major) being the top
    31 bits of splitmix64's output for state ``seed + (i + 1) * 0x9E3779B97F4A7C15``."""
    n = 1
    for s in shape:
        n *= int(s)
    z = torch.arange(1, n + 1, dtype=torch.int64, device=device)
    z = z * _GAMMA + seed
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return _shr(z, 33).view(tuple(shape))


def round_nearest_even(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties to even."""
    return torch.round(x)


def _stochastic_up(frac: torch.Tensor, rand31: torch.Tensor) -> torch.Tensor:
    """Bernoulli(frac) from 31-bit integers: True iff rand31 < floor(frac * 2^31)."""
    return rand31 < torch.trunc(frac.double() * _TWO31).to(torch.int64)


def stochastic_round(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    rand31: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round to one of the two neighbouring integers, up with probability ``x - floor(x)``.

    The magnitude is rounded (``sign(x) * sround(|x|)``), which is unbiased as well and is how
    the fused kernel does it. ``rand31`` (from :func:`random_bits31`) may be given instead of
    ``generator``.
    """
    if rand31 is None:
        rand31 = random_bits31(draw_seed(generator), x.shape, x.device)
    a = x.abs()
    lo = torch.floor(a)
    up = _stochastic_up(a - lo, rand31)
    return torch.copysign(lo + up.to(a.dtype), x)


def _pow2(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2**k exactly, as float32 or float64, for integer k in that dtype's normal range."""
    if dtype == torch.float64:
        return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((k.to(torch.int32) + 127) << 23).view(torch.float32)


def round_to_float_format(
    x: torch.Tensor,
    fmt: FloatFormat,
    rounding: str = "nearest",
    *,
    rand31: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    saturate: bool = True,
) -> torch.Tensor:
    """Round ``x`` onto the values of ``fmt`` (subnormals included); returns x's dtype.

    Values beyond ``fmt.max`` (and infinities) become ``±fmt.max`` with ``saturate=True``, else
    ``±inf``. NaN stays NaN; the sign of zero is kept. The rounding is done once, exactly (a
    float64 input is not first rounded to float32 as ``Tensor.to(float8)`` does); the result is
    then cast to ``x.dtype``, which is exact whenever ``fmt`` fits in that dtype.
    """
    check_rounding(rounding)
    # float32 arithmetic is exact here unless the format's grid steps leave float32's range
    wd = torch.float64 if x.dtype == torch.float64 or fmt.exp_bits == 8 else torch.float32
    w = x.to(wd)
    a = w.abs()
    _, ex = torch.frexp(a)
    e = (ex - 1).clamp(fmt.emin, fmt.emax + 1)
    qexp = e - fmt.man_bits
    t = a * _pow2(-qexp, wd)  # exact: scaling by a power of two
    if rounding == "nearest":
        r = torch.round(t)
    else:
        if rand31 is None:
            rand31 = random_bits31(draw_seed(generator), x.shape, x.device)
        lo = torch.floor(t)
        r = lo + _stochastic_up(t - lo, rand31).to(wd)
    y = r * _pow2(qexp, wd)
    y = torch.where(y > fmt.max, fmt.max if saturate else float("inf"), y)
    y = torch.copysign(y, w)
    y = torch.where(torch.isnan(w), w, y)
    return y.to(x.dtype)
