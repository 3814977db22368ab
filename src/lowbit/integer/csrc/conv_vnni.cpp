// lowbit: int8 convolution on AVX-512 VNNI with the fixed-point requantization in the epilogue.
//
// Activations are bytes (uint8, or int8 moved to uint8 by v ^ 0x80 == v + 128, the zero point
// moving with them), weights int8: vpdpbusd multiplies 4 u8 x s8 pairs and adds them to an
// int32 lane without saturation, so the int32 sum is exact (|acc| < K * 255 * 128 < 2^31 for
// K < 65,000). The accumulator tile stays in registers; the epilogue applies, per output
// channel o, in int64 with wrap-around exactly as the torch reference does:
//
//   x = acc - zs[o]      (zs = z_u8 * sum of the weights; the int32 tile starts at -zs)
//   [residual] x = clamp(g[o] * x + lut[o][s], lo[o], hi[o])   (s: the shortcut byte)
//   v = x * M[o] + C[o];  q = v >> k[o];  q -= (v & (2^k - 1)) < w[o] and q odd
//   y = clamp(q + zp, qmin, qmax)
//
// Where every multiplier (and residual gain) fits in int32 and the residual clamp keeps x in
// int32 (the "narrow" epilogue, chosen per layer), the products are 32 x 32 -> 64-bit
// (vpmuldq, one uop, instead of the three of vpmullq) on the even and the odd int32 lanes of
// the tile in place, with the constants laid out even/odd to match; no widening, and the two
// halves are merged back to int32 lanes after the clamp. Same integers, about half the uops.
//
// Layout: the input is copied once into a padded NHWC uint8 buffer (padding holds the zero
// point; channels padded to a multiple of 4, with zero weights), so the inner loop has no
// bounds checks; output NHWC [N*OH*OW, O]. The VNNI code is compiled for that target only
// (function attributes) and used only when the CPU reports avx512_vnni.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#define LOWBIT_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

namespace {

// per-channel parameter rows of the int64 [8, OP] table
enum Row { ZS = 0, MUL, OFF, SHIFT, MASK, WIN, GAIN, NROWS_BASE };

struct Epilogue {
  const int64_t* p;     // [NROWS_BASE, OP]: zs, mul, off, shift, mask, win, gain
  const int64_t* clo;   // [OP] residual clamp (nullptr: no residual)
  const int64_t* chi;
  const int32_t* lut;   // [OP, 256] (nullptr: no residual)
  const uint8_t* sc;    // shortcut bytes [R, O]
  bool sc_signed;
  const uint8_t* ties;  // [OB] whether a 16-channel block has any tie window
  int64_t OP;
  int64_t zp, qmin, qmax;
  int out_kind;         // 0 int8, 1 uint8, 2 int32
  void* out;
  int64_t O;
  bool narrow;          // multipliers, gains and residual clamps fit in int32
  const int32_t* sr;    // [5, OP] the shortcut's rule in int32 (M, C, k, 2^k - 1, window),
                        // nullptr: its values come from the table lut
  int32_t szp, sqmin, sqmax;
};

// The shortcut's terms of 16 channels [o, o + 16) of one pixel: lut[o][s], gathered from the
// table, or (sr) the shortcut's requantization rule evaluated in int32 lanes, where
// |M·s + C| < 2^31 over its codes (checked when the layer is prepared): the same integers.
LOWBIT_VNNI static inline __m512i shortcut_terms(const Epilogue& e, const uint8_t* s,
                                                 bool full, __mmask16 valid, __m512i rows,
                                                 __m128i flip, int64_t o) {
  const __m128i raw = full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(s))
                           : _mm_maskz_loadu_epi8(valid, s);
  if (e.sr == nullptr)
    return _mm512_mask_i32gather_epi32(
        _mm512_setzero_si512(), valid,
        _mm512_add_epi32(_mm512_cvtepu8_epi32(_mm_xor_si128(raw, flip)), rows), e.lut, 4);
  const int64_t OP = e.OP;
  const __m512i x = e.sc_signed ? _mm512_cvtepi8_epi32(raw) : _mm512_cvtepu8_epi32(raw);
  const __m512i v = _mm512_add_epi32(_mm512_mullo_epi32(x, _mm512_loadu_si512(e.sr + o)),
                                     _mm512_loadu_si512(e.sr + OP + o));
  __m512i q = _mm512_srav_epi32(v, _mm512_loadu_si512(e.sr + 2 * OP + o));
  const __m512i one = _mm512_set1_epi32(1);
  const __mmask16 t =
      _mm512_cmplt_epi32_mask(_mm512_and_si512(v, _mm512_loadu_si512(e.sr + 3 * OP + o)),
                              _mm512_loadu_si512(e.sr + 4 * OP + o)) &
      _mm512_test_epi32_mask(q, one);
  q = _mm512_add_epi32(_mm512_mask_sub_epi32(q, t, q, one), _mm512_set1_epi32(e.szp));
  return _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(e.sqmax)),
                          _mm512_set1_epi32(e.sqmin));
}

// q = v >> k (floor) on int64 lanes; with ties, an exact tie (v mod 2^k below the window)
// of an odd quotient rounds down to its even neighbour
LOWBIT_VNNI static inline __m512i shift_round(__m512i v, __m512i k, __m512i mask, __m512i win,
                                              bool ties) {
  __m512i q = _mm512_srav_epi64(v, k);
  if (ties) {
    const __m512i one = _mm512_set1_epi64(1);
    const __mmask8 t = _mm512_cmplt_epi64_mask(_mm512_and_si512(v, mask), win) &
                       _mm512_test_epi64_mask(q, one);
    q = _mm512_mask_sub_epi64(q, t, q, one);
  }
  return q;
}

// Where one 16-channel block [o, o + 16) of the pixels from r0 reads its shortcut bytes and
// writes its outputs (the last block of a layer may be partial: masked loads and stores).
template <int OUTK>
struct BlockIO {
  using Out = typename std::conditional<OUTK == 2, int32_t,
                                        typename std::conditional<OUTK == 1, uint8_t,
                                                                  int8_t>::type>::type;
  const Epilogue& e;
  int64_t o, O;
  const uint8_t* sc;
  Out* out;
  bool full;
  __mmask16 valid;
  __m128i flip;
  __m512i rows;

  LOWBIT_VNNI BlockIO(const Epilogue& ep, int64_t r0, int64_t o_)
      : e(ep), o(o_), O(ep.O), sc(ep.sc + r0 * ep.O + o_),
        out(static_cast<Out*>(ep.out) + r0 * ep.O + o_), full(ep.O - o_ >= 16),
        valid(full ? 0xFFFF : static_cast<__mmask16>((1u << (ep.O - o_)) - 1)),
        flip(_mm_set1_epi8(ep.sc_signed ? static_cast<char>(0x80) : 0)),
        rows(_mm512_slli_epi32(
            _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(o_)),
                             _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2,
                                              1, 0)),
            8)) {}

  // the shortcut's terms of pixel q (see shortcut_terms)
  LOWBIT_VNNI __m512i terms(int64_t q) const {
    return shortcut_terms(e, sc + q * O, full, valid, rows, flip, o);
  }

  // the 16 int32 results y of pixel q, narrowed to the output type
  LOWBIT_VNNI void store(int64_t q, __m512i y) const {
    Out* dst = out + q * O;
    if (OUTK == 2) {
      if (full) _mm512_storeu_si512(dst, y);
      else _mm512_mask_storeu_epi32(dst, valid, y);
    } else {
      const __m128i b = _mm512_cvtepi32_epi8(y);
      if (full) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), b);
      else _mm_mask_storeu_epi8(dst, valid, b);
    }
  }
};

// The narrow epilogue: products on the even / odd int32 lanes (vpmuldq), constants even/odd.
template <int OUTK, bool RES>
LOWBIT_VNNI static void epilogue_block_narrow(const Epilogue& e, const int32_t* __restrict acc,
                                              int64_t ld, int64_t np, int64_t r0, int64_t o) {
  const int64_t* p = e.p;
  const int64_t OP = e.OP;
  const __m512i ie = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i io = _mm512_set_epi64(15, 13, 11, 9, 7, 5, 3, 1);
#define LOWBIT_EO(NAME, PTR)                                                  \
  __m512i NAME##e, NAME##o;                                                   \
  {                                                                           \
    const __m512i lo8 = _mm512_loadu_si512(PTR), hi8 = _mm512_loadu_si512((PTR) + 8); \
    NAME##e = _mm512_permutex2var_epi64(lo8, ie, hi8);                        \
    NAME##o = _mm512_permutex2var_epi64(lo8, io, hi8);                        \
  }
  LOWBIT_EO(mul, p + MUL * OP + o)
  LOWBIT_EO(off, p + OFF * OP + o)
  LOWBIT_EO(sh, p + SHIFT * OP + o)
  LOWBIT_EO(msk, p + MASK * OP + o)
  LOWBIT_EO(win, p + WIN * OP + o)
  __m512i gaine = mule, gaino = mulo, cloe = mule, cloo = mulo, chie = mule, chio = mulo;
  if (RES) {
    LOWBIT_EO(g_, p + GAIN * OP + o)
    LOWBIT_EO(cl_, e.clo + o)
    LOWBIT_EO(ch_, e.chi + o)
    gaine = g_e; gaino = g_o; cloe = cl_e; cloo = cl_o; chie = ch_e; chio = ch_o;
  }
#undef LOWBIT_EO
  // clamp q to [qmin - zp, qmax - zp] in int64, then add zp in int32 after the merge
  const __m512i lo = _mm512_set1_epi64(e.qmin - e.zp), hi = _mm512_set1_epi64(e.qmax - e.zp),
                zp = _mm512_set1_epi32(static_cast<int32_t>(e.zp));
  const bool ties = e.ties[o / 16] != 0;
  const BlockIO<OUTK> blk(e, r0, o);
  for (int64_t q = 0; q < np; ++q) {
    __m512i a = _mm512_loadu_si512(acc + q * ld);  // int32: channel 2j low, 2j + 1 high of lane j
    __m512i xe = a, xo = _mm512_srli_epi64(a, 32);  // vpmuldq reads the low dword, signed
    if (RES) {  // x = clamp(g * x + lut[o][s]): 64-bit, then back in the low dwords (fits)
      const __m512i tv = blk.terms(q);
      __m512i ye = _mm512_add_epi64(_mm512_mul_epi32(gaine, xe),
                                    _mm512_srai_epi64(_mm512_slli_epi64(tv, 32), 32));
      __m512i yo = _mm512_add_epi64(_mm512_mul_epi32(gaino, xo), _mm512_srai_epi64(tv, 32));
      xe = _mm512_max_epi64(_mm512_min_epi64(ye, chie), cloe);
      xo = _mm512_max_epi64(_mm512_min_epi64(yo, chio), cloo);
    }
    const __m512i ve = _mm512_add_epi64(_mm512_mul_epi32(xe, mule), offe);
    const __m512i vo = _mm512_add_epi64(_mm512_mul_epi32(xo, mulo), offo);
    __m512i qe = shift_round(ve, she, mske, wine, ties);
    __m512i qo = shift_round(vo, sho, msko, wino, ties);
    qe = _mm512_max_epi64(_mm512_min_epi64(qe, hi), lo);
    qo = _mm512_max_epi64(_mm512_min_epi64(qo, hi), lo);
    const __m512i y = _mm512_add_epi32(
        _mm512_mask_blend_epi32(0xAAAA, qe, _mm512_slli_epi64(qo, 32)), zp);
    blk.store(q, y);
  }
}

// One 16-channel block [o, o + 16) of np pixels from r0: the rule on int64 lanes, parameters
// held in registers across the pixels. acc: the int32 tile minus zs ([np][ld]).
// OUTK: 0 int8, 1 uint8, 2 int32 outputs; RES: with the residual terms.
template <int OUTK, bool RES>
LOWBIT_VNNI static void epilogue_block(const Epilogue& e, const int32_t* __restrict acc,
                                       int64_t ld, int64_t np, int64_t r0, int64_t o) {
  const int64_t* p = e.p;
  const int64_t OP = e.OP;
#define LOWBIT_PAIR(NAME, PTR) \
  const __m512i NAME##0 = _mm512_loadu_si512(PTR); \
  const __m512i NAME##1 = _mm512_loadu_si512((PTR) + 8);
  LOWBIT_PAIR(mul, p + MUL * OP + o)
  LOWBIT_PAIR(off, p + OFF * OP + o)
  LOWBIT_PAIR(sh, p + SHIFT * OP + o)
  LOWBIT_PAIR(msk, p + MASK * OP + o)
  LOWBIT_PAIR(win, p + WIN * OP + o)
#undef LOWBIT_PAIR
  __m512i gain0 = mul0, gain1 = mul1, clo0 = mul0, clo1 = mul1, chi0 = mul0, chi1 = mul1;
  if (RES) {
    gain0 = _mm512_loadu_si512(p + GAIN * OP + o);
    gain1 = _mm512_loadu_si512(p + GAIN * OP + o + 8);
    clo0 = _mm512_loadu_si512(e.clo + o);
    clo1 = _mm512_loadu_si512(e.clo + o + 8);
    chi0 = _mm512_loadu_si512(e.chi + o);
    chi1 = _mm512_loadu_si512(e.chi + o + 8);
  }
  const __m512i zp = _mm512_set1_epi64(e.zp), lo = _mm512_set1_epi64(e.qmin),
                hi = _mm512_set1_epi64(e.qmax);
  const bool ties = e.ties[o / 16] != 0;
  const BlockIO<OUTK> blk(e, r0, o);
  for (int64_t q = 0; q < np; ++q) {
    const __m512i a = _mm512_loadu_si512(acc + q * ld);
    __m512i x0 = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(a));
    __m512i x1 = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a, 1));
    if (RES) {  // gather lut[o][s] (s ^ 0x80 for int8 shortcuts: the table starts at -128)
      const __m512i tv = blk.terms(q);
      x0 = _mm512_add_epi64(_mm512_mullo_epi64(gain0, x0),
                            _mm512_cvtepi32_epi64(_mm512_castsi512_si256(tv)));
      x1 = _mm512_add_epi64(_mm512_mullo_epi64(gain1, x1),
                            _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(tv, 1)));
      x0 = _mm512_max_epi64(_mm512_min_epi64(x0, chi0), clo0);
      x1 = _mm512_max_epi64(_mm512_min_epi64(x1, chi1), clo1);
    }
    const __m512i v0 = _mm512_add_epi64(_mm512_mullo_epi64(x0, mul0), off0);
    const __m512i v1 = _mm512_add_epi64(_mm512_mullo_epi64(x1, mul1), off1);
    __m512i q0 = shift_round(v0, sh0, msk0, win0, ties);
    __m512i q1 = shift_round(v1, sh1, msk1, win1, ties);
    q0 = _mm512_max_epi64(_mm512_min_epi64(_mm512_add_epi64(q0, zp), hi), lo);
    q1 = _mm512_max_epi64(_mm512_min_epi64(_mm512_add_epi64(q1, zp), hi), lo);
    const __m512i y = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(q0)),
                                         _mm512_cvtepi64_epi32(q1), 1);
    blk.store(q, y);
  }
}

struct Geometry {
  const uint8_t* xp;  // padded NHWC input [N, HP, WP, C4]
  const int8_t* wp;   // packed weights [KH*KW][C4/4][OB][16][4]
  const int32_t* zs;  // [OP] -z_u8 * (sum of the weights), the accumulators' start
  int64_t N, HP, WP, C4, OH, OW, KH, KW, SH, SW, DH, DW, OB;
};

// P pixels starting at flat pixel r0 (n*OH*OW + oh*OW + ow), NB channel blocks from block b0
template <int P, int NB>
LOWBIT_VNNI static void tile(const Geometry& g, const Epilogue& e, int64_t r0, int64_t np,
                             int64_t b0) {
  const uint8_t* base[P];
  {  // input corner of each pixel; one division per tile, then step along the rows
    int64_t ow = r0 % g.OW, t = r0 / g.OW, oh = t % g.OH, n = t / g.OH;
    for (int p = 0; p < P; ++p) {
      base[p] = g.xp + ((n * g.HP + oh * g.SH) * g.WP + ow * g.SW) * g.C4;
      if (p + 1 < np && ++ow == g.OW) {
        ow = 0;
        if (++oh == g.OH) { oh = 0; ++n; }
      }
    }
  }
  __m512i acc[P][NB];  // start at -zs: the sums end at acc - zs, exact in int32
  for (int b = 0; b < NB; ++b) {
    const __m512i z = _mm512_loadu_si512(g.zs + (b0 + b) * 16);
    for (int p = 0; p < P; ++p) acc[p][b] = z;
  }
  const int64_t G4 = g.C4 / 4;
  for (int64_t i = 0; i < g.KH; ++i) {
    for (int64_t j = 0; j < g.KW; ++j) {
      const int64_t xoff = (i * g.DH * g.WP + j * g.DW) * g.C4;
      const int8_t* w = g.wp + ((i * g.KW + j) * G4 * g.OB + b0) * 64;
      for (int64_t c = 0; c < G4; ++c, w += g.OB * 64) {
        __m512i wv[NB];
        for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_si512(w + b * 64);
        for (int p = 0; p < P; ++p) {
          int32_t four;
          std::memcpy(&four, base[p] + xoff + c * 4, 4);
          const __m512i xv = _mm512_set1_epi32(four);
          for (int b = 0; b < NB; ++b) acc[p][b] = _mm512_dpbusd_epi32(acc[p][b], xv, wv[b]);
        }
      }
    }
  }
  alignas(64) int32_t buf[P][NB * 16];
  for (int p = 0; p < P; ++p)
    for (int b = 0; b < NB; ++b) _mm512_store_si512(&buf[p][b * 16], acc[p][b]);
  const bool res = e.lut != nullptr;
  for (int b = 0; b < NB; ++b) {
    const int64_t o = (b0 + b) * 16;
    if (o >= e.O) break;
#define LOWBIT_EPI(K, R)                                                    \
  do {                                                                      \
    if (e.narrow) epilogue_block_narrow<K, R>(e, &buf[0][b * 16], NB * 16, np, r0, o); \
    else epilogue_block<K, R>(e, &buf[0][b * 16], NB * 16, np, r0, o);    \
  } while (0)
    if (e.out_kind == 0) { if (res) LOWBIT_EPI(0, true); else LOWBIT_EPI(0, false); }
    else if (e.out_kind == 1) { if (res) LOWBIT_EPI(1, true); else LOWBIT_EPI(1, false); }
    else { if (res) LOWBIT_EPI(2, true); else LOWBIT_EPI(2, false); }
#undef LOWBIT_EPI
  }
}

template <int P, int NB>
LOWBIT_VNNI static void run_tiles(const Geometry& g, const Epilogue& e, int64_t R) {
  const int64_t tiles = (R + P - 1) / P, groups = g.OB / NB;
  at::parallel_for(0, tiles * groups, 1, [&](int64_t b, int64_t end) {
    for (int64_t t = b; t < end; ++t) {
      const int64_t tp = t / groups, tb = t % groups;
      const int64_t r0 = tp * P;
      tile<P, NB>(g, e, r0, std::min<int64_t>(P, R - r0), tb * NB);
    }
  });
}

// ------------------------------------------------------------------------------- AMX-INT8
// The same convolution on AMX tiles. For kernel row i and an output tile of M pixels (M <= 16,
// consecutive in one output row), the input bytes of taps j = 0..KW-1 form one contiguous span
// of ((KW-1)*DW + 1)*C4 bytes per pixel (the padded NHWC row); the span is read in chunks of
// 64 bytes (one A tile row: pixel p's chunk starts SW*C4 bytes after pixel p-1's), and the
// weight tile of each chunk holds w[o][c][i][j] at the byte of (tap j, channel c) and zero
// everywhere else (channels beyond C, the gaps of a dilation, the bytes past the span), so
// TDPBUSD sums exactly the convolution's products, in int32 (no saturation, as vpdpbusd).
// Tiles: 0..3 accumulators (one per 16-channel block), 4 the pixels, 5/6 the weights. The
// accumulators start at -zs; the epilogue is the one above, on the tile stored to a buffer.
// Compiled where the compiler knows the AMX intrinsics (GCC 11+, Clang 12+) and not built with
// -DLOWBIT_NO_AMX; otherwise amx_supported() is false and the VNNI loop runs every layer.
#if !defined(LOWBIT_NO_AMX) && defined(__has_include)
#if __has_include(<amxtileintrin.h>) || __has_include(<amxintrin.h>)
#define LOWBIT_HAVE_AMX 1
#endif
#endif
#ifdef LOWBIT_HAVE_AMX
#define LOWBIT_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512dq,avx512vl")))

struct TileConfig {
  uint8_t palette, start;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

struct AmxGeometry {
  const uint8_t* xp;  // padded NHWC input [N, HP, WP, C4] (64 bytes of slack at the end)
  const int8_t* wa;   // [KH][NCH][OB][16][64]
  const int32_t* zt;  // [OB][16][16]: -zs, one row per pixel
  int64_t N, HP, WP, C4, OH, OW, KH, SH, SW, DH, OB, NCH, M;
};

// RESIDENT: one 16-channel block whose KH*NCH <= 3 weight tiles stay in tiles 5..7 for
// the whole range (loaded once instead of once per pixel tile)
template <int NB, bool RESIDENT>
LOWBIT_AMX static void amx_tiles(const AmxGeometry& g, const Epilogue& e, int64_t b0,
                                 int64_t t0, int64_t t1) {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int b = 0; b < 4; ++b) { cfg.rows[b] = static_cast<uint8_t>(g.M); cfg.colsb[b] = 64; }
  cfg.rows[4] = static_cast<uint8_t>(g.M); cfg.colsb[4] = 64;
  cfg.rows[5] = cfg.rows[6] = cfg.rows[7] = 16;
  cfg.colsb[5] = cfg.colsb[6] = cfg.colsb[7] = 64;
  _tile_loadconfig(&cfg);
  const int64_t nw = g.KH * g.NCH;  // weight tiles of the block, [i][c] order
  if (RESIDENT) {
    const int8_t* w = g.wa + b0 * 1024;
    _tile_loadd(5, w, 64);
    if (nw > 1) _tile_loadd(6, w + g.OB * 1024, 64);
    if (nw > 2) _tile_loadd(7, w + 2 * g.OB * 1024, 64);
  }
  alignas(64) int32_t buf[16 * 16];
  const int64_t tiles_w = g.OW / g.M;
  const int64_t pstride = g.SW * g.C4;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t tw = t % tiles_w, rest = t / tiles_w, oh = rest % g.OH, n = rest / g.OH;
    const int64_t ow0 = tw * g.M;
    const int64_t r0 = (n * g.OH + oh) * g.OW + ow0;
    const uint8_t* px = g.xp + ((n * g.HP + oh * g.SH) * g.WP + ow0 * g.SW) * g.C4;
#define LOWBIT_INIT(B) if (NB > B) _tile_loadd(B, g.zt + (b0 + B) * 256, 64);
    LOWBIT_INIT(0) LOWBIT_INIT(1) LOWBIT_INIT(2) LOWBIT_INIT(3)
#undef LOWBIT_INIT
    if (RESIDENT) {
      for (int64_t q = 0; q < nw; ++q) {
        const int64_t i = q / g.NCH, c = q % g.NCH;
        _tile_loadd(4, px + i * g.DH * g.WP * g.C4 + c * 64, pstride);
        if (q == 0) _tile_dpbusd(0, 4, 5);
        else if (q == 1) _tile_dpbusd(0, 4, 6);
        else _tile_dpbusd(0, 4, 7);
      }
    }
    for (int64_t i = 0; i < (RESIDENT ? 0 : g.KH); ++i) {
      const uint8_t* row = px + i * g.DH * g.WP * g.C4;
      const int8_t* w = g.wa + (i * g.NCH * g.OB + b0) * 1024;
      for (int64_t c = 0; c < g.NCH; ++c, w += g.OB * 1024) {
        _tile_loadd(4, row + c * 64, pstride);
#define LOWBIT_DOT(B, T)                   \
        if (NB > B) {                      \
          _tile_loadd(T, w + B * 1024, 64); \
          _tile_dpbusd(B, 4, T);           \
        }
        LOWBIT_DOT(0, 5) LOWBIT_DOT(1, 6) LOWBIT_DOT(2, 5) LOWBIT_DOT(3, 6)
#undef LOWBIT_DOT
      }
    }
    const bool res = e.lut != nullptr;
#define LOWBIT_OUT(B)                                                                   \
    if (NB > B && (b0 + B) * 16 < e.O) {                                                \
      _tile_stored(B, buf, 64);                                                         \
      const int64_t o = (b0 + B) * 16;                                                  \
      if (e.narrow) {                                                                   \
        if (e.out_kind == 0) { if (res) epilogue_block_narrow<0, true>(e, buf, 16, g.M, r0, o); \
                               else epilogue_block_narrow<0, false>(e, buf, 16, g.M, r0, o); } \
        else if (e.out_kind == 1) { if (res) epilogue_block_narrow<1, true>(e, buf, 16, g.M, r0, o); \
                                    else epilogue_block_narrow<1, false>(e, buf, 16, g.M, r0, o); } \
        else { if (res) epilogue_block_narrow<2, true>(e, buf, 16, g.M, r0, o);          \
               else epilogue_block_narrow<2, false>(e, buf, 16, g.M, r0, o); }            \
      } else {                                                                          \
        if (e.out_kind == 0) { if (res) epilogue_block<0, true>(e, buf, 16, g.M, r0, o);   \
                               else epilogue_block<0, false>(e, buf, 16, g.M, r0, o); }    \
        else if (e.out_kind == 1) { if (res) epilogue_block<1, true>(e, buf, 16, g.M, r0, o); \
                                    else epilogue_block<1, false>(e, buf, 16, g.M, r0, o); } \
        else { if (res) epilogue_block<2, true>(e, buf, 16, g.M, r0, o);                   \
               else epilogue_block<2, false>(e, buf, 16, g.M, r0, o); }                    \
      }                                                                                 \
    }
    LOWBIT_OUT(0) LOWBIT_OUT(1) LOWBIT_OUT(2) LOWBIT_OUT(3)
#undef LOWBIT_OUT
  }
  _tile_release();
}
#endif  // LOWBIT_HAVE_AMX

}  // namespace

// AMX-INT8 on this CPU, with the kernel's permission to use the tile data (asked once)
bool amx_supported() {
#ifndef LOWBIT_HAVE_AMX
  return false;
#endif
  static int state = -1;
  if (state < 0) {
    unsigned a = 0, b = 0, c = 0, d = 0;
    bool cpu = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 24)) && (d & (1u << 25));
    // ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18)
    state = cpu && syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : 0;
  }
  return state == 1;
}

// w [O, C, KH, KW] int8 -> the AMX weight tiles [KH][NCH][OB][16 rows][64 bytes] for a padded
// channel count C4 and dilation DW (see above); NCH = ceil(((KW-1)*DW + 1)*C4 / 64)
torch::Tensor pack_conv_weight_amx(torch::Tensor w, int64_t C4, int64_t DW) {
  TORCH_CHECK(w.dtype() == torch::kInt8 && w.dim() == 4, "w must be int8 [O, C, KH, KW]");
  auto wc = w.contiguous();
  const int64_t O = wc.size(0), C = wc.size(1), KH = wc.size(2), KW = wc.size(3);
  TORCH_CHECK(C4 >= C && C4 % 4 == 0, "C4 must be a multiple of 4 of at least C");
  const int64_t span = ((KW - 1) * DW + 1) * C4, NCH = (span + 63) / 64, OB = (O + 15) / 16;
  auto out = torch::zeros({KH * NCH * OB * 1024}, wc.options());
  const int8_t* src = wc.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  for (int64_t o = 0; o < O; ++o)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < KH; ++i)
        for (int64_t j = 0; j < KW; ++j) {
          const int64_t t = j * DW * C4 + c;  // byte of the span
          const int64_t ch = t / 64, k = t % 64;
          const int64_t at = ((i * NCH + ch) * OB + o / 16) * 1024 + (k / 4) * 64 +
                             (o % 16) * 4 + k % 4;
          dst[at] = src[((o * C + c) * KH + i) * KW + j];
        }
  return out;
}

bool vnni_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vnni");
}

// w [O, C, KH, KW] int8 -> [KH*KW][C4/4][OB][16 channels][4 input channels], zeros outside
torch::Tensor pack_conv_weight(torch::Tensor w) {
  TORCH_CHECK(w.dtype() == torch::kInt8 && w.dim() == 4, "w must be int8 [O, C, KH, KW]");
  auto wc = w.contiguous();
  const int64_t O = wc.size(0), C = wc.size(1), KH = wc.size(2), KW = wc.size(3);
  const int64_t C4 = (C + 3) / 4 * 4, OB = (O + 15) / 16;
  auto out = torch::zeros({KH * KW * (C4 / 4) * OB * 64}, wc.options());
  const int8_t* src = wc.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  for (int64_t o = 0; o < O; ++o)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < KH; ++i)
        for (int64_t j = 0; j < KW; ++j) {
          const int64_t kk = i * KW + j;
          const int64_t at = ((kk * (C4 / 4) + c / 4) * OB + o / 16) * 64 + (o % 16) * 4 + c % 4;
          dst[at] = src[((o * C + c) * KH + i) * KW + j];
        }
  return out;
}

// rows [b, e) of the padded copy; plain values in, so that byte stores cannot alias them
static void pad_rows(const uint8_t* __restrict in, uint8_t* __restrict o, int64_t b, int64_t e,
                     int64_t C, int64_t H, int64_t W, int64_t C4, int64_t HP, int64_t WP,
                     int64_t PH, int64_t PW, int64_t sn, int64_t sc, int64_t sh, int64_t sw,
                     uint8_t flip, uint8_t padv) {
  for (int64_t t = b; t < e; ++t) {
    const int64_t n = t / HP, h = t % HP - PH;
    uint8_t* __restrict row = o + t * WP * C4;
    if (h < 0 || h >= H) {
      std::memset(row, padv, WP * C4);
      continue;
    }
    std::memset(row, padv, PW * C4);
    std::memset(row + (PW + W) * C4, padv, PW * C4);
    const uint8_t* __restrict src = in + n * sn + h * sh;
    uint8_t* __restrict body = row + PW * C4;
    if (sc == 1 && sw == C && C4 == C) {  // channels-last rows: one contiguous run
      const int64_t len = W * C;
      if (flip) {
        for (int64_t i = 0; i < len; ++i) body[i] = src[i] ^ 0x80;
      } else {
        std::memcpy(body, src, len);
      }
      continue;
    }
    for (int64_t w = 0; w < W; ++w) {
      uint8_t* __restrict d = body + w * C4;
      const uint8_t* __restrict s = src + w * sw;
      for (int64_t c = 0; c < C; ++c) d[c] = s[c * sc] ^ flip;
      for (int64_t c = C; c < C4; ++c) d[c] = 0;
    }
  }
}

// x: [N, C, H, W] int8/uint8, any strides -> padded NHWC uint8 [N, H+2PH, W+2PW, C4] in a
// per-thread scratch buffer that only grows (no fresh pages, no page faults, on every call)
static const uint8_t* pad_nhwc(const torch::Tensor& x, int64_t PH, int64_t PW, int64_t zu8) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t C4 = (C + 3) / 4 * 4, HP = H + 2 * PH, WP = W + 2 * PW;
  thread_local std::vector<uint8_t> scratch;
  if (static_cast<int64_t>(scratch.size()) < N * HP * WP * C4 + 64)
    scratch.resize(N * HP * WP * C4 + 64);
  const uint8_t flip = x.dtype() == torch::kInt8 ? 0x80 : 0x00;
  const uint8_t* in = reinterpret_cast<const uint8_t*>(x.data_ptr());
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  uint8_t* o = scratch.data();
  const uint8_t padv = static_cast<uint8_t>(zu8);
  at::parallel_for(0, N * HP, 16, [=](int64_t b, int64_t e) {
    pad_rows(in, o, b, e, C, H, W, C4, HP, WP, PH, PW, sn, sc, sh, sw, flip, padv);
  });
  return o;
}

// The fused convolution. params: int64 [7, OP] (zs, mul, off, shift, mask, win, gain), OP a
// multiple of 16; residual (has_res): sc [N, OH, OW, O] 8-bit contiguous, lut int32 [OP, 256],
// clamp int64 [2, OP]. Returns [N, OH, OW, O] (int8, uint8 or int32 by out_kind).
torch::Tensor conv2d_requant(torch::Tensor x, torch::Tensor wp, int64_t O, int64_t KH,
                             int64_t KW, int64_t SH, int64_t SW, int64_t PH, int64_t PW,
                             int64_t DH, int64_t DW, int64_t zu8, torch::Tensor params,
                             int64_t zp, int64_t qmin, int64_t qmax, int64_t out_kind,
                             bool has_res, torch::Tensor sc, torch::Tensor lut,
                             torch::Tensor clamp, torch::Tensor wa, int64_t amx_rows,
                             torch::Tensor srule, int64_t szp, int64_t sqmin, int64_t sqmax) {
  TORCH_CHECK(vnni_supported(), "this CPU lacks AVX-512 VNNI");
  TORCH_CHECK((x.dtype() == torch::kInt8 || x.dtype() == torch::kUInt8) && x.dim() == 4,
              "x must be an int8/uint8 [N, C, H, W] tensor");
  TORCH_CHECK(wp.dtype() == torch::kInt8 && wp.is_contiguous(), "packed weights");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t C4 = (C + 3) / 4 * 4, OB = (O + 15) / 16, OP = OB * 16;
  TORCH_CHECK(wp.numel() == KH * KW * (C4 / 4) * OB * 64, "packed weights do not match");
  TORCH_CHECK(params.dtype() == torch::kInt64 && params.is_contiguous() &&
              params.size(0) == NROWS_BASE && params.size(1) == OP, "params [7, OP] int64");
  const int64_t OH = (H + 2 * PH - DH * (KH - 1) - 1) / SH + 1;
  const int64_t OW = (W + 2 * PW - DW * (KW - 1) - 1) / SW + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "empty output");
  const uint8_t* xp = pad_nhwc(x, PH, PW, zu8);
  const torch::ScalarType ot =
      out_kind == 1 ? torch::kUInt8 : (out_kind == 2 ? torch::kInt32 : torch::kInt8);
  auto out = torch::empty({N, OH, OW, O}, x.options().dtype(ot));
  const int64_t* pr = params.data_ptr<int64_t>();
  std::vector<int32_t> zs(OP);
  std::vector<uint8_t> ties(OB, 0);
  for (int64_t o = 0; o < OP; ++o) {
    TORCH_CHECK(pr[ZS * OP + o] > -(int64_t(1) << 31) && pr[ZS * OP + o] < (int64_t(1) << 31),
                "z * (sum of the weights) must fit in int32");
    zs[o] = static_cast<int32_t>(-pr[ZS * OP + o]);
    if (pr[WIN * OP + o] != 0) ties[o / 16] = 1;
  }
  Geometry g{xp, wp.data_ptr<int8_t>(), zs.data(), N, H + 2 * PH,
             W + 2 * PW, C4, OH, OW, KH, KW, SH, SW, DH, DW, OB};
  const auto fits32 = [](int64_t v) { return v >= -(int64_t(1) << 31) && v < (int64_t(1) << 31); };
  bool narrow = fits32(zp) && fits32(qmin - zp) && fits32(qmax - zp);
  for (int64_t o = 0; o < OP; ++o)
    narrow = narrow && fits32(pr[MUL * OP + o]) && (!has_res || fits32(pr[GAIN * OP + o]));
  Epilogue e{pr, nullptr, nullptr, nullptr, nullptr, false, ties.data(), OP,
             zp, qmin, qmax, static_cast<int>(out_kind), out.data_ptr(), O, narrow,
             nullptr, static_cast<int32_t>(szp), static_cast<int32_t>(sqmin),
             static_cast<int32_t>(sqmax)};
  if (has_res) {
    TORCH_CHECK((sc.dtype() == torch::kUInt8 || sc.dtype() == torch::kInt8) &&
                sc.is_contiguous() && sc.numel() == N * OH * OW * O,
                "shortcut must be a contiguous 8-bit [N, OH, OW, O] tensor");
    TORCH_CHECK(lut.dtype() == torch::kInt32 && lut.is_contiguous() && lut.size(0) == OP &&
                lut.size(1) == 256, "lut [OP, 256] int32");
    TORCH_CHECK(clamp.dtype() == torch::kInt64 && clamp.is_contiguous() &&
                clamp.size(0) == 2 && clamp.size(1) == OP, "clamp [2, OP] int64");
    e.sc = reinterpret_cast<const uint8_t*>(sc.data_ptr());
    e.sc_signed = sc.dtype() == torch::kInt8;
    e.lut = lut.data_ptr<int32_t>();
    e.clo = clamp.data_ptr<int64_t>();
    e.chi = e.clo + OP;
    if (srule.numel() > 0) {
      TORCH_CHECK(srule.dtype() == torch::kInt32 && srule.is_contiguous() &&
                  srule.numel() == 5 * OP, "srule [5, OP] int32");
      e.sr = srule.data_ptr<int32_t>();
    }
    for (int64_t o = 0; o < OP && e.narrow; ++o)  // the clamped x must fit in int32 too
      e.narrow = fits32(e.clo[o]) && fits32(e.chi[o]) && e.clo[o] <= e.chi[o];
  }
  const int64_t R = N * OH * OW;
#ifdef LOWBIT_HAVE_AMX
  if (wa.numel() > 0) {  // AMX: tiles of amx_rows pixels within one output row
    const int64_t span = ((KW - 1) * DW + 1) * C4, NCH = (span + 63) / 64, M = amx_rows;
    TORCH_CHECK(amx_supported(), "this CPU (or its kernel) does not allow AMX-INT8");
    TORCH_CHECK(wa.dtype() == torch::kInt8 && wa.is_contiguous() &&
                wa.numel() == KH * NCH * OB * 1024, "AMX weights do not match");
    TORCH_CHECK(M >= 1 && M <= 16 && OW % M == 0, "amx_rows must divide OW, at most 16");
    std::vector<int32_t> zt(OB * 256);
    for (int64_t b = 0; b < OB; ++b)
      for (int64_t r = 0; r < 16; ++r)
        for (int64_t j = 0; j < 16; ++j) zt[(b * 16 + r) * 16 + j] = zs[b * 16 + j];
    AmxGeometry ag{xp, wa.data_ptr<int8_t>(), zt.data(), N, H + 2 * PH, W + 2 * PW, C4,
                   OH, OW, KH, SH, SW, DH, OB, NCH, M};
    const int64_t T = N * OH * (OW / M);
    for (int64_t b0 = 0; b0 < OB; b0 += 4) {
      const int64_t nb = std::min<int64_t>(4, OB - b0);
      const bool resident = nb == 1 && KH * NCH <= 3;
      at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
        if (nb == 4) amx_tiles<4, false>(ag, e, b0, t0, t1);
        else if (nb == 3) amx_tiles<3, false>(ag, e, b0, t0, t1);
        else if (nb == 2) amx_tiles<2, false>(ag, e, b0, t0, t1);
        else if (resident) amx_tiles<1, true>(ag, e, b0, t0, t1);
        else amx_tiles<1, false>(ag, e, b0, t0, t1);
      });
    }
    return out;
  }
#else
  TORCH_CHECK(wa.numel() == 0, "this build of the kernel has no AMX code");
  (void)amx_rows;
#endif
  if (OB % 4 == 0) {
    run_tiles<6, 4>(g, e, R);
  } else if (OB % 2 == 0) {
    run_tiles<12, 2>(g, e, R);
  } else {
    run_tiles<16, 1>(g, e, R);
  }
  return out;
}
