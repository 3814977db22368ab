"""Optional compiled CPU kernels for the integer executor: fused requantization and int8 im2col.

Built with ``torch.utils.cpp_extension.load_inline`` the first time they are needed (cached in
``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). Set ``LOWBIT_NO_EXT=1`` (or
``LOWBIT_NO_EXTENSION=1``) to never build them; any build failure falls back to the pure-torch
code in :mod:`lowbit.integer.ops`, which the tests prove bit-identical.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>

template <typename Out>
static void requant_impl(const int32_t* acc, int64_t R, int64_t C, const int64_t* mul,
                         const int64_t* off, const int64_t* sh, const int64_t* win, int64_t zp,
                         int64_t qmin, int64_t qmax, Out* out) {
  at::parallel_for(0, R, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int32_t* a = acc + r * C;
      Out* o = out + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t v = static_cast<int64_t>(a[c]) * mul[c] + off[c];
        const int64_t k = sh[c];
        int64_t q = v >> k;                       // arithmetic shift: floor(v / 2^k)
        const int64_t low = v & ((int64_t(1) << k) - 1);
        q -= static_cast<int64_t>(low < win[c]) & (q & 1);
        q += zp;
        q = q < qmin ? qmin : (q > qmax ? qmax : q);
        o[c] = static_cast<Out>(q);
      }
    }
  });
}

torch::Tensor requant_rows(torch::Tensor acc, torch::Tensor mul, torch::Tensor off,
                           torch::Tensor sh, torch::Tensor win, int64_t zp, int64_t qmin,
                           int64_t qmax, bool out_unsigned) {
  TORCH_CHECK(acc.dtype() == torch::kInt32 && acc.dim() == 2 && acc.is_contiguous(),
              "acc must be a contiguous 2-D int32 tensor");
  const int64_t R = acc.size(0), C = acc.size(1);
  auto out = torch::empty({R, C}, acc.options().dtype(out_unsigned ? torch::kUInt8
                                                                    : torch::kInt8));
  if (out_unsigned)
    requant_impl<uint8_t>(acc.data_ptr<int32_t>(), R, C, mul.data_ptr<int64_t>(),
                          off.data_ptr<int64_t>(), sh.data_ptr<int64_t>(),
                          win.data_ptr<int64_t>(), zp, qmin, qmax, out.data_ptr<uint8_t>());
  else
    requant_impl<int8_t>(acc.data_ptr<int32_t>(), R, C, mul.data_ptr<int64_t>(),
                         off.data_ptr<int64_t>(), sh.data_ptr<int64_t>(),
                         win.data_ptr<int64_t>(), zp, qmin, qmax, out.data_ptr<int8_t>());
  return out;
}

// x: int8 [N, C, H, W] contiguous -> cols int8 [N*OH*OW, C*KH*KW], padding value pad
torch::Tensor im2col_int8(torch::Tensor x, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                          int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t pad) {
  TORCH_CHECK(x.dtype() == torch::kInt8 && x.dim() == 4 && x.is_contiguous(),
              "x must be a contiguous NCHW int8 tensor");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  const int64_t OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  auto cols = torch::empty({N * OH * OW, C * kh * kw}, x.options());
  const int8_t* in = x.data_ptr<int8_t>();
  int8_t* out = cols.data_ptr<int8_t>();
  const int8_t padv = static_cast<int8_t>(pad);
  const int64_t K = C * kh * kw;
  at::parallel_for(0, N * OH, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / OH, oh = t % OH;
      for (int64_t ow = 0; ow < OW; ++ow) {
        int8_t* row = out + ((n * OH + oh) * OW + ow) * K;
        for (int64_t c = 0; c < C; ++c) {
          const int8_t* plane = in + (n * C + c) * H * W;
          for (int64_t i = 0; i < kh; ++i) {
            const int64_t h = oh * sh - ph + i * dh;
            for (int64_t j = 0; j < kw; ++j) {
              const int64_t w = ow * sw - pw + j * dw;
              *row++ = (h >= 0 && h < H && w >= 0 && w < W) ? plane[h * W + w] : padv;
            }
          }
        }
      }
    }
  });
  return cols;
}
"""

_CPP_DECL = r"""
torch::Tensor requant_rows(torch::Tensor acc, torch::Tensor mul, torch::Tensor off,
                           torch::Tensor sh, torch::Tensor win, int64_t zp, int64_t qmin,
                           int64_t qmax, bool out_unsigned);
torch::Tensor im2col_int8(torch::Tensor x, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                          int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t pad);
"""

_state: dict[str, ModuleType | None] = {}


def disabled() -> bool:
    """Whether the environment asks for the pure-torch paths only."""
    return any(os.environ.get(v, "").strip() not in ("", "0")
               for v in ("LOWBIT_NO_EXT", "LOWBIT_NO_EXTENSION"))


def extension() -> ModuleType | None:
    """The compiled module, building it on first use; None when disabled or the build fails."""
    if disabled():
        return None
    if "mod" not in _state:
        try:
            from torch.utils.cpp_extension import load_inline

            _state["mod"] = load_inline(
                name="lowbit_integer_ext", cpp_sources=[_CPP_DECL + _SOURCE],
                functions=["requant_rows", "im2col_int8"],
                extra_cflags=["-O3", "-fopenmp", "-std=c++17"], extra_ldflags=["-fopenmp"],
                verbose=False)
        except Exception as err:  # no compiler, no headers, ...: use the torch code
            warnings.warn(f"lowbit.integer: compiled kernels unavailable ({err}); "
                          "using pure-torch code", RuntimeWarning, stacklevel=2)
            _state["mod"] = None
    return _state["mod"]
