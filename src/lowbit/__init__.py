"""lowbit: train and deploy neural networks at low numerical precision.

The top-level names are loaded lazily so that ``import lowbit`` stays cheap and a
user only pays for the layers they touch.

Layering (each layer imports only from the ones above it in this list)::

    lowbit.formats   number formats and rounding
    lowbit.kernels   compiled kernels (fused fake-quant, XNOR-popcount GEMM)
    lowbit.quant     autograd quantizers (STE), range estimators, quantizer specs
    lowbit.nn        quantized modules, BatchNorm variants, convert(), summary()
    lowbit.integer   fixed-point arithmetic and the integer-only executor
    lowbit.ptq       post-training quantization (ACIQ, bit allocation, bias correction)
    lowbit.data      dataset readers and batched augmentation
    lowbit.models    model zoo, registered by name
    lowbit.train     training engine, optimizers, loss scaling, checkpoints
    lowbit.cli       the ``lowbit`` command
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "fake_quantize": "lowbit.quant",
    "get_format": "lowbit.formats",
    "convert": "lowbit.nn",
    "summary": "lowbit.nn",
    "QuantScheme": "lowbit.nn",
    "QuantSpec": "lowbit.quant",
    "to_integer": "lowbit.integer",
}

_SUBMODULES = {
    "formats", "kernels", "quant", "nn", "integer", "ptq", "data", "models", "train", "cli",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"lowbit.{name}")
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
