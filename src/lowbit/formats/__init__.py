"""Number formats and rounding (the bottom layer of lowbit).

``get_format("int8")``, ``get_format("e5m2")``, ... return small immutable format objects;
:mod:`lowbit.formats.rounding` holds round-to-nearest-even, stochastic rounding and the
reference minifloat rounding that the quantizers and kernels are tested against.
"""

from .rounding import (
    ROUNDING_MODES,
    draw_seed,
    random_bits31,
    round_nearest_even,
    round_to_float_format,
    stochastic_round,
)
from .types import (
    BinaryFormat,
    FloatFormat,
    Format,
    IntFormat,
    TernaryFormat,
    format_names,
    get_format,
)

__all__ = [
    "Format",
    "IntFormat",
    "BinaryFormat",
    "TernaryFormat",
    "FloatFormat",
    "get_format",
    "format_names",
    "ROUNDING_MODES",
    "draw_seed",
    "random_bits31",
    "round_nearest_even",
    "stochastic_round",
    "round_to_float_format",
]
