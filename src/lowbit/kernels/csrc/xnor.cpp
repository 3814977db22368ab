// XNOR-popcount GEMM and sign bit packing on CPU (lowbit.kernels.xnor / lowbit.kernels.pack).
//
// Bit convention (shared with the pure-torch code in pack.py): element k of a row lives in word
// k / 64, bit k % 64; a set bit means -1, a clear bit means +1 (sign with +1 at 0).  Rows are
// padded with clear bits, so padding agrees between any two rows and adds nothing to
// popcount(a ^ b); the dot product of two rows of true length K is K - 2 * popcount(a ^ b).
//
// The instruction set is chosen at run time (AVX-512 VPOPCNTDQ, AVX2 nibble table, scalar
// popcnt) through per-function target attributes, so the file is built without -march flags.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <string>

namespace {

using u64 = uint64_t;

// Cache blocking (in 64-bit words / rows): a 4 x KC panel of A (8 KiB) stays in L1, an NC x KC
// block of B (512 KiB) in L2; one task owns an MC x NC block of C for the whole K loop.
constexpr int64_t KC = 256;
constexpr int64_t MC = 64;
constexpr int64_t NC = 256;
constexpr int64_t kMinWork = int64_t{1} << 19;  // word pairs per thread, about 50 us

// ---------------------------------------------------------------- scalar (popcnt) micro kernel
struct Scalar {
  static constexpr int MR = 2;
  static constexpr int NR = 4;

  template <int R, int C>
  __attribute__((target("popcnt"))) static void micro(
      const u64* a, int64_t lda, const u64* b, int64_t ldb, int64_t kw, int32_t* c,
      int64_t ldc) {
    int64_t acc[R][C] = {};
    for (int64_t k = 0; k < kw; ++k) {
      u64 av[R];
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) av[i] = a[i * lda + k];
#pragma GCC unroll 8
      for (int j = 0; j < C; ++j) {
        const u64 bv = b[j * ldb + k];
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) acc[i][j] += __builtin_popcountll(av[i] ^ bv);
      }
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < C; ++j) c[i * ldc + j] += static_cast<int32_t>(acc[i][j]);
  }
};

// ---------------------------------------------------------- AVX2 (nibble lookup) micro kernel
struct Avx2 {
  static constexpr int MR = 2;
  static constexpr int NR = 4;

  template <int R, int C>
  __attribute__((target("avx2,popcnt"))) static void micro(
      const u64* a, int64_t lda, const u64* b, int64_t ldb, int64_t kw, int32_t* c,
      int64_t ldc) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1,
                                         1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i zero = _mm256_setzero_si256();
    __m256i acc[R][C];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < C; ++j) acc[i][j] = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 4 <= kw; k += 4) {
      __m256i av[R];
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i)
        av[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i * lda + k));
#pragma GCC unroll 8
      for (int j = 0; j < C; ++j) {
        const __m256i bv =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + j * ldb + k));
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
          const __m256i x = _mm256_xor_si256(av[i], bv);
          const __m256i lo = _mm256_and_si256(x, low);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
          const __m256i cnt =
              _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
          acc[i][j] = _mm256_add_epi64(acc[i][j], _mm256_sad_epu8(cnt, zero));
        }
      }
    }
    for (int i = 0; i < R; ++i) {
      for (int j = 0; j < C; ++j) {
        alignas(32) int64_t lanes[4];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[i][j]);
        int64_t s = lanes[0] + lanes[1] + lanes[2] + lanes[3];
        for (int64_t t = k; t < kw; ++t) s += __builtin_popcountll(a[i * lda + t] ^ b[j * ldb + t]);
        c[i * ldc + j] += static_cast<int32_t>(s);
      }
    }
  }
};

// ------------------------------------------------------ AVX-512 VPOPCNTDQ micro kernel
struct Avx512 {
  static constexpr int MR = 4;
  static constexpr int NR = 4;

  template <int R, int C>
  __attribute__((target("avx512f,avx512vpopcntdq"))) static void micro(
      const u64* a, int64_t lda, const u64* b, int64_t ldb, int64_t kw, int32_t* c,
      int64_t ldc) {
    __m512i acc[R][C];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < C; ++j) acc[i][j] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 8 <= kw; k += 8) {
      __m512i av[R];
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) av[i] = _mm512_loadu_si512(a + i * lda + k);
#pragma GCC unroll 8
      for (int j = 0; j < C; ++j) {
        const __m512i bv = _mm512_loadu_si512(b + j * ldb + k);
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i)
          acc[i][j] = _mm512_add_epi64(acc[i][j],
                                       _mm512_popcnt_epi64(_mm512_xor_si512(av[i], bv)));
      }
    }
    if (k < kw) {  // masked tail: lanes past kw load as zero on both sides
      const __mmask8 m = static_cast<__mmask8>((1u << (kw - k)) - 1u);
      __m512i av[R];
      for (int i = 0; i < R; ++i) av[i] = _mm512_maskz_loadu_epi64(m, a + i * lda + k);
      for (int j = 0; j < C; ++j) {
        const __m512i bv = _mm512_maskz_loadu_epi64(m, b + j * ldb + k);
        for (int i = 0; i < R; ++i)
          acc[i][j] = _mm512_add_epi64(acc[i][j],
                                       _mm512_popcnt_epi64(_mm512_xor_si512(av[i], bv)));
      }
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < C; ++j)
        c[i * ldc + j] += static_cast<int32_t>(_mm512_reduce_add_epi64(acc[i][j]));
  }
};

// Calls Isa::micro<r, nr> for a tile of r <= R rows and nr <= C columns (edges of C).
template <class Isa, int R, int C>
void micro_edge(int64_t r, int64_t nr, const u64* a, int64_t lda, const u64* b, int64_t ldb,
                int64_t kw, int32_t* c, int64_t ldc) {
  if constexpr (R >= 1 && C >= 1) {
    if (r == R && nr == C) {
      Isa::template micro<R, C>(a, lda, b, ldb, kw, c, ldc);
    } else if (r < R) {
      micro_edge<Isa, R - 1, C>(r, nr, a, lda, b, ldb, kw, c, ldc);
    } else {
      micro_edge<Isa, R, C - 1>(r, nr, a, lda, b, ldb, kw, c, ldc);
    }
  }
}

// C[M, N] = K - 2 * popcount(A[m] ^ B[n]) with A: [M, W], B: [N, W] words (row-major).
template <class Isa>
void gemm(const u64* A, const u64* B, int32_t* C, int64_t M, int64_t N, int64_t W, int64_t K) {
  const int64_t mb = (M + MC - 1) / MC;
  const int64_t nb = (N + NC - 1) / NC;
  // Each thread gets at least kMinWork word pairs (small products run inline: a parallel
  // region costs more than they do, and much more when the CPUs are oversubscribed).
  const int64_t task_work = std::min(M, MC) * std::min(N, NC) * std::max<int64_t>(W, 1);
  const int64_t grain = std::max<int64_t>(1, kMinWork / task_work);
  at::parallel_for(0, mb * nb, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i0 = (t / nb) * MC, i1 = std::min(M, i0 + MC);
      const int64_t j0 = (t % nb) * NC, j1 = std::min(N, j0 + NC);
      for (int64_t k0 = 0; k0 < W; k0 += KC) {
        const int64_t kw = std::min(KC, W - k0);
        for (int64_t i = i0; i < i1; i += Isa::MR) {
          const int64_t r = std::min<int64_t>(Isa::MR, i1 - i);
          for (int64_t j = j0; j < j1; j += Isa::NR) {
            const int64_t nr = std::min<int64_t>(Isa::NR, j1 - j);
            const u64* a = A + i * W + k0;
            const u64* b = B + j * W + k0;
            int32_t* c = C + i * N + j;
            if (r == Isa::MR && nr == Isa::NR) {
              Isa::template micro<Isa::MR, Isa::NR>(a, W, b, W, kw, c, N);
            } else {
              micro_edge<Isa, Isa::MR, Isa::NR>(r, nr, a, W, b, W, kw, c, N);
            }
          }
        }
      }
      const int32_t k32 = static_cast<int32_t>(K);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) C[i * N + j] = k32 - 2 * C[i * N + j];
    }
  });
}

// -------------------------------------------------------------------------- sign packing
__attribute__((target("avx512f"))) void pack_row_avx512(const float* x, int64_t K, u64* out,
                                                       int64_t W) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t w = 0; w < W; ++w) {
    u64 word = 0;
    for (int q = 0; q < 4; ++q) {
      const int64_t base = w * 64 + q * 16;
      if (base >= K) break;
      const int64_t rem = K - base;
      const __mmask16 m =
          rem >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << rem) - 1u);
      const __m512 v = _mm512_maskz_loadu_ps(m, x + base);
      // not (v >= 0), unordered true: negatives and NaN set the bit (NaN maps to -1)
      const __mmask16 neg = _mm512_mask_cmp_ps_mask(m, v, zero, _CMP_NGE_UQ);
      word |= static_cast<u64>(neg) << (16 * q);
    }
    out[w] = word;
  }
}

void pack_row_scalar(const float* x, int64_t K, u64* out, int64_t W) {
  for (int64_t w = 0; w < W; ++w) {
    u64 word = 0;
    const int64_t end = std::min<int64_t>(64, K - w * 64);
    for (int64_t t = 0; t < end; ++t) {
      if (!(x[w * 64 + t] >= 0.0f)) word |= u64{1} << t;
    }
    out[w] = word;
  }
}

// Bit planes of int32 values: plane n of row r gets a set bit where bit n of x is CLEAR (the
// 0/1 plane b is stored as the ±1 vector 2b - 1). out: [bits, R, W].
__attribute__((target("avx512f"))) void planes_row_avx512(const int32_t* x, int64_t K, int bits,
                                                         u64* out, int64_t plane_stride,
                                                         int64_t W) {
  for (int64_t w = 0; w < W; ++w) {
    u64 words[16] = {};
    for (int q = 0; q < 4; ++q) {
      const int64_t base = w * 64 + q * 16;
      if (base >= K) break;
      const int64_t rem = K - base;
      const __mmask16 m =
          rem >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << rem) - 1u);
      const __m512i v = _mm512_maskz_loadu_epi32(m, x + base);
      for (int n = 0; n < bits; ++n) {
        const __mmask16 clear = _mm512_mask_testn_epi32_mask(m, v, _mm512_set1_epi32(1 << n));
        words[n] |= static_cast<u64>(clear) << (16 * q);
      }
    }
    for (int n = 0; n < bits; ++n) out[n * plane_stride + w] = words[n];
  }
}

void planes_row_scalar(const int32_t* x, int64_t K, int bits, u64* out, int64_t plane_stride,
                       int64_t W) {
  for (int n = 0; n < bits; ++n) {
    for (int64_t w = 0; w < W; ++w) {
      u64 word = 0;
      const int64_t end = std::min<int64_t>(64, K - w * 64);
      for (int64_t t = 0; t < end; ++t) {
        if (((static_cast<uint32_t>(x[w * 64 + t]) >> n) & 1u) == 0) word |= u64{1} << t;
      }
      out[n * plane_stride + w] = word;
    }
  }
}

bool cpu_has(const std::string& isa) {
  __builtin_cpu_init();
  if (isa == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
  }
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
  if (isa == "scalar") return __builtin_cpu_supports("popcnt");
  return false;
}

}  // namespace

// a: [M, W] int64, b: [N, W] int64 (both contiguous), k = true bit length; returns int32 [M, N].
torch::Tensor xnor_gemm(const torch::Tensor& a, const torch::Tensor& b, int64_t k,
                        const std::string& isa) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "xnor_gemm: a and b must be 2-D word matrices");
  TORCH_CHECK(a.scalar_type() == torch::kInt64 && b.scalar_type() == torch::kInt64,
              "xnor_gemm: words must be int64");
  TORCH_CHECK(a.size(1) == b.size(1), "xnor_gemm: word counts differ");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "xnor_gemm: inputs must be contiguous");
  TORCH_CHECK(k >= 0 && k <= a.size(1) * 64, "xnor_gemm: k out of range");
  TORCH_CHECK(cpu_has(isa), "xnor_gemm: this CPU does not support isa '", isa, "'");
  const int64_t M = a.size(0), N = b.size(0), W = a.size(1);
  auto c = torch::zeros({M, N}, a.options().dtype(torch::kInt32));
  if (M == 0 || N == 0) return c;
  const u64* A = reinterpret_cast<const u64*>(a.data_ptr<int64_t>());
  const u64* B = reinterpret_cast<const u64*>(b.data_ptr<int64_t>());
  int32_t* C = c.data_ptr<int32_t>();
  if (isa == "avx512") {
    gemm<Avx512>(A, B, C, M, N, W, k);
  } else if (isa == "avx2") {
    gemm<Avx2>(A, B, C, M, N, W, k);
  } else if (isa == "scalar") {
    gemm<Scalar>(A, B, C, M, N, W, k);
  } else {
    TORCH_CHECK(false, "xnor_gemm: unknown isa '", isa, "' (avx512, avx2, scalar)");
  }
  return c;
}

// x: [R, K] float32 contiguous -> [R, ceil(K / 64)] int64, bit set where !(x >= 0).
torch::Tensor pack_signs_f32(const torch::Tensor& x, const std::string& isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "pack_signs_f32: x must be a contiguous 2-D float32 tensor");
  const int64_t R = x.size(0), K = x.size(1), W = (K + 63) / 64;
  auto out = torch::empty({R, W}, x.options().dtype(torch::kInt64));
  const float* X = x.data_ptr<float>();
  u64* O = reinterpret_cast<u64*>(out.data_ptr<int64_t>());
  const bool vec = (isa == "avx512") && cpu_has("avx512");
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(K, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (vec) {
        pack_row_avx512(X + r * K, K, O + r * W, W);
      } else {
        pack_row_scalar(X + r * K, K, O + r * W, W);
      }
    }
  });
  return out;
}

// x: [R, K] int32 contiguous -> [bits, R, ceil(K / 64)] int64 words (see planes_row_*).
torch::Tensor pack_bitplanes_i32(const torch::Tensor& x, int64_t bits, const std::string& isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kInt32 && x.is_contiguous(),
              "pack_bitplanes_i32: x must be a contiguous 2-D int32 tensor");
  TORCH_CHECK(bits >= 1 && bits <= 16, "pack_bitplanes_i32: bits must be in 1..16");
  const int64_t R = x.size(0), K = x.size(1), W = (K + 63) / 64;
  auto out = torch::empty({bits, R, W}, x.options().dtype(torch::kInt64));
  const int32_t* X = x.data_ptr<int32_t>();
  u64* O = reinterpret_cast<u64*>(out.data_ptr<int64_t>());
  const bool vec = (isa == "avx512") && cpu_has("avx512");
  const int nb = static_cast<int>(bits);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(K, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (vec) {
        planes_row_avx512(X + r * K, K, nb, O + r * W, R * W, W);
      } else {
        planes_row_scalar(X + r * K, K, nb, O + r * W, R * W, W);
      }
    }
  });
  return out;
}

bool supports(const std::string& isa) { return cpu_has(isa); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("xnor_gemm", &xnor_gemm, "XNOR-popcount GEMM on packed sign bits");
  m.def("pack_signs_f32", &pack_signs_f32, "pack float32 signs into int64 words");
  m.def("pack_bitplanes_i32", &pack_bitplanes_i32, "pack the bit planes of int32 values");
  m.def("supports", &supports, "whether this CPU runs the given isa path");
}
