// AVX-512 BF16 kernel of the bf16 2:4 CPU sparse GEMM (AVX-512 F/BW/VL, VBMI, BF16), below the M
// where the AMX kernel takes over (or at any M without AMX);
// compiled with those -m flags and called only on CPUs that have them (cpu_gemm.cpp checks).
//
// One step reads 32 kept values of a weight row (16 groups, 64 columns of x) and their 64 bits of
// packed metadata. vdpbf16ps multiplies pairs of bf16, and a group's two kept values are such a
// pair: so one vpermt2b gathers, from x's 64 bf16 columns (two registers, unconverted), the two
// entries each pair meets, and one vdpbf16ps accumulates 32 products in fp32. That is twice the
// products per permute of the fp32 AVX-512 kernel, with no conversion of weight or x. The byte
// indices come from the metadata in three instructions (vpmultishiftqb picks each value's 2-bit
// index) and serve every row of x. Products are exact in fp32 and summed in fp32; vdpbf16ps reads
// bf16 denormals as zero, a difference from the reference only below 1e-38.
#include <immintrin.h>

#include <cstring>

#include "cpu_gemm.h"

namespace nxm {
namespace cpu_gemm {
namespace {

constexpr int kStep = 64;  // columns of x per step (32 kept values)

inline uint16_t to_bf16_bits(float f) {  // round to nearest even, as torch's float -> bfloat16
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Byte b of the result: the byte of x's 64 columns (128 bytes) that byte b of the 32 kept values
// multiplies: 2 * (4 * group + index) + (b & 1), with group b / 4 and index that of kept value b / 2
// (bits b & ~1 of the step's metadata).
inline __m512i gather_bytes(uint64_t meta) {
  const __m512i offsets = _mm512_set_epi8(62, 62, 60, 60, 58, 58, 56, 56, 54, 54, 52, 52, 50, 50, 48, 48, 46, 46, 44, 44,
                                          42, 42, 40, 40, 38, 38, 36, 36, 34, 34, 32, 32, 30, 30, 28, 28, 26, 26, 24,
                                          24, 22, 22, 20, 20, 18, 18, 16, 16, 14, 14, 12, 12, 10, 10, 8, 8, 6, 6, 4, 4,
                                          2, 2, 0, 0);
  const __m512i base = _mm512_set_epi8(121, 120, 121, 120, 113, 112, 113, 112, 105, 104, 105, 104, 97, 96, 97, 96, 89,
                                       88, 89, 88, 81, 80, 81, 80, 73, 72, 73, 72, 65, 64, 65, 64, 57, 56, 57, 56, 49,
                                       48, 49, 48, 41, 40, 41, 40, 33, 32, 33, 32, 25, 24, 25, 24, 17, 16, 17, 16, 9,
                                       8, 9, 8, 1, 0, 1, 0);
  const __m512i index = _mm512_and_si512(_mm512_multishift_epi64_epi8(offsets, _mm512_set1_epi64(int64_t(meta))),
                                         _mm512_set1_epi8(3));
  return _mm512_add_epi8(_mm512_add_epi8(index, index), base);
}

// y[m0 : m0 + MX, row : row + R].
template <int R, int MX>
void block(const Args& a, const uint16_t* x, int64_t x_stride, int64_t row, int64_t m0) {
  const int64_t kept = a.k / 2, full_steps = a.k / kStep;
  const int tail_cols = int(a.k % kStep);
  const uint16_t* values[R];
  const uint8_t* meta[R];
  for (int r = 0; r < R; ++r) {
    values[r] = static_cast<const uint16_t*>(a.values) + (row + r) * kept;
    meta[r] = a.meta + (row + r) * a.meta_stride;
  }
  x += m0 * x_stride;
  __m512 acc[R][MX];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MX; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t s = 0; s <= full_steps; ++s) {
    const bool tail = s == full_steps;
    if (tail && tail_cols == 0) break;
    __m512i w[R], gather[R];
    for (int r = 0; r < R; ++r) {
      uint64_t bits = 0;
      if (tail) {  // 2 values and 4 bits per remaining group; columns past k read x's zeros below
        w[r] = _mm512_maskz_loadu_epi16(__mmask32((1ull << (tail_cols / 2)) - 1), values[r] + 32 * s);
        std::memcpy(&bits, meta[r] + 8 * s, (tail_cols / 4 + 1) / 2);
      } else {
        w[r] = _mm512_loadu_si512(values[r] + 32 * s);
        std::memcpy(&bits, meta[r] + 8 * s, 8);
        _mm_prefetch(reinterpret_cast<const char*>(values[r] + 32 * s) + 1024, _MM_HINT_T0);
      }
      gather[r] = gather_bytes(bits);
    }
    for (int i = 0; i < MX; ++i) {
      const uint16_t* xp = x + i * x_stride + kStep * s;
      __m512i lo, hi;
      if (tail) {
        lo = _mm512_maskz_loadu_epi16(__mmask32((1ull << (tail_cols < 32 ? tail_cols : 32)) - 1), xp);
        hi = _mm512_maskz_loadu_epi16(__mmask32(tail_cols > 32 ? (1ull << (tail_cols - 32)) - 1 : 0), xp + 32);
      } else {
        lo = _mm512_loadu_si512(xp);
        hi = _mm512_loadu_si512(xp + 32);
      }
      for (int r = 0; r < R; ++r)
        acc[r][i] = _mm512_dpbf16_ps(acc[r][i], (__m512bh)w[r], (__m512bh)_mm512_permutex2var_epi8(lo, gather[r], hi));
    }
  }
  uint16_t* y = static_cast<uint16_t*>(a.y);
  for (int r = 0; r < R; ++r) {
    const float b = a.bias ? a.bias[row + r] : 0.0f;
    for (int i = 0; i < MX; ++i) y[(m0 + i) * a.y_stride + row + r] = to_bf16_bits(_mm512_reduce_add_ps(acc[r][i]) + b);
  }
}

// Rows [begin, end) for the MX rows of x from m0: four weight rows per block, then one at a time.
template <int MX>
void rows(const Args& a, const uint16_t* x, int64_t x_stride, int64_t m0, int64_t begin, int64_t end) {
  constexpr int R = 4;
  int64_t row = begin;
  for (; row + R <= end; row += R) block<R, MX>(a, x, x_stride, row, m0);
  for (; row < end; ++row) block<1, MX>(a, x, x_stride, row, m0);
}

}  // namespace

void gemm_2of4_bf16_avx512(const Args& a, const uint16_t* x, int64_t x_stride, int64_t begin, int64_t end) {
  // Tiles of up to 4 rows of x (16 accumulators, 4 weight rows and their gather indices in registers).
  for (int64_t m0 = 0; m0 < a.m_rows; m0 += 4) {
    switch (a.m_rows - m0 < 4 ? a.m_rows - m0 : 4) {
      case 1: rows<1>(a, x, x_stride, m0, begin, end); break;
      case 2: rows<2>(a, x, x_stride, m0, begin, end); break;
      case 3: rows<3>(a, x, x_stride, m0, begin, end); break;
      default: rows<4>(a, x, x_stride, m0, begin, end); break;
    }
  }
}

}  // namespace cpu_gemm
}  // namespace nxm
