"""Integer-only arithmetic and inference: exact references, fixed-point affine maps,
requantization, and integer-only models (:func:`to_integer`)."""

from lowbit.integer.convert import (
    IntegerConversionError,
    compare_models,
    evaluate_checkpoint,
    export_checkpoint,
    to_integer,
)
from lowbit.integer.exact import (
    ROUNDING_MODES,
    ExactAffine,
    batchnorm_affine,
    exact_outputs,
    fold_scales,
    reference_outputs,
    round_fraction,
)
from lowbit.integer.executor import IntegerModel
from lowbit.integer.fixed_point import (
    FixedPointAffine,
    fixed_point_affine,
    fixed_point_round,
)
from lowbit.integer.onnx_export import export_onnx
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
    "IntegerConversionError",
    "IntegerModel",
    "Requantizer",
    "accumulator_bounds",
    "batchnorm_affine",
    "compare_models",
    "evaluate_checkpoint",
    "export_checkpoint",
    "export_onnx",
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
    "to_integer",
]
