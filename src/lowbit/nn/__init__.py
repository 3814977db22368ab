"""Quantized modules, convert() and summary().

* :class:`QLinear`, :class:`QConv2d` -- ``nn.Linear``/``nn.Conv2d`` with weight, activation
  and gradient quantizers (:mod:`lowbit.nn.modules`); :class:`QLSTM` -- ``nn.LSTM`` with
  k-bit weights, inputs, gates and hidden state (:mod:`lowbit.nn.qlstm`);
* :func:`convert` -- swap the layers of a model by scheme name, with per-layer overrides
  (:mod:`lowbit.nn.convert`);
* :func:`summary` -- per-layer formats and memory (:mod:`lowbit.nn.summary`);
* quantized backward GEMMs (8-bit/FP8 errors, gradient bifurcation) selected by a scheme's
  ``gemm`` (:mod:`lowbit.nn.qgemm`);
* BatchNorm variants: Range/L1/L-inf BN (:mod:`lowbit.nn.batchnorm`), shift-based BN
  (:mod:`lowbit.nn.shift_bn`, :func:`to_shift_batchnorm`, ``convert(norm="shift")``), bounded weight normalisation (:mod:`lowbit.nn.weight_norm`);
* packed binary inference layers (:mod:`lowbit.nn.binary`).
"""

from .batchnorm import (
    BATCHNORM_VARIANTS,
    L1BatchNorm1d,
    L1BatchNorm2d,
    LinfBatchNorm1d,
    LinfBatchNorm2d,
    RangeBatchNorm1d,
    RangeBatchNorm2d,
    replace_batchnorm,
)
from .binary import PackedBinaryConv2d, PackedBinaryLinear, pack_binary_model
from .convert import (
    QuantScheme,
    act_spec,
    convert,
    get_scheme,
    grad_spec,
    list_schemes,
    register_scheme,
    weight_spec,
)
from .modules import (
    GradQuantizer,
    QConv2d,
    QLinear,
    Quantizer,
    clip_latent_weights,
    freeze_observers,
    list_gemms,
    quantized_modules,
    register_gemm,
    set_calibrating,
)
from .qgemm import (
    QuantizedBackward,
    list_qgemms,
    quantized_conv2d,
    quantized_linear,
    record_gemm_inputs,
    register_qgemm,
)
from .qlstm import QLSTM
from .shift_bn import ShiftBatchNorm1d, ShiftBatchNorm2d, to_shift_batchnorm
from .summary import summary
from .weight_norm import (
    BoundedWeightNorm,
    apply_bounded_weight_norm,
    remove_bounded_weight_norm,
)

__all__ = [
    "QuantizedBackward",
    "register_qgemm",
    "list_qgemms",
    "quantized_linear",
    "quantized_conv2d",
    "record_gemm_inputs",
    "QLinear",
    "QConv2d",
    "QLSTM",
    "Quantizer",
    "GradQuantizer",
    "QuantScheme",
    "convert",
    "register_scheme",
    "get_scheme",
    "list_schemes",
    "weight_spec",
    "act_spec",
    "grad_spec",
    "register_gemm",
    "list_gemms",
    "quantized_modules",
    "clip_latent_weights",
    "set_calibrating",
    "freeze_observers",
    "summary",
    "BATCHNORM_VARIANTS",
    "RangeBatchNorm1d",
    "RangeBatchNorm2d",
    "L1BatchNorm1d",
    "L1BatchNorm2d",
    "LinfBatchNorm1d",
    "LinfBatchNorm2d",
    "replace_batchnorm",
    "ShiftBatchNorm1d",
    "ShiftBatchNorm2d",
    "to_shift_batchnorm",
    "BoundedWeightNorm",
    "apply_bounded_weight_norm",
    "remove_bounded_weight_norm",
    "PackedBinaryLinear",
    "PackedBinaryConv2d",
    "pack_binary_model",
]
