// Fused fake quantization for contiguous float32 arrays (lowbit.kernels.fake_quant).
//
// One pass reads x and writes the dequantized output plus, when asked, a bit-packed
// straight-through mask (bit i of byte i/8 = element i was not clipped). The arithmetic is the
// one of lowbit.quant.functional's plain-torch reference, so results are bit-identical:
//   integer grid: v = x * (1/scale); r = nearbyint(v) (or stochastic); q = r + zp;
//                 out = (clamp(q, qmin, qmax) - zp) * scale
//   minifloat e{E}m{M}: round-to-nearest-even (or stochastic) on the float32 bit pattern,
//                 a separate path for the format's subnormal range, saturation, NaN kept.
//   binary:       +-1 (sign(0) = +1), optionally scaled; hardtanh STE mask |x/scale| <= 1.
// Stochastic rounding rounds up iff r31 < floor(frac * 2^31), where r31 is the top 31 bits
// of splitmix64(seed + (i + 1) * golden_gamma) for element index i.
// The loops are written to be auto-vectorised (-O3 -march=native); no torch headers are used,
// tensors are passed as data pointers, threads come from OpenMP.
#include <pybind11/pybind11.h>

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace py = pybind11;

namespace {

constexpr int64_t kBlock = 4096;  // elements per work item (multiple of 8: whole mask bytes)
constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kMix1 = 0xBF58476D1CE4E5B9ull;
constexpr uint64_t kMix2 = 0x94D049BB133111EBull;
constexpr float kTwo31 = 2147483648.0f;

inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline int32_t rand31(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * kGamma;
  z = (z ^ (z >> 30)) * kMix1;
  z = (z ^ (z >> 27)) * kMix2;
  z ^= z >> 31;
  return static_cast<int32_t>(z >> 33);
}

// floor(frac * 2^31) for frac in [0, 1); NaN (from inf inputs, result unused) maps to 0.
inline int32_t threshold31(float frac) {
  frac = frac >= 0.0f ? frac : 0.0f;
  return static_cast<int32_t>(frac * kTwo31);
}

struct IntParams {
  float qmin, qmax;
};

// noinline: keeps the __restrict promises (and so the vectorised loop) intact
template <bool kStochastic, bool kMask>
__attribute__((noinline)) void int_run(const float* __restrict x, float* __restrict out, uint8_t* __restrict m,
             const int32_t* __restrict rnd, int64_t i0, int64_t i1, float scale, float zp,
             IntParams p) {
  const float inv = 1.0f / scale;
  const float qmin = p.qmin, qmax = p.qmax;
  for (int64_t i = i0; i < i1; ++i) {
    const float v = x[i] * inv;
    float r;
    if (kStochastic) {
      const float a = std::fabs(v);
      const float lo = std::floor(a);
      const float up = rnd[i - i0] < threshold31(a - lo) ? 1.0f : 0.0f;
      r = std::copysign(lo + up, v);
    } else {
      r = std::nearbyint(v);
    }
    const float q = r + zp;
    if (kMask) m[i - i0] = static_cast<uint8_t>((q >= qmin) & (q <= qmax));
    float c = q < qmin ? qmin : q;
    c = c > qmax ? qmax : c;
    out[i] = (c - zp) * scale;
  }
}

struct FloatParams {
  uint32_t drop;       // 23 - mantissa bits
  uint32_t low_mask;   // (1 << drop) - 1
  uint32_t half_m1;    // (1 << (drop - 1)) - 1, or 0 when drop == 0
  uint32_t lsb_mask;   // 1 when drop > 0 (ties-to-even term), else 0
  float max_value;     // largest finite value of the format
  float overflow;      // what beyond max becomes: max (saturate) or inf
  float min_normal;    // 2^emin
  float sub_inv_step;  // 2^(M - emin): subnormal grid step^-1
  float sub_step;      // 2^(emin - M)
};

template <bool kStochastic, bool kMask, bool kScaled, bool kSubnormal>
__attribute__((noinline)) void float_run(const float* __restrict x, float* __restrict out, uint8_t* __restrict m,
               const int32_t* __restrict rnd, int64_t i0, int64_t i1, float scale,
               const FloatParams p) {
  // locals, so that the stores to out[] cannot alias them
  const uint32_t drop = p.drop, low_mask = p.low_mask, half_m1 = p.half_m1;
  const uint32_t lsb_mask = p.lsb_mask, one_ulp = 1u << p.drop;
  const float max_value = p.max_value, overflow = p.overflow, min_normal = p.min_normal;
  const float sub_inv_step = p.sub_inv_step, sub_step = p.sub_step;
  for (int64_t i = i0; i < i1; ++i) {
    const float xs = kScaled ? x[i] / scale : x[i];
    const uint32_t u = f2u(xs);
    const uint32_t sign = u & 0x80000000u;
    const uint32_t ua = u ^ sign;
    const float a = u2f(ua);
    const int32_t r = kStochastic ? rnd[i - i0] : 0;
    uint32_t rb;
    if (kStochastic) {
      const int32_t thr = static_cast<int32_t>((ua & low_mask) << (31 - drop));
      rb = (ua & ~low_mask) + (r < thr ? one_ulp : 0u);
    } else {
      rb = (ua + half_m1 + ((ua >> drop) & lsb_mask)) & ~low_mask;
    }
    float y = u2f(rb);
    if (kSubnormal) {
      const float t = a * sub_inv_step;  // exact: scaling by a power of two
      float ys;
      if (kStochastic) {
        const float lo = std::floor(t);
        ys = (lo + (r < threshold31(t - lo) ? 1.0f : 0.0f)) * sub_step;
      } else {
        ys = std::nearbyint(t) * sub_step;
      }
      y = a < min_normal ? ys : y;
    }
    y = y > max_value ? overflow : y;
    float o = u2f(f2u(y) | sign);
    o = xs != xs ? xs : o;
    if (kScaled) o = o * scale;
    out[i] = o;
    if (kMask) m[i - i0] = static_cast<uint8_t>(a <= max_value);
  }
}

// Binarization: +1 where x/div >= 0 (so sign(0) = +1), else -1, times mul; NaN stays NaN.
// Stochastic (QNN): +1 with probability p = clip((x/div + 1) / 2, 0, 1).
template <bool kStochastic, bool kMask, bool kDiv, bool kMul>
__attribute__((noinline)) void binary_run(const float* __restrict x, float* __restrict out,
                                          uint8_t* __restrict m, const int32_t* __restrict rnd,
                                          int64_t i0, int64_t i1, float div, float mul) {
  for (int64_t i = i0; i < i1; ++i) {
    const float xs = kDiv ? x[i] / div : x[i];
    float b;
    if (kStochastic) {
      float p = (xs + 1.0f) / 2.0f;
      p = p >= 0.0f ? p : 0.0f;  // also NaN -> 0 (the result is NaN anyway)
      p = p > 1.0f ? 1.0f : p;
      // floor(p * 2^31) reaches 2^31 at p = 1: compare unsigned
      const uint32_t thr = static_cast<uint32_t>(p * kTwo31);
      b = static_cast<uint32_t>(rnd[i - i0]) < thr ? 1.0f : -1.0f;
    } else {
      b = xs >= 0.0f ? 1.0f : -1.0f;
    }
    float o = kMul ? b * mul : b;
    o = xs != xs ? xs : o;
    out[i] = o;
    if (kMask) m[i - i0] = static_cast<uint8_t>(std::fabs(xs) <= 1.0f);
  }
}

// Pack 8 bytes holding 0/1 into the bits of one byte (bit j = byte j).
inline uint8_t pack8(const uint8_t* b) {
  uint64_t v;
  std::memcpy(&v, b, 8);
  return static_cast<uint8_t>((v * 0x0102040810204080ull) >> 56);
}

// Runs of constant scale: element i uses parameter ((i / inner) % channels). With
// `stochastic`, the block's random numbers are drawn first (a loop of its own vectorises).
template <typename RunFn>
void for_each_block(int64_t n, int64_t channels, int64_t inner, uint8_t* mask, bool stochastic,
                    uint64_t seed, int threads, RunFn run) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) num_threads(threads) if (blocks > 4)
  for (int64_t b = 0; b < blocks; ++b) {
    alignas(64) uint8_t mbuf[kBlock];
    alignas(64) int32_t rbuf[kBlock];
    const int64_t start = b * kBlock;
    const int64_t end = start + kBlock < n ? start + kBlock : n;
    if (stochastic) {
      for (int64_t j = 0; j < end - start; ++j) rbuf[j] = rand31(seed, static_cast<uint64_t>(start + j));
    }
    int64_t i = start;
    while (i < end) {
      const int64_t run_index = i / inner;
      const int64_t stop = (run_index + 1) * inner < end ? (run_index + 1) * inner : end;
      run(i, stop, run_index % channels, mbuf + (i - start), rbuf + (i - start));
      i = stop;
    }
    if (mask != nullptr) {
      const int64_t count = end - start;
      for (int64_t j = count; j < ((count + 7) & ~int64_t{7}); ++j) mbuf[j] = 0;
      uint8_t* dst = mask + start / 8;
      for (int64_t j = 0; j < (count + 7) / 8; ++j) dst[j] = pack8(mbuf + 8 * j);
    }
  }
}

void int_fake_quant(uintptr_t x_ptr, uintptr_t out_ptr, uintptr_t mask_ptr, int64_t n,
                    uintptr_t scale_ptr, uintptr_t zp_ptr, int64_t channels, int64_t inner,
                    double qmin, double qmax, bool stochastic, int64_t seed, int threads) {
  py::gil_scoped_release release;
  const auto* x = reinterpret_cast<const float*>(x_ptr);
  auto* out = reinterpret_cast<float*>(out_ptr);
  auto* mask = reinterpret_cast<uint8_t*>(mask_ptr);
  const auto* scale = reinterpret_cast<const float*>(scale_ptr);
  const auto* zp = reinterpret_cast<const float*>(zp_ptr);
  const IntParams p{static_cast<float>(qmin), static_cast<float>(qmax)};
  const auto s = static_cast<uint64_t>(seed);
  for_each_block(n, channels, inner, mask, stochastic, s, threads,
                 [&](int64_t i0, int64_t i1, int64_t c, uint8_t* m, const int32_t* r) {
                   if (stochastic) {
                     if (mask) int_run<true, true>(x, out, m, r, i0, i1, scale[c], zp[c], p);
                     else int_run<true, false>(x, out, m, r, i0, i1, scale[c], zp[c], p);
                   } else {
                     if (mask) int_run<false, true>(x, out, m, r, i0, i1, scale[c], zp[c], p);
                     else int_run<false, false>(x, out, m, r, i0, i1, scale[c], zp[c], p);
                   }
                 });
}

template <bool kStochastic, bool kMask>
void float_dispatch(const float* x, float* out, uint8_t* m, const int32_t* r, int64_t i0,
                    int64_t i1, const float* scale, int64_t c, bool subnormal,
                    const FloatParams& p) {
  if (scale != nullptr) {
    if (subnormal)
      float_run<kStochastic, kMask, true, true>(x, out, m, r, i0, i1, scale[c], p);
    else
      float_run<kStochastic, kMask, true, false>(x, out, m, r, i0, i1, scale[c], p);
  } else {
    if (subnormal)
      float_run<kStochastic, kMask, false, true>(x, out, m, r, i0, i1, 1.0f, p);
    else
      float_run<kStochastic, kMask, false, false>(x, out, m, r, i0, i1, 1.0f, p);
  }
}

void float_fake_quant(uintptr_t x_ptr, uintptr_t out_ptr, uintptr_t mask_ptr, int64_t n,
                      uintptr_t scale_ptr, int64_t channels, int64_t inner, int exp_bits,
                      int man_bits, double max_value, bool saturate, bool stochastic,
                      int64_t seed, int threads) {
  py::gil_scoped_release release;
  const auto* x = reinterpret_cast<const float*>(x_ptr);
  auto* out = reinterpret_cast<float*>(out_ptr);
  auto* mask = reinterpret_cast<uint8_t*>(mask_ptr);
  const auto* scale = reinterpret_cast<const float*>(scale_ptr);
  const int emin = 2 - (1 << (exp_bits - 1));
  FloatParams p{};
  p.drop = static_cast<uint32_t>(23 - man_bits);
  p.low_mask = (1u << p.drop) - 1u;
  p.half_m1 = p.drop > 0 ? (1u << (p.drop - 1)) - 1u : 0u;
  p.lsb_mask = p.drop > 0 ? 1u : 0u;
  p.max_value = static_cast<float>(max_value);
  p.overflow = saturate ? p.max_value : INFINITY;
  p.min_normal = std::ldexp(1.0f, emin);
  // With 8 exponent bits the format's subnormals are float32's own: the bit path covers them.
  const bool subnormal = exp_bits < 8;
  p.sub_inv_step = subnormal ? std::ldexp(1.0f, man_bits - emin) : 1.0f;
  p.sub_step = subnormal ? std::ldexp(1.0f, emin - man_bits) : 1.0f;
  const auto s = static_cast<uint64_t>(seed);
  for_each_block(n, channels, inner, mask, stochastic, s, threads,
                 [&](int64_t i0, int64_t i1, int64_t c, uint8_t* m, const int32_t* r) {
                   if (stochastic) {
                     if (mask) float_dispatch<true, true>(x, out, m, r, i0, i1, scale, c, subnormal, p);
                     else float_dispatch<true, false>(x, out, m, r, i0, i1, scale, c, subnormal, p);
                   } else {
                     if (mask) float_dispatch<false, true>(x, out, m, r, i0, i1, scale, c, subnormal, p);
                     else float_dispatch<false, false>(x, out, m, r, i0, i1, scale, c, subnormal, p);
                   }
                 });
}

template <bool kStochastic, bool kMask>
void binary_dispatch(const float* x, float* out, uint8_t* m, const int32_t* r, int64_t i0,
                     int64_t i1, const float* div, const float* mul, int64_t c) {
  if (div != nullptr && mul != nullptr)
    binary_run<kStochastic, kMask, true, true>(x, out, m, r, i0, i1, div[c], mul[c]);
  else if (mul != nullptr)
    binary_run<kStochastic, kMask, false, true>(x, out, m, r, i0, i1, 1.0f, mul[c]);
  else
    binary_run<kStochastic, kMask, false, false>(x, out, m, r, i0, i1, 1.0f, 1.0f);
}

void binary_fake_quant(uintptr_t x_ptr, uintptr_t out_ptr, uintptr_t mask_ptr, int64_t n,
                       uintptr_t div_ptr, uintptr_t mul_ptr, int64_t channels, int64_t inner,
                       bool stochastic, int64_t seed, int threads) {
  py::gil_scoped_release release;
  const auto* x = reinterpret_cast<const float*>(x_ptr);
  auto* out = reinterpret_cast<float*>(out_ptr);
  auto* mask = reinterpret_cast<uint8_t*>(mask_ptr);
  const auto* div = reinterpret_cast<const float*>(div_ptr);
  const auto* mul = reinterpret_cast<const float*>(mul_ptr);
  const auto s = static_cast<uint64_t>(seed);
  for_each_block(n, channels, inner, mask, stochastic, s, threads,
                 [&](int64_t i0, int64_t i1, int64_t c, uint8_t* m, const int32_t* r) {
                   if (stochastic) {
                     if (mask) binary_dispatch<true, true>(x, out, m, r, i0, i1, div, mul, c);
                     else binary_dispatch<true, false>(x, out, m, r, i0, i1, div, mul, c);
                   } else {
                     if (mask) binary_dispatch<false, true>(x, out, m, r, i0, i1, div, mul, c);
                     else binary_dispatch<false, false>(x, out, m, r, i0, i1, div, mul, c);
                   }
                 });
}

// grad_in = grad * bit(mask, i)  (multiplication, as torch's fake_quantize backward)
struct BitTable {
  alignas(64) float v[256][8];
  BitTable() {
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 8; ++j) v[b][j] = (b >> j) & 1 ? 1.0f : 0.0f;
  }
};

void masked_grad(uintptr_t grad_ptr, uintptr_t mask_ptr, uintptr_t out_ptr, int64_t n,
                 int threads) {
  py::gil_scoped_release release;
  static const BitTable table;
  const auto* g = reinterpret_cast<const float*>(grad_ptr);
  const auto* mask = reinterpret_cast<const uint8_t*>(mask_ptr);
  auto* out = reinterpret_cast<float*>(out_ptr);
  const int64_t bytes = n / 8;
  const int64_t per_block = kBlock / 8;
  const int64_t blocks = (bytes + per_block - 1) / per_block;
#pragma omp parallel for schedule(static) num_threads(threads) if (blocks > 4)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k1 = (b + 1) * per_block < bytes ? (b + 1) * per_block : bytes;
    for (int64_t k = b * per_block; k < k1; ++k) {
      const float* row = table.v[mask[k]];
      for (int j = 0; j < 8; ++j) out[8 * k + j] = g[8 * k + j] * row[j];
    }
  }
  for (int64_t i = bytes * 8; i < n; ++i) out[i] = g[i] * table.v[mask[bytes]][i - bytes * 8];
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowbit fused fake quantization (float32, CPU)";
  m.def("int_fake_quant", &int_fake_quant);
  m.def("float_fake_quant", &float_fake_quant);
  m.def("binary_fake_quant", &binary_fake_quant);
  m.def("masked_grad", &masked_grad);
}
