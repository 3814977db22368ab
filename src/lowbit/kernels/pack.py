"""Bit packing of ±1 tensors into 64-bit words, and the loader of the compiled XNOR kernels.

Convention (shared with ``csrc/xnor.cpp``): the sign of element ``k`` of a row (``+1`` for
``x >= 0``, ``-1`` otherwise, NaN counts as ``-1``) is stored in word ``k // 64``, bit ``k % 64``;
a set bit means ``-1``. Rows are padded with clear bits (``+1``) up to a whole word, so two
packed rows agree on their padding and ``popcount(a ^ b)`` counts only real disagreements.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from lowbit._build import extensions_disabled

WORD_BITS = 64
BACKENDS = ("auto", "avx512", "avx2", "scalar", "torch")
_CSRC = Path(__file__).resolve().parent / "csrc" / "xnor.cpp"
_BYTE_WEIGHTS = tuple(1 << i for i in range(8))

if sys.byteorder != "little":  # the uint8 -> int64 views below assume little-endian words
    raise ImportError("lowbit.kernels.pack needs a little-endian machine")


@dataclass(frozen=True)
class PackedBits:
    """Signs packed along the last dimension: ``words[..., w]`` holds elements ``64w..64w+63``.

    ``length`` is the true number of elements per row (``K``); the last word is padded with
    clear bits (``+1``).
    """

    words: Tensor
    length: int

    def __post_init__(self) -> None:
        if self.words.dtype != torch.int64:
            raise TypeError(f"words must be int64, got {self.words.dtype}")
        if self.words.dim() < 1:
            raise ValueError("words must have at least one dimension")
        if self.words.shape[-1] != num_words(self.length):
            raise ValueError(
                f"words has {self.words.shape[-1]} words per row but length {self.length} "
                f"needs {num_words(self.length)}"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the unpacked tensor."""
        return (*self.words.shape[:-1], self.length)

    def nbytes(self) -> int:
        """Storage of the packed words in bytes."""
        return self.words.numel() * self.words.element_size()


def num_words(length: int) -> int:
    """Number of 64-bit words holding ``length`` bits."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    return (length + WORD_BITS - 1) // WORD_BITS


def check_backend(backend: str) -> str:
    """Validate a backend name; returns it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


@lru_cache(maxsize=1)
def extension() -> ModuleType | None:
    """The compiled XNOR extension (JIT-built once and cached), or ``None`` if it cannot be built.

    Set ``LOWBIT_NO_EXT=1`` to force the pure-torch code paths.
    """
    if extensions_disabled():
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="lowbit_xnor",
            sources=[str(_CSRC)],
            extra_cflags=["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # compiler missing, headers missing, ...: fall back to torch
        warnings.warn(
            f"lowbit: could not build the XNOR extension ({err}); using the pure-torch kernels",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


@cache
def backend_available(backend: str) -> bool:
    """Whether ``backend`` can run here (``"torch"`` always can)."""
    check_backend(backend)
    if backend == "torch":
        return True
    if backend == "auto":
        return True
    ext = extension()
    return ext is not None and bool(ext.supports(backend))


def available_backends() -> list[str]:
    """Concrete backends usable on this machine, fastest first."""
    return [b for b in ("avx512", "avx2", "scalar", "torch") if backend_available(b)]


def resolve_backend(backend: str) -> str:
    """Map ``"auto"`` to the fastest available backend; raise if ``backend`` cannot run here."""
    check_backend(backend)
    if backend == "auto":
        return available_backends()[0]
    if not backend_available(backend):
        raise ValueError(
            f"backend {backend!r} is not available on this machine; available: "
            f"{available_backends()}"
        )
    return backend


def _pack_bool(neg: Tensor) -> Tensor:
    """Pack a bool tensor (True = set bit) along its last dim into int64 words (pure torch)."""
    k = neg.shape[-1]
    lead = neg.shape[:-1]
    bits = neg.new_zeros((*lead, num_words(k) * WORD_BITS), dtype=torch.uint8)
    bits[..., :k] = neg
    groups = bits.view(*lead, -1, 8)
    weights = torch.tensor(_BYTE_WEIGHTS, dtype=torch.uint8, device=neg.device)
    packed_bytes = (groups * weights).sum(-1, dtype=torch.uint8)
    return packed_bytes.contiguous().view(torch.int64)


def pack_signs(x: Tensor, *, backend: str = "auto") -> PackedBits:
    """Pack ``sign(x)`` (``+1`` at 0) along the last dimension into int64 words.

    ``x`` may have any real or bool dtype (bool is read as 0/1, so every element is ``+1``).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    if x.is_complex():
        raise TypeError("x must be real, got a complex tensor")
    backend = resolve_backend(backend)
    k = x.shape[-1]
    if x.numel() == 0:  # no rows or no columns: nothing to pack
        return PackedBits(torch.zeros(*x.shape[:-1], num_words(k), dtype=torch.int64,
                                      device=x.device), k)
    if backend != "torch" and x.dtype == torch.float32 and x.device.type == "cpu":
        ext = extension()
        rows = x.reshape(-1, k).contiguous()
        words = ext.pack_signs_f32(rows, backend)
        return PackedBits(words.reshape(*x.shape[:-1], num_words(k)), k)
    return PackedBits(_pack_bool(~(x >= 0)), k)


def pack_bits(bits: Tensor) -> PackedBits:
    """Pack a bool tensor along the last dimension (``True`` = set bit = ``-1``)."""
    if bits.dtype != torch.bool:
        raise TypeError(f"bits must be a bool tensor, got {bits.dtype}")
    if bits.dim() < 1:
        raise ValueError("bits must have at least one dimension")
    return PackedBits(_pack_bool(bits), bits.shape[-1])


def unpack_bits(packed: PackedBits) -> Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor of shape ``packed.shape``."""
    if not isinstance(packed, PackedBits):
        raise TypeError(f"packed must be PackedBits, got {type(packed).__name__}")
    words = packed.words.contiguous()
    as_bytes = words.view(torch.uint8).unsqueeze(-1)
    shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
    bits = ((as_bytes >> shifts) & 1).bool()
    return bits.reshape(*words.shape[:-1], -1)[..., : packed.length]


def unpack_signs(packed: PackedBits, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`pack_signs`: a ``±1`` tensor of shape ``packed.shape``."""
    neg = unpack_bits(packed)
    one = torch.ones((), dtype=dtype, device=neg.device)
    return torch.where(neg, -one, one)


_LOW63 = (1 << 63) - 1
_M1, _M2, _M4 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F


def popcount(words: Tensor) -> Tensor:
    """Number of set bits in each int64 word (pure torch, int64 result).

    SWAR bit counting on the low 63 bits, which keeps every intermediate non-negative (no
    signed overflow), plus the sign bit.
    """
    if words.dtype != torch.int64:
        raise TypeError(f"words must be int64, got {words.dtype}")
    x = words & _LOW63
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = (x + (x >> 32)) & 0x7F
    return x + (words < 0)
