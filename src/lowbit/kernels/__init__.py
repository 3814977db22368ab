"""Compiled kernels (fused fake quantization, bit packing, XNOR-popcount GEMM).

Each kernel module compiles its C++ source on first use and keeps a pure-torch fallback::

    from lowbit.kernels import pack_signs, xnor_matmul
    xnor_matmul(a, b)          # exactly a @ b for +-1 matrices, as int32, any M, K, N
"""

from .pack import PackedBits, available_backends, pack_bits, pack_signs, unpack_signs
from .xnor import bitplane_matmul, xnor_matmul

__all__ = [
    "PackedBits",
    "available_backends",
    "bitplane_matmul",
    "pack_bits",
    "pack_signs",
    "unpack_signs",
    "xnor_matmul",
]
