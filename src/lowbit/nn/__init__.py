"""Quantized modules, convert() and summary().

* :class:`QLinear`, :class:`QConv2d` -- ``nn.Linear``/``nn.Conv2d`` with weight, activation
  and gradient quantizers (:mod:`lowbit.nn.modules`);
* :func:`convert` -- swap the layers of a model by scheme name, with per-layer overrides
  (:mod:`lowbit.nn.convert`);
* :func:`summary` -- per-layer formats and memory (:mod:`lowbit.nn.summary`).
"""

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
from .summary import summary

__all__ = [
    "QLinear",
    "QConv2d",
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
]
