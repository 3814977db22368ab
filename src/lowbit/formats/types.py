"""Number formats: k-bit integers, binary, ternary and minifloats ``e{E}m{M}``.

A format only describes a set of representable values; quantizing a tensor onto it is done by
:func:`lowbit.quant.functional.fake_quantize`. Every format has a short ``name`` a user can type
(``get_format(fmt.name) == fmt``) and ``bits``, the storage bits per value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "Format",
    "IntFormat",
    "BinaryFormat",
    "TernaryFormat",
    "FloatFormat",
    "get_format",
    "format_names",
]

INT_BITS = range(2, 17)
FLOAT_EXP_BITS = range(2, 9)
FLOAT_MAN_BITS = range(0, 24)


class Format:
    """Base class of all number formats (``name``, ``bits``)."""

    name: str
    bits: int

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class IntFormat(Format):
    """A ``bits``-bit integer grid ``[qmin, qmax]``.

    Signed: ``[-2^(b-1), 2^(b-1)-1]``; with ``narrow_range`` the most negative code is dropped
    (``[-2^(b-1)+1, 2^(b-1)-1]``, symmetric). Unsigned: ``[0, 2^b-1]`` (``narrow_range`` drops 0's
    partner at the top: ``[0, 2^b-2]``).
    """

    bits: int
    signed: bool = True
    narrow_range: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"bits must be an int in 2..16, got {self.bits!r}")
        if self.bits not in INT_BITS:
            raise ValueError(f"bits must be in 2..16 for integer formats, got {self.bits}")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        if not self.signed:
            return 2**self.bits - 1 - (1 if self.narrow_range else 0)
        return 2 ** (self.bits - 1) - 1

    @property
    def name(self) -> str:  # type: ignore[override]
        base = f"{'int' if self.signed else 'uint'}{self.bits}"
        return base + ("-narrow" if self.narrow_range else "")


@dataclass(frozen=True)
class BinaryFormat(Format):
    """Sign binarization to ``{-1, +1}`` with ``sign(0) = +1``.

    With ``scaled=True`` ("binary-scaled", XNOR-Net style) the values are ``{-a, +a}`` with
    ``a = mean |x|`` per tensor or per channel (when an ``axis`` is given to fake_quantize).
    """

    scaled: bool = False
    bits: int = field(default=1, init=False)

    @property
    def name(self) -> str:  # type: ignore[override]
        return "binary-scaled" if self.scaled else "binary"


@dataclass(frozen=True)
class TernaryFormat(Format):
    """Ternarization to ``{-a, 0, +a}`` (TWN).

    Values with ``|x| <= threshold * mean|x|`` become 0, the rest ``sign(x) * a``. With
    ``scaled=True`` (the default, name "ternary") ``a`` is the mean of ``|x|`` over the kept
    values (the TWN estimate); with ``scaled=False`` ("ternary-unscaled") ``a = 1``.
    """

    threshold: float = 0.7
    scaled: bool = True
    bits: int = field(default=2, init=False)

    def __post_init__(self) -> None:
        if not (0.0 <= float(self.threshold) < float("inf")):
            raise ValueError(f"threshold must be a finite number >= 0, got {self.threshold!r}")

    @property
    def name(self) -> str:  # type: ignore[override]
        base = "ternary" if self.scaled else "ternary-unscaled"
        if self.threshold != 0.7:
            base += f"@{self.threshold:g}"
        return base


@dataclass(frozen=True)
class FloatFormat(Format):
    """A binary floating-point format with ``exp_bits`` exponent and ``man_bits`` mantissa bits.

    Bias ``2^(E-1) - 1``, gradual underflow (subnormals), round-to-nearest-even by default.
    IEEE-style formats reserve the top exponent for inf/NaN. ``finite=True`` gives the OCP
    "fn" convention (top exponent holds normal numbers; only the all-ones code is NaN, no inf),
    which is the default for e4m3 (max 448). e5m2 is IEEE-style (max 57344).
    """

    exp_bits: int
    man_bits: int
    finite: bool | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        for arg, valid in (("exp_bits", FLOAT_EXP_BITS), ("man_bits", FLOAT_MAN_BITS)):
            value = getattr(self, arg)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{arg} must be an int, got {value!r}")
            if value not in valid:
                raise ValueError(f"{arg} must be in {valid.start}..{valid.stop - 1}, got {value}")
        if self.finite is None:
            object.__setattr__(self, "finite", (self.exp_bits, self.man_bits) == (4, 3))
        if self.finite and self.exp_bits == 8:
            raise ValueError("finite=True is not supported with exp_bits=8")

    @property
    def bits(self) -> int:  # type: ignore[override]
        return 1 + self.exp_bits + self.man_bits

    @property
    def name(self) -> str:  # type: ignore[override]
        if self.label is not None:
            return self.label
        base = f"e{self.exp_bits}m{self.man_bits}"
        default_finite = (self.exp_bits, self.man_bits) == (4, 3)
        if self.finite != default_finite:
            base += "fn" if self.finite else "-ieee"
        return base

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite number."""
        top = 2**self.exp_bits - 1
        return (top if self.finite else top - 1) - self.bias

    @property
    def max(self) -> float:
        """Largest finite value."""
        m = self.man_bits
        # finite ("fn") formats lose the all-ones mantissa at the top exponent to NaN
        frac = 2.0 - 2.0 ** (1 - m) if self.finite else 2.0 - 2.0 ** (-m)
        return frac * 2.0**self.emax

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.man_bits)


_ALIASES: dict[str, Format] = {
    "binary": BinaryFormat(),
    "binary-scaled": BinaryFormat(scaled=True),
    "ternary": TernaryFormat(),
    "ternary-unscaled": TernaryFormat(scaled=False),
    "e4m3": FloatFormat(4, 3),
    "e4m3fn": FloatFormat(4, 3),
    "e5m2": FloatFormat(5, 2),
    "fp16": FloatFormat(5, 10, label="fp16"),
    "bf16": FloatFormat(8, 7, label="bf16"),
    "fp32": FloatFormat(8, 23, label="fp32"),
}
_INT_RE = re.compile(r"(u?)int(\d+)(-narrow)?")
_FLOAT_RE = re.compile(r"e(\d+)m(\d+)(fn|-ieee)?")
_TERNARY_RE = re.compile(r"(ternary|ternary-unscaled)@([0-9.eE+-]+)")


def format_names() -> list[str]:
    """The names :func:`get_format` understands (patterns written with placeholders)."""
    return [
        "int2..int16",
        "uint2..uint16",
        "int{k}-narrow",
        *_ALIASES,
        "e{E}m{M} (E in 2..8, M in 0..23)",
        "ternary@{threshold}",
    ]


def get_format(name_or_format: str | Format) -> Format:
    """Return the format named by ``name_or_format`` (a format object is returned unchanged).

    Raises ValueError for unknown names, listing the valid ones.
    """
    if isinstance(name_or_format, Format):
        return name_or_format
    if not isinstance(name_or_format, str):
        raise TypeError(
            f"fmt must be a format name (str) or a Format, got {type(name_or_format).__name__}"
        )
    key = name_or_format.strip().lower()
    if key in _ALIASES:
        return _ALIASES[key]
    valid = ", ".join(format_names())
    try:
        if m := _INT_RE.fullmatch(key):
            return IntFormat(int(m.group(2)), signed=not m.group(1), narrow_range=bool(m.group(3)))
        if m := _FLOAT_RE.fullmatch(key):
            finite = {"fn": True, "-ieee": False, None: None}[m.group(3)]
            return FloatFormat(int(m.group(1)), int(m.group(2)), finite=finite)
        if m := _TERNARY_RE.fullmatch(key):
            return TernaryFormat(float(m.group(2)), scaled=m.group(1) == "ternary")
    except ValueError as err:
        raise ValueError(f"fmt {name_or_format!r}: {err}. Valid formats: {valid}") from None
    raise ValueError(f"unknown format {name_or_format!r}; valid formats: {valid}")
