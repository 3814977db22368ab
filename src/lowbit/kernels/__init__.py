"""Compiled kernels (fused fake quantization, bit packing, XNOR-popcount GEMM).

Each kernel module compiles its C++ source on first use and keeps a pure-torch fallback.
"""
