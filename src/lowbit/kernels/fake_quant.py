"""Fused fake-quantization kernel for float32 CPU tensors (C++, compiled on first use).

``lowbit.quant.functional.fake_quantize`` calls into this module when :func:`available` is
true and :func:`supports` accepts the tensor and scale layout; the plain-torch code there is the
reference (and fallback) this kernel is tested against bit for bit.

The source ``csrc/fake_quant.cpp`` is compiled with ``torch.utils.cpp_extension.load`` into
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) the first time it is needed,
and reused from there afterwards. Set ``LOWBIT_NO_EXT=1`` to never build or use it. A failed
build warns once and falls back to plain torch.
"""

from __future__ import annotations

import hashlib
import math
import platform
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from lowbit._build import extensions_disabled

__all__ = [
    "available",
    "load",
    "supports",
    "int_fake_quant",
    "float_fake_quant",
    "binary_fake_quant",
    "masked_grad",
]

_SOURCE = Path(__file__).with_name("csrc") / "fake_quant.cpp"
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-std=c++17"]
_lock = threading.Lock()
_module: ModuleType | None = None
_failed: str | None = None


def _disabled() -> bool:
    return extensions_disabled()


def _cpu_signature() -> str:
    """-march=native code is only valid on the CPU it was built for: key the cache on it."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name")):
                flags += line
    except OSError:
        pass
    return platform.machine() + flags


def load() -> ModuleType:
    """Build (or fetch from the cache) and import the extension; raises on failure."""
    global _module, _failed
    with _lock:
        if _module is not None:
            return _module
        from torch.utils.cpp_extension import load as _load

        source = _SOURCE.read_text()
        key = hashlib.sha1(
            (source + " ".join(_CFLAGS) + _cpu_signature() + torch.__version__).encode()
        ).hexdigest()[:12]
        try:
            _module = _load(
                name=f"lowbit_fake_quant_{key}",
                sources=[str(_SOURCE)],
                extra_cflags=_CFLAGS,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as err:  # compiler missing, build error, ...
            _failed = f"{type(err).__name__}: {err}"
            raise
        return _module


def available() -> bool:
    """True when the kernel can be used (builds it on the first call; False after a failure or
    with LOWBIT_NO_EXT=1)."""
    if _module is not None:
        return not _disabled()
    if _disabled() or _failed is not None:
        return False
    try:
        load()
    except Exception:
        warnings.warn(
            f"lowbit: fused fake-quant kernel unavailable, using plain torch ({_failed})",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def _runs(shape: tuple[int, ...], layout: Any) -> tuple[int, int] | None:
    """(channels, inner) such that element i uses parameter (i // inner) % channels, or None
    when the layout has no such form."""
    numel = math.prod(shape)
    if layout.kind == "tensor":
        return 1, max(numel, 1)
    inner = math.prod(shape[layout.axis + 1:])
    if layout.kind == "channel":
        return shape[layout.axis], max(inner, 1)
    k = layout.group_size
    if inner == 1 and shape[layout.axis] % k == 0:  # groups along the last (effective) dim
        return max(numel // k, 1), k
    return None


def supports(x: torch.Tensor, layout: Any) -> bool:
    """Whether the kernel handles this tensor (float32 on CPU) and scale layout."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and _runs(x.shape, layout) is not None


def _empty_mask(n: int, need_mask: bool) -> torch.Tensor:
    return torch.empty((n + 7) // 8 if need_mask else 0, dtype=torch.uint8)


def int_fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    layout: Any,
    qmin: int,
    qmax: int,
    seed: int | None,
    need_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer fake quantization; returns (out, bit-packed mask or an empty tensor)."""
    mod = load()
    channels, inner = _runs(x.shape, layout)
    xc = x.detach().contiguous()
    out = torch.empty_like(xc)
    mask = _empty_mask(xc.numel(), need_mask)
    s = scale.detach().to(torch.float32).contiguous().reshape(-1)
    z = zero_point.detach().to(torch.float32).contiguous().reshape(-1)
    mod.int_fake_quant(
        xc.data_ptr(), out.data_ptr(), mask.data_ptr() if need_mask else 0, xc.numel(),
        s.data_ptr(), z.data_ptr(), channels, inner, float(qmin), float(qmax),
        seed is not None, 0 if seed is None else seed, torch.get_num_threads(),
    )
    return out, mask


def float_fake_quant(
    x: torch.Tensor,
    fmt: Any,
    scale: torch.Tensor | None,
    layout: Any,
    seed: int | None,
    saturate: bool,
    need_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minifloat fake quantization; returns (out, bit-packed mask or an empty tensor)."""
    mod = load()
    channels, inner = _runs(x.shape, layout)
    xc = x.detach().contiguous()
    out = torch.empty_like(xc)
    mask = _empty_mask(xc.numel(), need_mask)
    s = None if scale is None else scale.detach().to(torch.float32).contiguous().reshape(-1)
    mod.float_fake_quant(
        xc.data_ptr(), out.data_ptr(), mask.data_ptr() if need_mask else 0, xc.numel(),
        0 if s is None else s.data_ptr(), channels, inner, fmt.exp_bits, fmt.man_bits,
        float(fmt.max), saturate, seed is not None, 0 if seed is None else seed,
        torch.get_num_threads(),
    )
    return out, mask


def binary_fake_quant(
    x: torch.Tensor,
    div: torch.Tensor | None,
    mul: torch.Tensor | None,
    layout: Any,
    seed: int | None,
    need_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``±1`` (sign(0) = +1) of ``x / div``, times ``mul``; returns (out, packed mask)."""
    mod = load()
    channels, inner = _runs(x.shape, layout)
    xc = x.detach().contiguous()
    out = torch.empty_like(xc)
    mask = _empty_mask(xc.numel(), need_mask)
    d = None if div is None else div.detach().to(torch.float32).contiguous().reshape(-1)
    m = None if mul is None else mul.detach().to(torch.float32).contiguous().reshape(-1)
    mod.binary_fake_quant(
        xc.data_ptr(), out.data_ptr(), mask.data_ptr() if need_mask else 0, xc.numel(),
        0 if d is None else d.data_ptr(), 0 if m is None else m.data_ptr(), channels, inner,
        seed is not None, 0 if seed is None else seed, torch.get_num_threads(),
    )
    return out, mask


def masked_grad(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``grad * mask`` for a bit-packed mask (bit i of byte i // 8 belongs to element i)."""
    n = grad.numel()
    if grad.dtype != torch.float32 or _module is None:
        bits = (mask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
        return grad * bits.reshape(-1)[:n].view(grad.shape).to(grad.dtype)
    g = grad.contiguous()
    out = torch.empty_like(g)
    _module.masked_grad(g.data_ptr(), mask.data_ptr(), out.data_ptr(), n, torch.get_num_threads())
    return out
