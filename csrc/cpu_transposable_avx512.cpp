// AVX-512 (F, DQ, BW, VL) + BMI2 kernel of the exact 2:4t selection; compiled with -mavx512f
// -mavx512dq -mavx512bw -mavx512vl -mf16c -mbmi2 and called only on CPUs that have them
// (cpu_transposable.cpp checks at run time). Specification: nxm_kernels/patterns/transposable.py; the scalar twin: cpu_transposable.cpp.
//
// Eight 4x4 blocks side by side, one per 64-bit lane. Each block's scores become integers exactly:
// scaled by a power of two so that the largest is below 2**48, then truncated; a block that lost a
// bit (or whose largest score is 2**48 or more) is left to the scalar path, which settles it exactly.
// Otherwise every sum is exact, and a tie code in the low 11 bits (as transposable.py: larger for
// lower mask numbers) makes the largest total name the mask: meet in the middle, the best choice for
// rows 0-1 of each column-count class plus the best of the complementary class for rows 2-3.
#include <immintrin.h>

#include "cpu_gemm.h"
#include "cpu_transposable_tables.h"

namespace nxm {
namespace cpu_transposable {
namespace {

constexpr int kScaleBits = 48;  // |scores| < 2**48: 8 of them, shifted by 11 bits, stay below 2**62

// 32 consecutive elements (8 blocks of one row) as two fp32 registers.
template <Elem T>
inline void load_floats(const void* base, int64_t i, __m512& lo, __m512& hi) {
  if constexpr (T == Elem::kFloat32) {
    const float* p = static_cast<const float*>(base) + i;
    lo = _mm512_loadu_ps(p);
    hi = _mm512_loadu_ps(p + 16);
  } else if constexpr (T == Elem::kInt8) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const int8_t*>(base) + i));
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
  } else {
    const __m512i h = _mm512_loadu_si512(static_cast<const uint16_t*>(base) + i);
    const __m256i h0 = _mm512_castsi512_si256(h), h1 = _mm512_extracti64x4_epi64(h, 1);
    if constexpr (T == Elem::kFloat16) {
      lo = _mm512_cvtph_ps(h0);
      hi = _mm512_cvtph_ps(h1);
    } else {  // bf16: the top half of an fp32
      lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h0), 16));
      hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h1), 16));
    }
  }
}

// Column c of 8 blocks of one row (elements i .. i + 31), lane l = block l, as float64 (exact).
template <Elem T, bool Abs>
inline void load_columns(const void* base, int64_t i, __m512d out[4]) {
  if constexpr (T == Elem::kFloat64) {
    const double* p = static_cast<const double*>(base) + i;
    const __m512i even = _mm512_setr_epi64(0, 4, 8, 12, 1, 5, 9, 13), odd = _mm512_setr_epi64(2, 6, 10, 14, 3, 7, 11, 15);
    const __m512d d0 = _mm512_loadu_pd(p), d1 = _mm512_loadu_pd(p + 8), d2 = _mm512_loadu_pd(p + 16),
                  d3 = _mm512_loadu_pd(p + 24);
    const __m512d a01 = _mm512_permutex2var_pd(d0, even, d1), a23 = _mm512_permutex2var_pd(d0, odd, d1);
    const __m512d b01 = _mm512_permutex2var_pd(d2, even, d3), b23 = _mm512_permutex2var_pd(d2, odd, d3);
    out[0] = _mm512_shuffle_f64x2(a01, b01, 0x44);
    out[1] = _mm512_shuffle_f64x2(a01, b01, 0xEE);
    out[2] = _mm512_shuffle_f64x2(a23, b23, 0x44);
    out[3] = _mm512_shuffle_f64x2(a23, b23, 0xEE);
  } else {
    __m512 lo, hi;
    load_floats<T>(base, i, lo, hi);
    const __m512i c01 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    const __m512i c23 = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
    const __m512 x01 = _mm512_permutex2var_ps(lo, c01, hi), x23 = _mm512_permutex2var_ps(lo, c23, hi);
    out[0] = _mm512_cvtps_pd(_mm512_castps512_ps256(x01));
    out[1] = _mm512_cvtps_pd(_mm512_extractf32x8_ps(x01, 1));
    out[2] = _mm512_cvtps_pd(_mm512_castps512_ps256(x23));
    out[3] = _mm512_cvtps_pd(_mm512_extractf32x8_ps(x23, 1));
  }
  if constexpr (Abs)
    for (int c = 0; c < 4; ++c) out[c] = _mm512_abs_pd(out[c]);
}

// Writes row `row` of 8 blocks (elements i .. i + 31 of that row) under the 32 kept bits `keep`.
template <Elem T>
inline void store_row(const Args& a, int64_t i, uint32_t keep) {
  if (!a.project) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<bool*>(a.out) + i),
                        _mm256_maskz_mov_epi8(keep, _mm256_set1_epi8(1)));
  } else if constexpr (T == Elem::kFloat64) {
    const double* p = static_cast<const double*>(a.w) + i;
    double* o = static_cast<double*>(a.out) + i;
    for (int part = 0; part < 4; ++part)
      _mm512_storeu_pd(o + 8 * part, _mm512_maskz_loadu_pd(__mmask8(keep >> (8 * part)), p + 8 * part));
  } else if constexpr (T == Elem::kFloat32) {
    const float* p = static_cast<const float*>(a.w) + i;
    float* o = static_cast<float*>(a.out) + i;
    _mm512_storeu_ps(o, _mm512_maskz_loadu_ps(__mmask16(keep), p));
    _mm512_storeu_ps(o + 16, _mm512_maskz_loadu_ps(__mmask16(keep >> 16), p + 16));
  } else if constexpr (T == Elem::kInt8) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<int8_t*>(a.out) + i),
                        _mm256_maskz_loadu_epi8(keep, static_cast<const int8_t*>(a.w) + i));
  } else {
    _mm512_storeu_si512(static_cast<uint16_t*>(a.out) + i, _mm512_maskz_loadu_epi16(keep, static_cast<const uint16_t*>(a.w) + i));
  }
}

// Eight blocks whose scores are s[4 * row + col] (lane = block): their kept bits, and the lanes
// that the integers cannot settle.
// Fp16: every |fp16| is a multiple of 2**-24 below 2**16, so one scale, 2**24, makes exact integers
// of every block.
template <bool Fp16>
inline __mmask8 best_masks(const __m512d s[16], bool signed_scores, uint16_t kept[8]) {
  __mmask8 lossy = 0;
  __m512d shift = _mm512_set1_pd(24.0);
  if constexpr (!Fp16) {
    __m512d top = signed_scores ? _mm512_abs_pd(s[0]) : s[0];
    for (int e = 1; e < 16; ++e) top = _mm512_max_pd(top, signed_scores ? _mm512_abs_pd(s[e]) : s[e]);
    // floor(log2(top)) (-inf for 0: clamped); lanes at 2**48 or more go to the scalar path.
    const __m512d exponent = _mm512_max_pd(_mm512_getexp_pd(top), _mm512_set1_pd(-1100.0));
    lossy = _mm512_cmp_pd_mask(exponent, _mm512_set1_pd(kScaleBits - 1), _CMP_GT_OQ);
    shift = _mm512_sub_pd(_mm512_set1_pd(kScaleBits - 1), exponent);
  }
  __m512i t[16];
  for (int e = 0; e < 16; ++e) {
    const __m512d scaled = _mm512_scalef_pd(s[e], shift);  // exact: a power of two, upwards
    const __m512i ints = _mm512_cvttpd_epi64(scaled);
    if constexpr (!Fp16) lossy |= _mm512_cmp_pd_mask(_mm512_cvtepi64_pd(ints), scaled, _CMP_NEQ_UQ);
    t[e] = _mm512_slli_epi64(ints, kCodeBits);
  }
  // Pair sums of each row, with the row's share of the tie code.
  __m512i pair[4][6];
  for (int row = 0; row < 4; ++row)
    for (int q = 0; q < 6; ++q)
      pair[row][q] = _mm512_add_epi64(_mm512_add_epi64(t[4 * row + kPairs[q][0]], t[4 * row + kPairs[q][1]]),
                                      _mm512_set1_epi64((5 - q) * kRowCode[row]));
  __m512i upper[kClasses], lower[kClasses];
  for (int q = 0; q < 6; ++q)
    for (int r = 0; r < 6; ++r) {
      const int i = 6 * q + r, u = kTables.upper[i], l = kTables.lower[i];
      const __m512i up = _mm512_add_epi64(pair[0][q], pair[1][r]), down = _mm512_add_epi64(pair[2][q], pair[3][r]);
      upper[u] = kTables.first_upper[i] ? up : _mm512_max_epi64(upper[u], up);
      lower[l] = kTables.first_lower[i] ? down : _mm512_max_epi64(lower[l], down);
    }
  __m512i best = _mm512_add_epi64(upper[0], lower[0]);
  for (int c = 1; c < kClasses; ++c) best = _mm512_max_epi64(best, _mm512_add_epi64(upper[c], lower[c]));
  alignas(64) int64_t codes[8];
  _mm512_store_si512(codes, _mm512_and_si512(best, _mm512_set1_epi64((1 << kCodeBits) - 1)));
  for (int l = 0; l < 8; ++l) kept[l] = kTables.mask[codes[l]];
  return lossy;
}

template <Elem T, Elem S>
int64_t run(const Args& a, int64_t block_row, int64_t* left) {
  const int64_t blocks = a.cols / 4, row0 = 4 * block_row * a.cols;
  constexpr bool own = S == Elem::kNone;  // |w| (else the scores)
  int64_t count = 0;
  int64_t b = 0;
  for (; b + 8 <= blocks; b += 8) {
    __m512d s[16];
    for (int row = 0; row < 4; ++row) {
      const int64_t i = row0 + row * a.cols + 4 * b;
      if constexpr (own) {
        load_columns<T, true>(a.w, i, s + 4 * row);
      } else {
        load_columns<S, false>(a.scores, i, s + 4 * row);
      }
    }
    uint16_t kept[8];
    const __mmask8 lossy = best_masks<own && T == Elem::kFloat16>(s, !own, kept);
    uint64_t lo, hi;  // blocks 0-3 and 4-7, 16 bits each
    __builtin_memcpy(&lo, kept, 8);
    __builtin_memcpy(&hi, kept + 4, 8);
    for (int row = 0; row < 4; ++row) {
      const uint64_t nibbles = 0x000F000F000F000Full << (4 * row);  // the row's 4 bits of each block
      store_row<T>(a, row0 + row * a.cols + 4 * b, uint32_t(_pext_u64(lo, nibbles) | _pext_u64(hi, nibbles) << 16));
    }
    if (lossy)
      for (int l = 0; l < 8; ++l)
        if (lossy >> l & 1) left[count++] = b + l;
  }
  for (; b < blocks; ++b) left[count++] = b;
  return count;
}

template <Elem T>
int64_t run_scores(const Args& a, int64_t block_row, int64_t* left) {
  switch (a.score_type) {
    case Elem::kFloat32: return run<T, Elem::kFloat32>(a, block_row, left);
    case Elem::kFloat64: return run<T, Elem::kFloat64>(a, block_row, left);
    default: return run<T, Elem::kNone>(a, block_row, left);
  }
}

}  // namespace

int64_t select_2of4t_avx512(const Args& a, int64_t block_row, int64_t* left) {
  switch (a.w_type) {
    case Elem::kFloat16: return run_scores<Elem::kFloat16>(a, block_row, left);
    case Elem::kBFloat16: return run_scores<Elem::kBFloat16>(a, block_row, left);
    case Elem::kFloat32: return run_scores<Elem::kFloat32>(a, block_row, left);
    case Elem::kFloat64: return run_scores<Elem::kFloat64>(a, block_row, left);
    case Elem::kInt8: return run_scores<Elem::kInt8>(a, block_row, left);
    default: break;
  }
  for (int64_t b = 0; b < a.cols / 4; ++b) left[b] = b;  // (no weight type: every block to the scalar path)
  return a.cols / 4;
}

}  // namespace cpu_transposable
}  // namespace nxm
