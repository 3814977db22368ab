"""XNOR-popcount matrix products of ±1 matrices, and the first-layer bit-plane product.

For rows ``a`` and ``b`` of length ``K`` with entries in ``{-1, +1}`` stored as sign bits,
``a · b = K - 2 * popcount(a XOR b)`` (Courbariaux, Hubara et al., BNN/QNN). The compiled CPU
kernel (``csrc/xnor.cpp``) picks AVX-512 VPOPCNTDQ, AVX2 or scalar popcnt at run time; the
``"torch"`` backend is a pure-torch reference used when the extension cannot be built.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels.pack import (
    PackedBits,
    byte_popcount,
    extension,
    pack_bits,
    pack_signs,
    resolve_backend,
)

__all__ = ["bitplane_matmul", "xnor_matmul"]

_TORCH_CHUNK_BYTES = 1 << 25  # working-set bound for the pure-torch path


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


def xnor_matmul(
    a: Tensor | PackedBits, b: Tensor | PackedBits, *, backend: str = "auto"
) -> Tensor:
    """Exact ``sign(a) @ sign(b)`` (``+1`` at 0) as an int32 ``[M, N]`` tensor.

    ``a`` is an ``[M, K]`` matrix or its packed rows (``pack_signs(a)``); ``b`` is a ``[K, N]``
    matrix or the packed rows of its transpose (``pack_signs(b.T)``, i.e. one packed row per
    output column, the layout of a linear layer's weight). For ``±1`` inputs the result equals
    ``a @ b`` exactly. ``backend``: ``"auto"``, ``"avx512"``, ``"avx2"``, ``"scalar"``, ``"torch"``.
    """
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
    if backend == "torch" or pa.words.device.type != "cpu":
        return _xnor_matmul_torch(pa.words, pb.words, pa.length)
    return extension().xnor_gemm(
        pa.words.contiguous(), pb.words.contiguous(), pa.length, backend
    )


def _xnor_matmul_torch(a: Tensor, b: Tensor, k: int) -> Tensor:
    """Reference path: XOR of words, bytewise popcount, summed in int32; chunked over rows."""
    m, w = a.shape
    n = b.shape[0]
    out = torch.empty(m, n, dtype=torch.int32, device=a.device)
    if m == 0 or n == 0:
        return out
    rows = max(1, _TORCH_CHUNK_BYTES // max(1, n * w * 8))
    for start in range(0, m, rows):
        x = a[start : start + rows, None, :] ^ b[None, :, :]
        counts = byte_popcount(x.view(torch.uint8)).sum(-1, dtype=torch.int32)
        out[start : start + rows] = k - 2 * counts
    return out


def bitplane_matmul(
    x: Tensor,
    w: Tensor | PackedBits,
    *,
    bits: int = 8,
    signed: bool | None = None,
    backend: str = "auto",
) -> Tensor:
    """Exact ``x @ sign(w)`` for an integer ``x`` (fixed-point first-layer input), as int32.

    ``x`` is ``[M, K]`` with integer values of ``bits`` bits (unsigned ``0..2^bits-1``, or
    two's-complement signed ``-2^(bits-1)..2^(bits-1)-1``; ``signed=None`` means signed when
    ``x`` has a negative value). ``w`` is ``[K, N]`` or the packed rows of its transpose. The product is the QNN
    bit-plane sum ``sum_n 2^(n-1) * (x^n · w)`` where ``x^n`` is bit plane ``n`` (the top plane
    weighs ``-2^(bits-1)`` when signed), each plane product computed with XNOR-popcount.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"x must have an integer dtype, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be a 2-D matrix, got shape {tuple(x.shape)}")
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int in 1..16, got {bits!r}")
    if signed is None:
        signed = bool(x.numel()) and int(x.min()) < 0
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if x.numel() and (int(x.min()) < lo or int(x.max()) > hi):
        raise ValueError(
            f"x has values in [{int(x.min())}, {int(x.max())}], outside the "
            f"{'signed' if signed else 'unsigned'} {bits}-bit range [{lo}, {hi}]"
        )
    backend = resolve_backend(backend)
    pw = _as_rows(w, "w", transpose=True, backend=backend)
    m, k = x.shape
    if pw.length != k:
        raise ValueError(f"inner dimensions differ: x has K={k}, w has K={pw.length}")
    if k * 2**bits >= 2**31:
        raise ValueError(f"K={k} with {bits}-bit inputs can overflow the int32 result")
    xi = x.to(torch.int32).contiguous()
    if backend != "torch" and x.device.type == "cpu":
        words = extension().pack_bitplanes_i32(xi, bits, backend)
        packed_planes = PackedBits(words.view(bits * m, -1), k)
    else:
        shifts = torch.arange(bits, dtype=torch.int32, device=x.device).view(bits, 1, 1)
        planes = ((xi.unsqueeze(0) >> shifts) & 1).bool()  # [bits, M, K], two's complement
        # a 0/1 plane b is the ±1 vector s = 2b - 1: set bit (-1) where b == 0
        packed_planes = pack_bits(~planes.reshape(bits * m, k))
    # b·w = (s·w + sum(w)) / 2, and sum(w) is the product with the all-(+1) row
    dots = xnor_matmul(packed_planes, pw, backend=backend).view(bits, m, -1)
    ones = PackedBits(torch.zeros(1, pw.words.shape[1], dtype=torch.int64, device=x.device), k)
    col_sums = xnor_matmul(ones, pw, backend=backend)  # [1, N]
    weights = [1 << n for n in range(bits)]
    if signed:
        weights[-1] = -weights[-1]
    coef = torch.tensor(weights, dtype=torch.int32, device=x.device).view(bits, 1, 1)
    # every c_n * (s_n·w + sum(w)) is even, so the halving below is exact (int32 cannot
    # overflow: |result| < K * 2^bits < 2^31 was checked above)
    total = (coef * dots).sum(0, dtype=torch.int32) + col_sums * sum(weights)
    return torch.div(total, 2, rounding_mode="floor")
