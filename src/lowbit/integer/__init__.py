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

__all__ = [
    "ROUNDING_MODES",
    "ExactAffine",
    "FixedPointAffine",
    "batchnorm_affine",
    "exact_outputs",
    "fixed_point_affine",
    "fixed_point_round",
    "fold_scales",
    "reference_outputs",
    "round_fraction",
]
