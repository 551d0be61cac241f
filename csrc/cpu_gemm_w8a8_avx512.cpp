// AVX-512 kernels of W8A8 on CPU (activation quantization and the 2:4 int8 x int8 GEMM); compiled
// with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx512vbmi -ffp-contract=off (setup.py) and
// called only on CPUs that have them (cpu_gemm_w8a8.cpp checks at run time). Specification:
// reference.sparse_mm_int, matched bit for bit: -ffp-contract=off keeps every product and sum
// rounded on its own, as the reference's separate tensor ops are.
//
// One step reads 64 kept codes of a weight row (32 groups, 128 columns of x) and their 128 bits of
// metadata. vpmultishiftqb + a mask turn the metadata into 64 byte indices, 4 * group + index,
// into x's 128 columns; one vpermt2b gathers the matching activation codes and one vpdpbusd adds
// their products, four to a 32-bit lane, to int32 accumulators. vpdpbusd multiplies unsigned by
// signed bytes, so x is stored as code + 128; the extra 128 * (sum of the weight codes) is summed
// by one more vpdpbusd per weight row and step, shared by the rows of x, and subtracted at the end
// of each scale group. All integer sums wrap modulo 2**32, so the result is exact whenever the true
// sum fits int32 (|sum| < 127 * 127 * k: k < 133,000).
#include <immintrin.h>

#include "cpu_gemm.h"

namespace nxm {
namespace cpu_gemm {
namespace {

constexpr int kRows = 4;   // weight rows per block
constexpr int kXRows = 4;  // rows of x per tile
constexpr int kStepKept = 64;

// Lane j (j < N) of the result: the lane sum of v[j], wrapping. A transposing tree: 30 shuffles
// and 15 adds for 16 sums, where one reduction per vector would take 16 x 7.
template <int N>
inline __m512i lane_sums(const __m512i (&v)[N]) {
  __m512i p[16];
  for (int j = 0; j < 16; ++j) p[j] = j < N ? v[j] : _mm512_setzero_si512();
  __m512i q[8], h[4];
  for (int j = 0; j < 8; ++j)  // 128-bit lane L: v[2j] at positions 0 and 2, v[2j + 1] at 1 and 3
    q[j] = _mm512_add_epi32(_mm512_unpacklo_epi32(p[2 * j], p[2 * j + 1]), _mm512_unpackhi_epi32(p[2 * j], p[2 * j + 1]));
  for (int j = 0; j < 4; ++j)  // 128-bit lane L: the lane-L sums of v[4j .. 4j + 3]
    h[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(q[2 * j], q[2 * j + 1]), _mm512_unpackhi_epi64(q[2 * j], q[2 * j + 1]));
  // 128-bit lanes added pairwise, twice: lane group g of the result holds v[4g .. 4g + 3]'s sums
  const __m512i ab = _mm512_add_epi32(_mm512_shuffle_i32x4(h[0], h[1], 0x88), _mm512_shuffle_i32x4(h[0], h[1], 0xDD));
  const __m512i cd = _mm512_add_epi32(_mm512_shuffle_i32x4(h[2], h[3], 0x88), _mm512_shuffle_i32x4(h[2], h[3], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(ab, cd, 0x88), _mm512_shuffle_i32x4(ab, cd, 0xDD));
}

inline __mmask64 low_bytes(int64_t count) {  // the first `count` (< 64) bytes
  return (__mmask64(1) << count) - 1;
}

// 64 codes (int8) of step s of a weight row; `tail`: only the first tail_kept (the rest are 0).
template <int B>
inline __m512i load_codes(const void* row, int64_t s, bool tail, int64_t tail_kept) {
  if constexpr (B == 8) {
    const int8_t* p = static_cast<const int8_t*>(row) + kStepKept * s;
    return tail ? _mm512_maskz_loadu_epi8(low_bytes(tail_kept), p) : _mm512_loadu_si512(p);
  } else {
    // 32 bytes, two codes each (low nibble first): byte b -> 16-bit word b, its low nibble in the
    // word's low byte and its high nibble in the high byte, then each nibble sign-extended.
    const uint8_t* p = static_cast<const uint8_t*>(row) + kStepKept / 2 * s;
    const __m256i bytes = tail ? _mm256_maskz_loadu_epi8(__mmask32(low_bytes(tail_kept / 2)), p)
                               : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m512i words = _mm512_cvtepu8_epi16(bytes);
    const __m512i nibbles = _mm512_ternarylogic_epi32(_mm512_and_si512(words, _mm512_set1_epi16(0x000F)),
                                                      _mm512_slli_epi16(words, 4), _mm512_set1_epi16(0x0F00), 0xF8);
    const __m512i eight = _mm512_set1_epi8(8);
    return _mm512_sub_epi8(_mm512_xor_si512(nibbles, eight), eight);
  }
}

// The 64 byte indices (0..127) into the step's 128 columns of x of its 64 kept values.
inline __m512i kept_columns(const uint8_t* meta, int64_t s, bool tail, int64_t tail_kept) {
  const uint8_t* p = meta + kStepKept / 4 * s;
  const __m128i bits = tail ? _mm_maskz_loadu_epi8(__mmask16(low_bytes((tail_kept + 3) / 4)), p)
                            : _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  // qwords 0-3 hold metadata bits 0-63 (kept 0-31), qwords 4-7 bits 64-127 (kept 32-63)
  const __m512i words = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 0, 0, 0, 1, 1, 1, 1), _mm512_zextsi128_si512(bits));
  // byte b of qword q: the 2-bit field of kept 8q + b, at bit 2 * ((8q + b) mod 32) of its word
  const __m512i shifts = _mm512_set_epi64(0x3E3C3A3836343230, 0x2E2C2A2826242220, 0x1E1C1A1816141210,
                                          0x0E0C0A0806040200, 0x3E3C3A3836343230, 0x2E2C2A2826242220,
                                          0x1E1C1A1816141210, 0x0E0C0A0806040200);
  const __m512i fields = _mm512_multishift_epi64_epi8(shifts, words);
  // + 4 * (kept / 2): the group's first column
  const __m512i base = _mm512_set_epi64(0x7C7C787874747070, 0x6C6C686864646060, 0x5C5C585854545050,
                                        0x4C4C484844444040, 0x3C3C383834343030, 0x2C2C282824242020,
                                        0x1C1C181814141010, 0x0C0C080804040000);
  return _mm512_ternarylogic_epi32(fields, _mm512_set1_epi8(3), base, 0xEA);  // (a & b) | c
}

// One step for R weight rows and MX rows of x: acc += x . w (x as code + 128) per weight row and
// row of x, wsum += 128 * w per weight row, in int32 lanes. `half`: only the kept values whose bits
// are set (a scale group that ends at the step's middle: group_size an odd multiple of 64).
template <int B, int R, int MX>
inline void step(const W8A8Args& a, const void* const* values, const uint8_t* const* meta, const __m512i* ready,
                 const uint8_t* x, int64_t s, __mmask64 half, __m512i (&acc)[R][MX], __m512i (&wsum)[R]) {
  const bool tail = (s + 1) * kW8A8Step > a.k;
  const int64_t tail_kept = (a.k - s * kW8A8Step) / 2;
  const __m512i u128 = _mm512_set1_epi8(char(0x80));
  __m512i w[R], idx[R];
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    if (ready) {
      w[r] = _mm512_load_si512(ready + 2 * (s * R + r));
      idx[r] = _mm512_load_si512(ready + 2 * (s * R + r) + 1);
    } else {
      w[r] = load_codes<B>(values[r], s, tail, tail_kept);
      idx[r] = kept_columns(meta[r], s, tail, tail_kept);
      if (!tail) _mm_prefetch(static_cast<const char*>(values[r]) + (B == 8 ? 64 : 32) * s + 2048, _MM_HINT_T0);
    }
    w[r] = _mm512_maskz_mov_epi8(half, w[r]);
    wsum[r] = _mm512_dpbusd_epi32(wsum[r], u128, w[r]);
  }
  #pragma GCC unroll 4
  for (int i = 0; i < MX; ++i) {
    const __m512i lo = _mm512_loadu_si512(x + i * a.xq_stride + s * kW8A8Step);
    const __m512i hi = _mm512_loadu_si512(x + i * a.xq_stride + s * kW8A8Step + 64);
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r][i] = _mm512_dpbusd_epi32(acc[r][i], _mm512_permutex2var_epi8(lo, idx[r], hi), w[r]);
  }
}

// y[m0 : m0 + MX, row : row + R].
template <int B, int R, int MX>
void block(const W8A8Args& a, int64_t row, int64_t m0, const __m512i* ready) {
  const void* values[R];
  const uint8_t* meta[R];
  const int64_t row_bytes = B == 8 ? a.k / 2 : a.k / 4;
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    values[r] = static_cast<const char*>(a.values) + (row + r) * row_bytes;
    meta[r] = a.meta + (row + r) * a.meta_stride;
  }
  const uint8_t* x = a.xq + m0 * a.xq_stride;
  __m512i acc[R][MX], wsum[R];
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    wsum[r] = _mm512_setzero_si512();
    #pragma GCC unroll 4
    for (int i = 0; i < MX; ++i) acc[r][i] = _mm512_setzero_si512();
  }
  // y of output (row + r, m0 + i) in lane r * MX + i, and that lane's scale offset (row r's)
  __m512 y = _mm512_setzero_ps();
  alignas(64) int32_t offsets[16];
  for (int j = 0; j < 16; ++j) offsets[j] = int32_t((j < R * MX ? j / MX : 0) * a.scale_stride);
  const __m512i scale_offsets = _mm512_load_si512(offsets);
  const float* scales = a.scales + row * a.scale_stride;
  // A scale group ends: y += fp32(lane sum of acc - wsum) * its scale, each product and sum rounded
  // to fp32 as the reference's (lane by lane: the same IEEE operations); the sums restart.
  auto fold = [&]() {
    __m512i dots[R * MX];
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      #pragma GCC unroll 4
      for (int i = 0; i < MX; ++i) {
        dots[r * MX + i] = _mm512_sub_epi32(acc[r][i], wsum[r]);
        acc[r][i] = _mm512_setzero_si512();
      }
      wsum[r] = _mm512_setzero_si512();
    }
    const __m512 scale = _mm512_i32gather_ps(scale_offsets, scales, 4);
    y = _mm512_add_ps(y, _mm512_mul_ps(_mm512_cvtepi32_ps(lane_sums<R * MX>(dots)), scale));
    ++scales;
  };
  const int64_t steps = (a.k + kW8A8Step - 1) / kW8A8Step, g = a.group_size;
  const __mmask64 all = ~__mmask64(0), first_half = low_bytes(32);
  for (int64_t s = 0; s < steps; ++s) {
    if (g > 0 && (s * kW8A8Step + 64) % g == 0 && s * kW8A8Step + 64 < a.k) {
      // A group ends at the step's middle: the step runs twice, each time with half the weights.
      step<B, R, MX>(a, values, meta, ready, x, s, first_half, acc, wsum);
      fold();
      step<B, R, MX>(a, values, meta, ready, x, s, ~first_half, acc, wsum);
    } else {
      step<B, R, MX>(a, values, meta, ready, x, s, all, acc, wsum);
    }
    if (s + 1 == steps || (g > 0 && (s + 1) * kW8A8Step % g == 0)) fold();
  }
  alignas(64) float sums[16];
  _mm512_store_ps(sums, y);
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    #pragma GCC unroll 4
    for (int i = 0; i < MX; ++i) {
      float v = sums[r * MX + i] * a.x_scales[m0 + i];
      if (a.bias) v = v + a.bias[row + r];
      a.y[(m0 + i) * a.y_stride + row + r] = v;
    }
  }
}

// y[:, row : row + R]. With more than one tile of x, each step's codes and indices are made once
// into `scratch` (kept in L1/L2) and read by every tile: the vector-permute port, the bottleneck,
// then serves only the gathers.
template <int B, int R>
void rows_block(const W8A8Args& a, int64_t row, __m512i* scratch) {
  const __m512i* ready = nullptr;
  if (a.m_rows > kXRows) {
    const int64_t row_bytes = B == 8 ? a.k / 2 : a.k / 4, steps = (a.k + kW8A8Step - 1) / kW8A8Step;
    for (int64_t s = 0; s < steps; ++s) {
      const bool tail = (s + 1) * kW8A8Step > a.k;
      const int64_t tail_kept = (a.k - s * kW8A8Step) / 2;
      for (int r = 0; r < R; ++r) {
        _mm512_store_si512(scratch + 2 * (s * R + r),
                           load_codes<B>(static_cast<const char*>(a.values) + (row + r) * row_bytes, s, tail, tail_kept));
        _mm512_store_si512(scratch + 2 * (s * R + r) + 1,
                           kept_columns(a.meta + (row + r) * a.meta_stride, s, tail, tail_kept));
      }
    }
    ready = scratch;
  }
  int64_t m0 = 0;
  for (; m0 + kXRows <= a.m_rows; m0 += kXRows) block<B, R, kXRows>(a, row, m0, ready);
  switch (a.m_rows - m0) {
    case 3: return block<B, R, 3>(a, row, m0, ready);
    case 2: return block<B, R, 2>(a, row, m0, ready);
    case 1: return block<B, R, 1>(a, row, m0, ready);
    default: return;
  }
}

template <int B>
void run(const W8A8Args& a, int64_t begin, int64_t end, void* scratch) {
  __m512i* ready = static_cast<__m512i*>(scratch);
  int64_t row = begin;
  for (; row + kRows <= end; row += kRows) rows_block<B, kRows>(a, row, ready);
  for (; row < end; ++row) rows_block<B, 1>(a, row, ready);
}

}  // namespace

void quantize_rows_avx512(const float* x, int64_t x_stride, int64_t k, int64_t begin, int64_t end, uint8_t* xq,
                          int64_t xq_stride, float* x_scales) {
  for (int64_t row = begin; row < end; ++row) {
    const float* xr = x + row * x_stride;
    uint8_t* qr = xq + row * xq_stride;
    __m512 most = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t c = 0; c < k; c += 16) {
      const __mmask16 mask = k - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - c)) - 1u);
      const __m512 v = _mm512_maskz_loadu_ps(mask, xr + c);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      most = _mm512_max_ps(most, _mm512_abs_ps(v));
    }
    // scale = absmax / 127 in float64, rounded once to fp32; NaN propagates as torch's amax does
    const double absmax = nan ? __builtin_nan("") : double(_mm512_reduce_max_ps(most));
    float scale = float(absmax / 127.0);
    if (absmax > 0 && scale == 0.0f) scale = 0x1p-149f;  // the smallest fp32 step, as the reference
    x_scales[row] = scale;
    const double step = scale;
    const bool positive = step > 0;
    const __m512d safe = _mm512_set1_pd(positive ? step : 1.0), half = _mm512_set1_pd((positive ? step : 1.0) / 2);
    const __m512d qmax = _mm512_set1_pd(127.0), one = _mm512_set1_pd(1.0);
    // q = round(x / step), half to even, nudged so that |x - q * step| <= step / 2, clamped
    auto codes = [&](__m256 part) {
      const __m512d xd = _mm512_cvtps_pd(part);
      __m512d q = _mm512_roundscale_pd(_mm512_div_pd(xd, safe), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512d residual = _mm512_sub_pd(xd, _mm512_mul_pd(q, safe));
      q = _mm512_mask_add_pd(q, _mm512_cmp_pd_mask(residual, half, _CMP_GT_OQ), q, one);
      q = _mm512_mask_sub_pd(q, _mm512_cmp_pd_mask(residual, _mm512_sub_pd(_mm512_setzero_pd(), half), _CMP_LT_OQ),
                             q, one);
      q = _mm512_min_pd(_mm512_max_pd(q, _mm512_sub_pd(_mm512_setzero_pd(), qmax)), qmax);
      return _mm512_cvtpd_epi32(q);
    };
    int64_t c = 0;
    for (; c < k; c += 16) {
      const __mmask16 mask = k - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - c)) - 1u);
      __m512i q32 = _mm512_setzero_si512();
      if (positive) {
        const __m512 v = _mm512_maskz_loadu_ps(mask, xr + c);
        const __m256 lo = _mm512_castps512_ps256(v);
        const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
        q32 = _mm512_inserti64x4(_mm512_castsi256_si512(codes(lo)), codes(hi), 1);
      }
      const __m128i bytes = _mm512_cvtepi32_epi8(_mm512_add_epi32(q32, _mm512_set1_epi32(128)));
      _mm_mask_storeu_epi8(qr + c, mask, bytes);
    }
    for (int64_t pad = k; pad < xq_stride; ++pad) qr[pad] = 128;
  }
}

int64_t w8a8_avx512_scratch_bytes(int64_t k) {
  return (k + kW8A8Step - 1) / kW8A8Step * kRows * 2 * int64_t(sizeof(__m512i));
}

void gemm_2of4_w8a8_avx512(const W8A8Args& args, int64_t begin, int64_t end, void* scratch) {
  if (args.code_bits == 4) return run<4>(args, begin, end, scratch);
  return run<8>(args, begin, end, scratch);
}

}  // namespace cpu_gemm
}  // namespace nxm
