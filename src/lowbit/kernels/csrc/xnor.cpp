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
#include <optional>
#include <string>
#include <vector>

namespace {

using u64 = uint64_t;

// Cache blocking (in 64-bit words / rows): a 4 x KC panel of A (8 KiB) stays in L1, an NC x KC
// block of B (512 KiB) in L2; one task owns an MC x NC block of C for the whole K loop.
constexpr int64_t KC = 256;
constexpr int64_t MC = 64;
constexpr int64_t NC = 256;
constexpr int64_t kMinWork = int64_t{1} << 19;  // word pairs per thread, about 50 us

template <class Isa, int R, int C>
void micro_edge(int64_t r, int64_t nr, const u64* a, int64_t lda, const u64* b, int64_t ldb,
                int64_t kw, int32_t* c, int64_t ldc);

// The tile loops over a rows x cols block (A rows at a, B rows at b, both with stride W),
// compiled for the ISA so that the full-tile micro kernel is inlined (a call per tile costs
// as much as the tile itself when K is a few words); edge tiles go through micro_edge.
#define LOWBIT_XNOR_BLOCK(TARGET, SELF)                                                        \
  __attribute__((target(TARGET))) static void block(const u64* a, const u64* b, int64_t W,     \
                                                    int64_t rows, int64_t cols, int64_t kw,    \
                                                    int32_t* c, int64_t ldc) {                 \
    for (int64_t i = 0; i < rows; i += MR) {                                                   \
      const int64_t r = std::min<int64_t>(MR, rows - i);                                       \
      for (int64_t j = 0; j < cols; j += NR) {                                                 \
        const int64_t nr = std::min<int64_t>(NR, cols - j);                                    \
        if (r == MR && nr == NR) {                                                             \
          micro<MR, NR>(a + i * W, W, b + j * W, W, kw, c + i * ldc + j, ldc);                 \
        } else {                                                                               \
          micro_edge<SELF, MR, NR>(r, nr, a + i * W, W, b + j * W, W, kw, c + i * ldc + j,     \
                                   ldc);                                                       \
        }                                                                                      \
      }                                                                                        \
    }                                                                                          \
  }

// ---------------------------------------------------------------- scalar (popcnt) micro kernel
struct Scalar {
  static constexpr int MR = 2;
  static constexpr int NR = 4;
  LOWBIT_XNOR_BLOCK("popcnt", Scalar)

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
  LOWBIT_XNOR_BLOCK("avx2,popcnt", Avx2)

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
  LOWBIT_XNOR_BLOCK("avx512f,avx512vpopcntdq", Avx512)

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
    if constexpr (R % 2 == 0 && C == 4) {
      // two rows at a time: 8 accumulators -> one vector of 8 sums -> 2 x 4 int32 outputs
      for (int h = 0; h < R; h += 2) {
        const __m512i v[8] = {acc[h][0],     acc[h][1],     acc[h][2],     acc[h][3],
                              acc[h + 1][0], acc[h + 1][1], acc[h + 1][2], acc[h + 1][3]};
        const __m256i sums = _mm512_cvtepi64_epi32(reduce8(v));
        int32_t* c0 = c + h * ldc;
        int32_t* c1 = c0 + ldc;
        const __m128i lo = _mm256_castsi256_si128(sums);
        const __m128i hi = _mm256_extracti128_si256(sums, 1);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(c0),
                         _mm_add_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c0)), lo));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(c1),
                         _mm_add_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c1)), hi));
      }
    } else {
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < C; ++j)
          c[i * ldc + j] += static_cast<int32_t>(_mm512_reduce_add_epi64(acc[i][j]));
    }
  }

  // r[k] = sum of the 8 lanes of v[k]: pairwise adds and 128-bit lane shuffles (21 ops instead
  // of 8 horizontal reductions).
  __attribute__((target("avx512f"))) static inline __m512i reduce8(const __m512i* v) {
    __m512i t[4];
    for (int q = 0; q < 4; ++q)
      t[q] = _mm512_add_epi64(_mm512_unpacklo_epi64(v[2 * q], v[2 * q + 1]),
                              _mm512_unpackhi_epi64(v[2 * q], v[2 * q + 1]));
    const __m512i s0 = _mm512_add_epi64(_mm512_shuffle_i64x2(t[0], t[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                        _mm512_shuffle_i64x2(t[0], t[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i s1 = _mm512_add_epi64(_mm512_shuffle_i64x2(t[2], t[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                        _mm512_shuffle_i64x2(t[2], t[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_epi64(_mm512_shuffle_i64x2(s0, s1, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i64x2(s0, s1, _MM_SHUFFLE(3, 1, 3, 1)));
  }
};

// Calls Isa::micro<r, nr> for a tile of r <= R rows and nr <= C columns (edges of C).
#undef LOWBIT_XNOR_BLOCK

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

// Popcounts of A[m] ^ B[n] (A: [M, W], B: [N, W] words, row-major) handed block by block to
// `epi(i0, i1, j0, j1, pop, ld)`, where pop[(i - i0) * ld + (j - j0)] = popcount over all W
// words. Row blocks have `mc` rows (the epilogue of the bit-plane product needs whole groups).
template <class Isa, class Epilogue>
void gemm(const u64* A, const u64* B, int64_t M, int64_t N, int64_t W, int64_t mc,
          const Epilogue& epi) {
  const int64_t mb = (M + mc - 1) / mc;
  const int64_t nb = (N + NC - 1) / NC;
  // Each thread gets at least kMinWork word pairs (small products run inline: a parallel
  // region costs more than they do, and much more when the CPUs are oversubscribed).
  const int64_t task_work = std::min(M, mc) * std::min(N, NC) * std::max<int64_t>(W, 1);
  const int64_t grain = std::max<int64_t>(1, kMinWork / task_work);
  at::parallel_for(0, mb * nb, grain, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> pop(static_cast<size_t>(mc * NC));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i0 = (t / nb) * mc, i1 = std::min(M, i0 + mc);
      const int64_t j0 = (t % nb) * NC, j1 = std::min(N, j0 + NC);
      std::fill(pop.begin(), pop.end(), 0);
      for (int64_t k0 = 0; k0 < W; k0 += KC) {
        Isa::block(A + i0 * W + k0, B + j0 * W + k0, W, i1 - i0, j1 - j0, std::min(KC, W - k0),
                   pop.data(), NC);
      }
      epi(i0, i1, j0, j1, pop.data(), NC);
    }
  });
}

// ------------------------------------------------------------------------------ epilogues
// Output stores: an exact int32, or float32 computed as float(v) * scale[j] + bias[j] with the
// same two roundings as the torch ops (the file is built with -ffp-contract=off: no FMA).
struct StoreInt {
  int32_t* out;
  int64_t ld;
  void put(int64_t i, int64_t j, int64_t v) const { out[i * ld + j] = static_cast<int32_t>(v); }
};

struct StoreFloat {
  float* out;
  int64_t ld;
  const float* scale;  // may be null
  const float* bias;   // may be null
  void put(int64_t i, int64_t j, int64_t v) const {
    float f = static_cast<float>(v);
    if (scale != nullptr) f = f * scale[j];
    if (bias != nullptr) f = f + bias[j];
    out[i * ld + j] = f;
  }
};

// Binary product: dot = K - 2 * popcount.
template <class Store>
struct DotEpilogue {
  Store store;
  int64_t K;
  void operator()(int64_t i0, int64_t i1, int64_t j0, int64_t j1, const int32_t* pop,
                  int64_t ld) const {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = j0; j < j1; ++j) store.put(i, j, K - 2 * int64_t{pop[(i - i0) * ld + j - j0]});
  }
};

// Bit-plane product: rows come in groups of `bits` planes of one input row; plane n (0/1
// values b) was packed as s = 2b - 1, so b·w = (s·w + sum(w)) / 2 and the output is
// sum_n coef[n] * b_n·w = (sum_n coef[n] * s_n·w + csum * sum(w)) / 2 (exact: even).
template <class Store>
struct PlanesEpilogue {
  Store store;
  int64_t K;
  int64_t bits;
  const int64_t* coef;
  int64_t csum;
  const int64_t* colsum;
  void operator()(int64_t i0, int64_t i1, int64_t j0, int64_t j1, const int32_t* pop,
                  int64_t ld) const {
    for (int64_t i = i0; i < i1; i += bits) {
      for (int64_t j = j0; j < j1; ++j) {
        int64_t acc = csum * colsum[j];
        for (int64_t n = 0; n < bits; ++n)
          acc += coef[n] * (K - 2 * int64_t{pop[(i - i0 + n) * ld + j - j0]});
        store.put(i / bits, j, acc / 2);
      }
    }
  }
};

template <class Epilogue>
void run_isa(const std::string& isa, const u64* A, const u64* B, int64_t M, int64_t N, int64_t W,
             int64_t mc, const Epilogue& epi) {
  if (isa == "avx512") {
    gemm<Avx512>(A, B, M, N, W, mc, epi);
  } else if (isa == "avx2") {
    gemm<Avx2>(A, B, M, N, W, mc, epi);
  } else if (isa == "scalar") {
    gemm<Scalar>(A, B, M, N, W, mc, epi);
  } else {
    TORCH_CHECK(false, "xnor: unknown isa '", isa, "' (avx512, avx2, scalar)");
  }
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
// 0/1 plane b is stored as the ±1 vector 2b - 1). out: [R, bits, W] (plane_stride = W).
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

namespace {

void check_words(const torch::Tensor& a, const torch::Tensor& b, int64_t k, const std::string& isa) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "xnor: a and b must be 2-D word matrices");
  TORCH_CHECK(a.scalar_type() == torch::kInt64 && b.scalar_type() == torch::kInt64,
              "xnor: words must be int64");
  TORCH_CHECK(a.size(1) == b.size(1), "xnor: word counts differ");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "xnor: inputs must be contiguous");
  TORCH_CHECK(k >= 0 && k <= a.size(1) * 64 && k < (int64_t{1} << 31), "xnor: k out of range");
  TORCH_CHECK(cpu_has(isa), "xnor: this CPU does not support isa '", isa, "'");
}

const float* vector_or_null(const std::optional<torch::Tensor>& v, int64_t n, const char* name) {
  if (!v.has_value()) return nullptr;
  TORCH_CHECK(v->scalar_type() == torch::kFloat32 && v->dim() == 1 && v->size(0) == n &&
                  v->is_contiguous(),
              "xnor: ", name, " must be a contiguous float32 vector of the output width");
  return v->data_ptr<float>();
}

}  // namespace

// a: [M, W], b: [N, W] int64 words (contiguous), k = true bit length. Returns the int32
// products [M, N], or with out_float float32 products * scale + bias (optional [N] vectors).
torch::Tensor xnor_gemm(const torch::Tensor& a, const torch::Tensor& b, int64_t k,
                        const std::optional<torch::Tensor>& scale,
                        const std::optional<torch::Tensor>& bias, bool out_float,
                        const std::string& isa) {
  check_words(a, b, k, isa);
  const int64_t M = a.size(0), N = b.size(0), W = a.size(1);
  const u64* A = reinterpret_cast<const u64*>(a.data_ptr<int64_t>());
  const u64* B = reinterpret_cast<const u64*>(b.data_ptr<int64_t>());
  if (!out_float) {
    TORCH_CHECK(!scale.has_value() && !bias.has_value(), "xnor: scale/bias need out_float");
    auto c = torch::empty({M, N}, a.options().dtype(torch::kInt32));
    if (M > 0 && N > 0)
      run_isa(isa, A, B, M, N, W, MC, DotEpilogue<StoreInt>{{c.data_ptr<int32_t>(), N}, k});
    return c;
  }
  auto y = torch::empty({M, N}, a.options().dtype(torch::kFloat32));
  const StoreFloat store{y.data_ptr<float>(), N, vector_or_null(scale, N, "scale"),
                         vector_or_null(bias, N, "bias")};
  if (M > 0 && N > 0) run_isa(isa, A, B, M, N, W, MC, DotEpilogue<StoreFloat>{store, k});
  return y;
}

// planes: [M * bits, W] words from pack_bitplanes_i32 (row m's planes are rows m*bits..+bits),
// b: [N, W]. Returns x @ w for the M integer rows (int32, or float32 * scale + bias).
torch::Tensor bitplane_gemm(const torch::Tensor& planes, const torch::Tensor& b, int64_t k,
                            int64_t bits, bool is_signed,
                            const std::optional<torch::Tensor>& scale,
                            const std::optional<torch::Tensor>& bias, bool out_float,
                            const std::string& isa) {
  check_words(planes, b, k, isa);
  TORCH_CHECK(bits >= 1 && bits <= 16 && planes.size(0) % bits == 0,
              "bitplane_gemm: bits must be in 1..16 and divide the number of plane rows");
  const int64_t M = planes.size(0) / bits, N = b.size(0), W = b.size(1);
  const u64* A = reinterpret_cast<const u64*>(planes.data_ptr<int64_t>());
  const u64* B = reinterpret_cast<const u64*>(b.data_ptr<int64_t>());
  std::vector<int64_t> coef(static_cast<size_t>(bits));
  int64_t csum = 0;
  for (int64_t n = 0; n < bits; ++n) {
    coef[n] = (is_signed && n == bits - 1) ? -(int64_t{1} << n) : (int64_t{1} << n);
    csum += coef[n];
  }
  std::vector<int64_t> colsum(static_cast<size_t>(N));  // sum of each ±1 weight row
  for (int64_t j = 0; j < N; ++j) {
    int64_t ones = 0;
    for (int64_t w = 0; w < W; ++w) ones += __builtin_popcountll(B[j * W + w]);
    colsum[j] = k - 2 * ones;
  }
  const int64_t mc = std::max<int64_t>(1, MC / bits) * bits;  // whole groups per block
  if (!out_float) {
    TORCH_CHECK(!scale.has_value() && !bias.has_value(), "xnor: scale/bias need out_float");
    auto c = torch::empty({M, N}, b.options().dtype(torch::kInt32));
    if (M > 0 && N > 0)
      run_isa(isa, A, B, M * bits, N, W, mc,
              PlanesEpilogue<StoreInt>{{c.data_ptr<int32_t>(), N}, k, bits, coef.data(), csum,
                                       colsum.data()});
    return c;
  }
  auto y = torch::empty({M, N}, b.options().dtype(torch::kFloat32));
  const StoreFloat store{y.data_ptr<float>(), N, vector_or_null(scale, N, "scale"),
                         vector_or_null(bias, N, "bias")};
  if (M > 0 && N > 0)
    run_isa(isa, A, B, M * bits, N, W, mc,
            PlanesEpilogue<StoreFloat>{store, k, bits, coef.data(), csum, colsum.data()});
  return y;
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
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(K, 1));
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

// x: [R, K] int32 contiguous -> [R * bits, ceil(K / 64)] int64 words (see planes_row_*).
torch::Tensor pack_bitplanes_i32(const torch::Tensor& x, int64_t bits, const std::string& isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kInt32 && x.is_contiguous(),
              "pack_bitplanes_i32: x must be a contiguous 2-D int32 tensor");
  TORCH_CHECK(bits >= 1 && bits <= 16, "pack_bitplanes_i32: bits must be in 1..16");
  const int64_t R = x.size(0), K = x.size(1), W = (K + 63) / 64;
  auto out = torch::empty({R * bits, W}, x.options().dtype(torch::kInt64));
  const int32_t* X = x.data_ptr<int32_t>();
  u64* O = reinterpret_cast<u64*>(out.data_ptr<int64_t>());
  const bool vec = (isa == "avx512") && cpu_has("avx512");
  const int nb = static_cast<int>(bits);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(K, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (vec) {
        planes_row_avx512(X + r * K, K, nb, O + r * bits * W, W, W);
      } else {
        planes_row_scalar(X + r * K, K, nb, O + r * bits * W, W, W);
      }
    }
  });
  return out;
}

bool supports(const std::string& isa) { return cpu_has(isa); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("xnor_gemm", &xnor_gemm, "XNOR-popcount GEMM on packed sign bits");
  m.def("pack_signs_f32", &pack_signs_f32, "pack float32 signs into int64 words");
  m.def("bitplane_gemm", &bitplane_gemm, "bit-plane product of integer rows and sign bits");
  m.def("pack_bitplanes_i32", &pack_bitplanes_i32, "pack the bit planes of int32 values");
  m.def("supports", &supports, "whether this CPU runs the given isa path");
}
