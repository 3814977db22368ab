"""Post-training quantization (Banner, Nahshan, Soudry, NeurIPS 2019).

ACIQ analytical clipping (:func:`aciq_clip`), clipping methods per tensor or per channel
(:func:`clip_range`), per-channel bit allocation (:func:`allocate_bits`), bias correction
(:func:`bias_correct`), BatchNorm folding (:func:`fold_batchnorms`) and calibration
(:func:`calibrate`); :func:`quantize_model` applies them to a model, :func:`run_ptq` (one
precision) and :func:`run_ptq_table` (the paper's ablation table) to a lowbit checkpoint.
"""

from .aciq import DISTRIBUTIONS, aciq_clip, aciq_mse, clip_mse, golden_section
from .bitalloc import allocate_bits, allocation_levels
from .calibrate import calibrate, calibration_layers
from .clipping import CLIP_METHODS, ClipRange, choose_prior, clip_range, clip_tensor
from .correction import bias_correct
from .fold import find_bn_pairs, fold_batchnorms, fold_bn
from .model import PTQReport, RangeQuantizer, quantize_model, restore_quantized
from .quantizer import fake_quant_range, range_to_qparams, sqnr_db
from .run import (
    OPTIONS,
    VARIANTS,
    check_options,
    evaluate_quantized,
    load_quantized,
    ptq_options,
    run_ptq,
    run_ptq_table,
)
from .stats import RunningStats, Stats

__all__ = [
    "CLIP_METHODS",
    "OPTIONS",
    "DISTRIBUTIONS",
    "VARIANTS",
    "ClipRange",
    "PTQReport",
    "RangeQuantizer",
    "RunningStats",
    "Stats",
    "aciq_clip",
    "aciq_mse",
    "allocate_bits",
    "allocation_levels",
    "bias_correct",
    "calibrate",
    "check_options",
    "calibration_layers",
    "choose_prior",
    "clip_mse",
    "clip_range",
    "clip_tensor",
    "evaluate_quantized",
    "fake_quant_range",
    "find_bn_pairs",
    "fold_batchnorms",
    "fold_bn",
    "golden_section",
    "load_quantized",
    "quantize_model",
    "ptq_options",
    "range_to_qparams",
    "restore_quantized",
    "run_ptq",
    "run_ptq_table",
    "sqnr_db",
]
