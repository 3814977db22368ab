"""Triton XNOR-popcount GEMM on packed sign words, for ±1 matrices on a GPU.

The kernel reads the same packed rows as the CPU path (:class:`lowbit.kernels.pack.PackedBits`:
int64 words, bit ``k % 64`` of word ``k // 64`` set for ``-1``) and computes, for each output
``(m, n)``, ``K - 2 * popcount(a[m] XOR b[n])`` over the row's words. Bits past ``K`` in the
last word are masked off inside the kernel, so padding never counts, whatever it holds.

Status: this kernel has been RUN only in the Triton interpreter (``TRITON_INTERPRET=1``, CPU
tensors), where it equals the float ``±1`` product exactly; it has NOT been run on a GPU. The
interpreter exercises only the shift-and-mask ("swar") popcount. Without a GPU, both variants were
also compiled ahead of time to an sm_90 cubin (the ``"hardware"`` one, ``libdevice.popc``, emits
``popc.b64``; ptxas: 72 registers, no spills); that shows the compiled path builds, not that
it gives the right answer or is fast.

Block sizes are fixed (no autotuning): ``BLOCK_M = BLOCK_N = 32`` output tiles (smaller for tiny
``M`` or ``N``) and ``BLOCK_W = 4`` words (256 bits) per reduction step.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    _IMPORT_ERROR = ""
except Exception as err:  # the optional "gpu" extra is not installed (or is broken)
    triton = None
    tl = None
    libdevice = None
    _IMPORT_ERROR = f"{type(err).__name__}: {err}"

__all__ = ["POPCOUNTS", "available", "interpreter_active", "triton_xnor_gemm"]

POPCOUNTS = ("auto", "hardware", "swar")
_BLOCK_MN = 32
_BLOCK_W = 4


def available() -> bool:
    """Whether Triton can be imported here (the ``gpu`` extra)."""
    return triton is not None


def interpreter_active() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1`` when it was imported).

    Triton's own library functions are wrapped for the interpreter at import time, so the mode
    cannot be switched afterwards; CPU tensors need it on.
    """
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def _xnor_gemm_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    W,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    HW_POPCOUNT: tl.constexpr,
):
    """out[m, n] = K - 2 * popcount(a[m] ^ b[n]); a is [M, W], b is [N, W] int64, out int32."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows_a = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rows_b = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    in_a = rows_a < M
    in_b = rows_b < N
    offs_w = tl.arange(0, BLOCK_W).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for w0 in range(0, W, BLOCK_W):
        words = w0 + offs_w
        in_w = words < W
        a = tl.load(a_ptr + rows_a[:, None] * W + words[None, :],
                    mask=in_a[:, None] & in_w[None, :], other=0)
        b = tl.load(b_ptr + rows_b[:, None] * W + words[None, :],
                    mask=in_b[:, None] & in_w[None, :], other=0)
        # bits of each word that hold elements (< K): all 64, or the low `left` bits
        left = tl.minimum(tl.maximum(K - words * 64, 0), 64)
        one = tl.full((BLOCK_W,), 1, tl.int64)
        low = (one << tl.minimum(left, 63)) - 1
        valid = tl.where(left >= 64, tl.full((BLOCK_W,), -1, tl.int64), low)
        x = (a[:, None, :] ^ b[None, :, :]) & valid[None, None, :]
        if HW_POPCOUNT:
            counts = libdevice.popc(x)
        else:
            # SWAR count on the low 63 bits (all intermediates non-negative, so the arithmetic
            # right shifts of signed int64 are exact), plus the sign bit
            y = x & 0x7FFFFFFFFFFFFFFF
            y = y - ((y >> 1) & 0x5555555555555555)
            y = (y & 0x3333333333333333) + ((y >> 2) & 0x3333333333333333)
            y = (y + (y >> 4)) & 0x0F0F0F0F0F0F0F0F
            y = y + (y >> 8)
            y = y + (y >> 16)
            y = (y + (y >> 32)) & 0x7F
            counts = y.to(tl.int32) + (x < 0).to(tl.int32)
        acc += tl.sum(counts, axis=2)
    out = K - 2 * acc
    tl.store(out_ptr + rows_a[:, None] * N + rows_b[None, :], out,
             mask=in_a[:, None] & in_b[None, :])


@lru_cache(maxsize=1)
def _kernel():
    """The kernel, compiled for the GPU or wrapped for the interpreter (as Triton's mode is)."""
    return triton.jit(_xnor_gemm_kernel)


def _block(size: int) -> int:
    """Tile side for a dimension of ``size``: a power of two, at most 32."""
    return min(_BLOCK_MN, triton.next_power_of_2(max(size, 1)))


def triton_xnor_gemm(a_words: Tensor, b_words: Tensor, k: int, *, popcount: str = "auto"
                     ) -> Tensor:
    """Exact ``±1`` product from packed rows: int32 ``[M, N]`` with ``out[m, n] = a[m] · b[n]``.

    ``a_words`` is ``[M, W]`` and ``b_words`` ``[N, W]`` int64 packed rows of length ``k``
    (``W = ceil(k / 64)``) on the same device: CUDA tensors run the compiled kernel; under the
    Triton interpreter (see :func:`interpreter_active`) CPU and CUDA tensors are interpreted. ``popcount``: ``"auto"``
    (``"hardware"`` when compiled, ``"swar"`` when interpreted), ``"hardware"`` (libdevice
    ``popc``; compiled only), ``"swar"`` (shifts and masks, valid everywhere).

    Only the interpreter path has been run so far; the compiled GPU path is untested.
    """
    if triton is None:
        raise ImportError(
            f"triton cannot be imported ({_IMPORT_ERROR}); install the extra: "
            "pip install 'lowbit[gpu]'"
        )
    for name, t in (("a_words", a_words), ("b_words", b_words)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be int64 packed words, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [rows, words], got shape {tuple(t.shape)}")
    if popcount not in POPCOUNTS:
        raise ValueError(f"popcount must be one of {POPCOUNTS}, got {popcount!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    if k >= 2**31:
        raise ValueError(f"k={k} does not fit the int32 result")
    w = (k + 63) // 64
    if a_words.shape[1] != w or b_words.shape[1] != w:
        raise ValueError(
            f"k={k} needs {w} words per row; a_words has {a_words.shape[1]}, "
            f"b_words has {b_words.shape[1]}"
        )
    if a_words.device != b_words.device:
        raise ValueError(
            f"a_words and b_words are on different devices: {a_words.device}, {b_words.device}"
        )
    device = a_words.device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu (interpreter) or cuda, got {device}")
    interpret = interpreter_active()
    if device.type == "cpu" and not interpret:
        raise ValueError(
            "CPU tensors run only in the Triton interpreter: set TRITON_INTERPRET=1 before "
            "triton is imported, or use lowbit.kernels.xnor_matmul (compiled CPU kernel)"
        )
    if popcount == "hardware" and interpret:
        raise ValueError(
            "popcount='hardware' needs the compiled GPU kernel; the interpreter runs only "
            "popcount='swar' (or 'auto')"
        )
    hw = popcount == "hardware" or (popcount == "auto" and not interpret)
    m, n = a_words.shape[0], b_words.shape[0]
    out = torch.empty(m, n, dtype=torch.int32, device=device)
    if m == 0 or n == 0:
        return out
    bm, bn = _block(m), _block(n)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _kernel()[grid](
        a_words.contiguous(), b_words.contiguous(), out, m, n, w, k,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_W=_BLOCK_W, HW_POPCOUNT=hw,
    )
    return out
