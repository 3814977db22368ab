"""Integer-only arithmetic: exact references, fixed-point affine maps, requantization."""

from lowbit.integer.exact import (
    ROUNDING_MODES,
    ExactAffine,
    batchnorm_affine,
    exact_outputs,
    fold_scales,
    reference_outputs,
    round_fraction,
)
from lowbit.integer.fixed_point import (
    FixedPointAffine,
    fixed_point_affine,
    fixed_point_round,
)
from lowbit.integer.ops import (
    Requantizer,
    accumulator_bounds,
    int_conv2d,
    int_linear,
    make_requantizer,
    requant_coefficients,
)
from lowbit.integer.requant import disagreements, requantize

__all__ = [
    "ROUNDING_MODES",
    "ExactAffine",
    "FixedPointAffine",
    "Requantizer",
    "accumulator_bounds",
    "batchnorm_affine",
    "disagreements",
    "exact_outputs",
    "fixed_point_affine",
    "fixed_point_round",
    "fold_scales",
    "int_conv2d",
    "int_linear",
    "make_requantizer",
    "reference_outputs",
    "requant_coefficients",
    "requantize",
    "round_fraction",
]
