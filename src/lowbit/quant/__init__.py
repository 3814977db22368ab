"""Autograd quantizers (straight-through estimators), range estimators and quantizer specs.

* :func:`fake_quantize`, :func:`quantize_grad` -- the quantizer contract
  (:mod:`lowbit.quant.functional`);
* :class:`QuantSpec` -- how one tensor is quantized (:mod:`lowbit.quant.spec`);
* observers -- range estimators choosing scale and zero point (:mod:`lowbit.quant.observers`).
"""

from .functional import fake_quantize, quantize_grad
from .observers import (
    OBSERVERS,
    SCALE_EPS,
    EMAObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
    qparams_from_range,
    tensor_range,
)
from .spec import QuantSpec

__all__ = [
    "fake_quantize",
    "quantize_grad",
    "QuantSpec",
    "Observer",
    "MinMaxObserver",
    "EMAObserver",
    "PercentileObserver",
    "MSEObserver",
    "OBSERVERS",
    "SCALE_EPS",
    "make_observer",
    "qparams_from_range",
    "tensor_range",
]
