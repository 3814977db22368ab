"""XNOR-popcount matrix products of ±1 matrices, and the first-layer bit-plane product.

For rows ``a`` and ``b`` of length ``K`` with entries in ``{-1, +1}`` stored as sign bits,
``a · b = K - 2 * popcount(a XOR b)`` (Courbariaux, Hubara et al., BNN/QNN). The compiled CPU
kernel (``csrc/xnor.cpp``) picks AVX-512 VPOPCNTDQ, AVX2 or scalar popcnt at run time; the
``"torch"`` backend is a pure-torch reference used when the extension cannot be built. CUDA
tensors use the Triton kernel (``triton_xnor.py``, optional ``gpu`` extra) for every backend but
``"torch"``; without Triton they fall back to the pure-torch path.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from lowbit.kernels.pack import (
    PackedBits,
    check_backend,
    extension,
    pack_bits,
    pack_signs,
    popcount,
    resolve_backend,
)

__all__ = ["bitplane_matmul", "uses_triton", "xnor_matmul"]

_TORCH_CHUNK_BYTES = 1 << 20  # working set of the pure-torch path (stays in cache)


@cache
def _triton_available() -> bool:
    """Whether the Triton kernel module can run (Triton importable); imported only when asked."""
    from lowbit.kernels import triton_xnor

    return triton_xnor.available()


def uses_triton(device: torch.device | str, backend: str) -> bool:
    """Whether :func:`xnor_matmul` runs the Triton kernel for packed rows on ``device``.

    True only for CUDA devices with a backend other than ``"torch"`` when Triton is installed;
    CPU tensors always use the compiled CPU kernel or the pure-torch path.
    """
    check_backend(backend)
    device = torch.device(device)
    return device.type == "cuda" and backend != "torch" and _triton_available()


def _as_rows(x: Tensor | PackedBits, name: str, transpose: bool, backend: str) -> PackedBits:
    """Pack a ±1 matrix into rows along the reduction dimension (``transpose`` for ``b``)."""
    if isinstance(x, PackedBits):
        if x.words.dim() != 2:
            raise ValueError(f"{name} must be 2-D packed rows, got shape {tuple(x.words.shape)}")
        return x
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor or PackedBits, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(x.shape)}")
    return pack_signs(x.t() if transpose else x, backend="torch" if backend == "torch" else "auto")


def _affine_vector(v: Tensor | float | None, n: int, name: str, device: torch.device
                   ) -> Tensor | None:
    """A contiguous float32 ``[n]`` vector (scalars broadcast), or None."""
    if v is None:
        return None
    t = torch.as_tensor(v, dtype=torch.float32, device=device)
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got {tuple(t.shape)}")
    return t.contiguous()


def _apply_affine(acc: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor:
    """Reference epilogue: ``float32(acc) * scale + bias`` (two roundings, like the kernel)."""
    y = acc.to(torch.float32)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


def xnor_matmul(
    a: Tensor | PackedBits,
    b: Tensor | PackedBits,
    *,
    scale: Tensor | float | None = None,
    bias: Tensor | float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Exact ``sign(a) @ sign(b)`` (``+1`` at 0) as an int32 ``[M, N]`` tensor.

    ``a`` is an ``[M, K]`` matrix or its packed rows (``pack_signs(a)``); ``b`` is a ``[K, N]``
    matrix or the packed rows of its transpose (``pack_signs(b.T)``, i.e. one packed row per
    output column, the layout of a linear layer's weight). For ``±1`` inputs the result equals
    ``a @ b`` exactly. With ``scale`` and/or ``bias`` (scalars or ``[N]`` vectors) the result is
    float32 ``float(a @ b) * scale + bias``, fused into the kernel. ``backend``: ``"auto"``,
    ``"avx512"``, ``"avx2"``, ``"scalar"``, ``"torch"``.
    """
    requested = backend  # "auto" stays a Triton request on CUDA whatever the CPU offers
    backend = resolve_backend(backend)
    pa = _as_rows(a, "a", transpose=False, backend=backend)
    pb = _as_rows(b, "b", transpose=True, backend=backend)
    if pa.length != pb.length:
        raise ValueError(
            f"inner dimensions differ: a has K={pa.length}, b has K={pb.length}"
        )
    if pa.length >= 2**31:
        raise ValueError(f"K={pa.length} does not fit the int32 result")
    if pa.words.device != pb.words.device:
        raise ValueError(f"a and b are on different devices: {pa.words.device}, {pb.words.device}")
    n = pb.words.shape[0]
    sv = _affine_vector(scale, n, "scale", pa.words.device)
    bv = _affine_vector(bias, n, "bias", pa.words.device)
    out_float = sv is not None or bv is not None
    if uses_triton(pa.words.device, requested):
        from lowbit.kernels.triton_xnor import triton_xnor_gemm

        acc = triton_xnor_gemm(pa.words, pb.words, pa.length)
        return _apply_affine(acc, sv, bv) if out_float else acc
    if backend == "torch" or pa.words.device.type != "cpu":
        acc = _xnor_matmul_torch(pa.words, pb.words, pa.length)
        return _apply_affine(acc, sv, bv) if out_float else acc
    return extension().xnor_gemm(
        pa.words.contiguous(), pb.words.contiguous(), pa.length, sv, bv, out_float, backend
    )


def _xnor_matmul_torch(a: Tensor, b: Tensor, k: int) -> Tensor:
    """Reference path: XOR of words, SWAR popcount, summed in int32; chunked over rows."""
    m, w = a.shape
    n = b.shape[0]
    out = torch.empty(m, n, dtype=torch.int32, device=a.device)
    if m == 0 or n == 0:
        return out
    rows = max(1, _TORCH_CHUNK_BYTES // max(1, n * w * 8))
    for start in range(0, m, rows):
        x = a[start : start + rows, None, :] ^ b[None, :, :]
        counts = popcount(x).sum(-1, dtype=torch.int32)
        out[start : start + rows] = k - 2 * counts
    return out


def bitplane_matmul(
    x: Tensor,
    w: Tensor | PackedBits,
    *,
    bits: int = 8,
    signed: bool | None = None,
    scale: Tensor | float | None = None,
    bias: Tensor | float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Exact ``x @ sign(w)`` for an integer ``x`` (fixed-point first-layer input), as int32.

    ``x`` is ``[M, K]`` with integer values of ``bits`` bits (unsigned ``0..2^bits-1``, or
    two's-complement signed ``-2^(bits-1)..2^(bits-1)-1``; ``signed=None`` means signed when
    ``x`` has a negative value). ``w`` is ``[K, N]`` or the packed rows of its transpose. The
    product is the QNN bit-plane sum ``sum_n 2^(n-1) * (x^n · w)`` where ``x^n`` is bit plane
    ``n`` (the top plane weighs ``-2^(bits-1)`` when signed), each plane product computed with
    XNOR-popcount. ``scale``/``bias`` give float32 ``float(x @ w) * scale + bias`` as in
    :func:`xnor_matmul`.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"x must have an integer dtype, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be a 2-D matrix, got shape {tuple(x.shape)}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int in 1..16, got {bits!r}")
    lo_x, hi_x = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
    if signed is None:
        signed = lo_x < 0
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if lo_x < lo or hi_x > hi:
        raise ValueError(
            f"x has values in [{lo_x}, {hi_x}], outside the "
            f"{'signed' if signed else 'unsigned'} {bits}-bit range [{lo}, {hi}]"
        )
    requested = backend
    backend = resolve_backend(backend)
    pw = _as_rows(w, "w", transpose=True, backend=backend)
    m, k = x.shape
    if pw.length != k:
        raise ValueError(f"inner dimensions differ: x has K={k}, w has K={pw.length}")
    if k * 2**bits >= 2**31:
        raise ValueError(f"K={k} with {bits}-bit inputs can overflow the int32 result")
    n = pw.words.shape[0]
    sv = _affine_vector(scale, n, "scale", x.device)
    bv = _affine_vector(bias, n, "bias", x.device)
    out_float = sv is not None or bv is not None
    xi = x.to(torch.int32).contiguous()
    if backend != "torch" and x.device.type == "cpu":
        ext = extension()
        planes = ext.pack_bitplanes_i32(xi, bits, backend)  # [M * bits, W], row-major planes
        return ext.bitplane_gemm(planes, pw.words.contiguous(), k, bits, signed, sv, bv,
                                 out_float, backend)
    shifts = torch.arange(bits, dtype=torch.int32, device=x.device)
    planes = ((xi.unsqueeze(-2) >> shifts.view(bits, 1)) & 1).bool()  # [M, bits, K]
    # a 0/1 plane b is the ±1 vector s = 2b - 1: set bit (-1) where b == 0
    # here backend is "torch" or x is not on the CPU (CUDA: the Triton kernel, via xnor_matmul)
    dots = xnor_matmul(pack_bits(~planes.reshape(m * bits, k)), pw, backend=requested)
    # b·w = (s·w + sum(w)) / 2; sum(w) is the product with the all-(+1) row
    ones = PackedBits(torch.zeros(1, pw.words.shape[1], dtype=torch.int64, device=x.device), k)
    col_sums = xnor_matmul(ones, pw, backend=requested).to(torch.int64)  # [1, N]
    coef = [1 << i for i in range(bits)]
    if signed:
        coef[-1] = -coef[-1]
    c = torch.tensor(coef, dtype=torch.int64, device=x.device).view(1, bits, 1)
    total = (c * dots.view(m, bits, n).to(torch.int64)).sum(1) + col_sums * sum(coef)
    acc = torch.div(total, 2, rounding_mode="floor").to(torch.int32)  # exact: total is even
    return _apply_affine(acc, sv, bv) if out_float else acc
