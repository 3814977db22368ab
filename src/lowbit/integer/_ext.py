"""Optional compiled CPU kernels for the integer executor.

Two modules: :func:`extension` (fused requantization and int8 im2col, any x86-64) and
:func:`vnni` (the int8 convolution of ``csrc/conv_vnni.cpp`` with the requantization fused into
its epilogue, for CPUs with AVX-512 VNNI).

Built with ``torch.utils.cpp_extension.load_inline`` the first time they are needed (cached in
``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). Set ``LOWBIT_NO_EXT=1`` (or
``LOWBIT_NO_EXTENSION=1``) to never build them; any build failure falls back to the pure-torch
code in :mod:`lowbit.integer.ops`, which the tests prove bit-identical.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType

from lowbit._build import extensions_disabled

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>

// y = clamp(m + zp), m = q - [low k bits of v < w and q odd], q = v >> k, v = (a - zs)·mul + off
template <typename Out>
static inline Out requant_one(int64_t a, int64_t zs, int64_t mul, int64_t off, int64_t k,
                              int64_t w, int64_t zp, int64_t qmin, int64_t qmax) {
  const int64_t v = (a - zs) * mul + off;
  int64_t q = v >> k;  // arithmetic shift: floor(v / 2^k)
  const int64_t low = v & ((int64_t(1) << k) - 1);
  q -= static_cast<int64_t>(low < w) & (q & 1);
  q += zp;
  q = q < qmin ? qmin : (q > qmax ? qmax : q);
  return static_cast<Out>(q);
}

template <typename Out>
static void requant_impl(const int32_t* acc, int64_t R, int64_t C, bool chan_major,
                         const int64_t* zs, const int64_t* mul, const int64_t* off,
                         const int64_t* sh, const int64_t* win, int64_t zp, int64_t qmin,
                         int64_t qmax, Out* out) {
  if (chan_major) {  // acc [C, R]
    at::parallel_for(0, C * R, 16384, [&](int64_t b, int64_t e) {
      while (b < e) {
        const int64_t c = b / R, r0 = b % R, r1 = std::min(R, r0 + (e - b));
        const int32_t* a = acc + c * R;
        Out* o = out + c * R;
        const int64_t z = zs[c], m = mul[c], f = off[c], k = sh[c], w = win[c];
        for (int64_t r = r0; r < r1; ++r) o[r] = requant_one<Out>(a[r], z, m, f, k, w, zp, qmin, qmax);
        b += r1 - r0;
      }
    });
  } else {  // acc [R, C]
    at::parallel_for(0, R, 256, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        for (int64_t c = 0; c < C; ++c)
          out[r * C + c] = requant_one<Out>(acc[r * C + c], zs[c], mul[c], off[c], sh[c], win[c],
                                            zp, qmin, qmax);
    });
  }
}

torch::Tensor requant(torch::Tensor acc, bool chan_major, torch::Tensor zs, torch::Tensor mul,
                      torch::Tensor off, torch::Tensor sh, torch::Tensor win, int64_t zp,
                      int64_t qmin, int64_t qmax, bool out_unsigned) {
  TORCH_CHECK(acc.dtype() == torch::kInt32 && acc.dim() == 2 && acc.is_contiguous(),
              "acc must be a contiguous 2-D int32 tensor");
  const int64_t R = chan_major ? acc.size(1) : acc.size(0);
  const int64_t C = chan_major ? acc.size(0) : acc.size(1);
  auto out = torch::empty(acc.sizes(), acc.options().dtype(out_unsigned ? torch::kUInt8
                                                                         : torch::kInt8));
  if (out_unsigned)
    requant_impl<uint8_t>(acc.data_ptr<int32_t>(), R, C, chan_major, zs.data_ptr<int64_t>(),
                          mul.data_ptr<int64_t>(), off.data_ptr<int64_t>(),
                          sh.data_ptr<int64_t>(), win.data_ptr<int64_t>(), zp, qmin, qmax,
                          out.data_ptr<uint8_t>());
  else
    requant_impl<int8_t>(acc.data_ptr<int32_t>(), R, C, chan_major, zs.data_ptr<int64_t>(),
                         mul.data_ptr<int64_t>(), off.data_ptr<int64_t>(),
                         sh.data_ptr<int64_t>(), win.data_ptr<int64_t>(), zp, qmin, qmax,
                         out.data_ptr<int8_t>());
  return out;
}

// x: int8 or uint8 [N, C, H, W] -> int8 [C*KH*KW, N*OH*OW]; uint8 values are flipped to int8
// (v ^ 0x80 == v - 128); padding holds `pad` (already in the int8 domain)
torch::Tensor im2col_t(torch::Tensor x, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                       int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t pad) {
  TORCH_CHECK((x.dtype() == torch::kInt8 || x.dtype() == torch::kUInt8) && x.dim() == 4 &&
              x.is_contiguous(), "x must be a contiguous NCHW int8/uint8 tensor");
  const bool flip = x.dtype() == torch::kUInt8;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  const int64_t OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  auto cols = torch::empty({C * kh * kw, N * OH * OW}, x.options().dtype(torch::kInt8));
  const uint8_t* in = reinterpret_cast<const uint8_t*>(x.data_ptr());
  int8_t* out = cols.data_ptr<int8_t>();
  const uint8_t fx = flip ? 0x80 : 0x00;
  const int8_t padv = static_cast<int8_t>(pad);
  at::parallel_for(0, C * kh * kw, 1, [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const int64_t c = row / (kh * kw), i = (row / kw) % kh, j = row % kw;
      int8_t* dst = out + row * N * OH * OW;
      for (int64_t n = 0; n < N; ++n) {
        const uint8_t* plane = in + (n * C + c) * H * W;
        for (int64_t oh = 0; oh < OH; ++oh, dst += OW) {
          const int64_t h = oh * sh - ph + i * dh;
          if (h < 0 || h >= H) { std::memset(dst, padv, OW); continue; }
          const uint8_t* src = plane + h * W;
          for (int64_t ow = 0; ow < OW; ++ow) {
            const int64_t w = ow * sw - pw + j * dw;
            dst[ow] = (w >= 0 && w < W) ? static_cast<int8_t>(src[w] ^ fx) : padv;
          }
        }
      }
    }
  });
  return cols;
}
"""

_CPP_DECL = r"""
torch::Tensor requant(torch::Tensor acc, bool chan_major, torch::Tensor zs, torch::Tensor mul,
                      torch::Tensor off, torch::Tensor sh, torch::Tensor win, int64_t zp,
                      int64_t qmin, int64_t qmax, bool out_unsigned);
torch::Tensor im2col_t(torch::Tensor x, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                       int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t pad);
"""

_state: dict[str, ModuleType | None] = {}


def disabled() -> bool:
    """Whether the environment asks for the pure-torch paths only."""
    return extensions_disabled()


def extension() -> ModuleType | None:
    """The compiled module, building it on first use; None when disabled or the build fails."""
    if disabled():
        return None
    if "mod" not in _state:
        try:
            from torch.utils.cpp_extension import load_inline

            _state["mod"] = load_inline(
                name="lowbit_integer_ext_v2", cpp_sources=[_CPP_DECL + _SOURCE],
                functions=["requant", "im2col_t"],
                extra_cflags=["-O3", "-fopenmp", "-std=c++17"], extra_ldflags=["-fopenmp"],
                verbose=False)
        except Exception as err:  # no compiler, no headers, ...: use the torch code
            warnings.warn(f"lowbit.integer: compiled kernels unavailable ({err}); "
                          "using pure-torch code", RuntimeWarning, stacklevel=2)
            _state["mod"] = None
    return _state["mod"]


_VNNI_FUNCTIONS = ["vnni_supported", "amx_supported", "pack_conv_weight",
                   "pack_conv_weight_amx", "conv2d_requant"]


def vnni() -> ModuleType | None:
    """The AVX-512 VNNI convolution module (``csrc/conv_vnni.cpp``), or None.

    None when disabled (``LOWBIT_NO_EXT``), when the build fails, or when the CPU lacks
    AVX-512 VNNI (the kernel is compiled for that target only and never runs elsewhere).
    """
    if disabled():
        return None
    if "vnni" not in _state:
        _state["vnni"] = None
        try:
            from torch.utils.cpp_extension import load_inline

            src = (Path(__file__).parent / "csrc" / "conv_vnni.cpp").read_text()
            mod, first_err = None, None
            for name, flags in (("lowbit_integer_vnni_v8", []),
                                ("lowbit_integer_vnni_v8_noamx", ["-DLOWBIT_NO_AMX"])):
                try:  # an assembler without AMX: the VNNI kernel alone
                    mod = load_inline(
                        name=name, cpp_sources=[src], functions=_VNNI_FUNCTIONS,
                        extra_cflags=["-O3", "-fopenmp", "-std=c++17", *flags],
                        extra_ldflags=["-fopenmp"], verbose=False)
                    break
                except Exception as exc:
                    first_err = first_err or exc
            if mod is None:
                raise first_err
            _state["vnni"] = mod if mod.vnni_supported() else None
        except Exception as err:  # no compiler, old assembler, ...: use the other paths
            warnings.warn(f"lowbit.integer: VNNI convolution unavailable ({err}); "
                          "using the im2col path", RuntimeWarning, stacklevel=2)
    return _state["vnni"]
