// AVX-512 (F, BW, VL) kernel of the 2:4 CPU sparse GEMM; compiled with -mavx512f -mavx512bw
// -mavx512vl -mfma -mf16c and called only on CPUs that have them (cpu_gemm.cpp checks at run time).
//
// One step reads 16 kept values of a weight row (8 groups, 32 columns of x) and their 32 bits of
// packed metadata. The 16 kept column indices, 4 * group + 2-bit index, select the matching
// entries of x's 32 columns (two registers) in one vpermt2ps, and one FMA accumulates: each weight
// byte is read once, and x stays in L1/L2. Four weight rows share each load of x, and up to four x
// rows share each weight step, so the weight streams from memory once per call.
//
// Quantized weights (B = 8 or 4 code bits): the codes become fp32 in the same lanes, the FMA sums
// code * x, and the scale is applied once per group (every group_size / 32 steps) or per row.
#include <immintrin.h>

#include "cpu_gemm.h"

namespace nxm {
namespace cpu_gemm {
namespace {

constexpr int kRows = 4;  // weight rows per block
constexpr int kXRows = 4;  // rows of x per tile

// Bytes of `count` stored values: of dtype T, or B-bit codes.
template <Dtype T, int B>
constexpr int64_t value_bytes(int64_t count) {
  return B == 8 ? count : B == 4 ? count / 2 : count * (T == Dtype::kFloat32 ? 4 : 2);
}

// 16 values of a weight row from element i, as fp32 (masked: zeros outside `mask`).
template <Dtype T, int B>
inline __m512 load_values(const void* row, int64_t i, __mmask16 mask, bool masked) {
  if constexpr (B == 8) {
    const int8_t* p = static_cast<const int8_t*>(row) + i;
    const __m128i codes = masked ? _mm_maskz_loadu_epi8(mask, p) : _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
  } else if constexpr (B == 4) {
    // 8 bytes, nibble j of lane j's 32-bit word moved to the top, then shifted back with its sign.
    const uint8_t* p = static_cast<const uint8_t*>(row) + i / 2;
    uint32_t lo = 0, hi = 0;
    if (masked) {
      uint8_t part[8] = {};
      for (int b = 0; b < 8; ++b) if (mask >> (2 * b) & 1) part[b] = p[b];
      __builtin_memcpy(&lo, part, 4);
      __builtin_memcpy(&hi, part + 4, 4);
    } else {
      __builtin_memcpy(&lo, p, 4);
      __builtin_memcpy(&hi, p + 4, 4);
    }
    const __m512i words = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(int(lo))), _mm256_set1_epi32(int(hi)), 1);
    const __m512i up = _mm512_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
    return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_sllv_epi32(words, up), 28));
  } else if constexpr (T == Dtype::kFloat32) {
    const float* p = static_cast<const float*>(row) + i;
    return masked ? _mm512_maskz_loadu_ps(mask, p) : _mm512_loadu_ps(p);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(row) + i;
    const __m256i bits = masked ? _mm256_maskz_loadu_epi16(mask, p) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (T == Dtype::kBFloat16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));  // bf16 = top half of fp32
    } else {
      return _mm512_cvtph_ps(bits);
    }
  }
}

// The 16 kept columns (0..31) of one step from its 32 metadata bits: 4 * (j / 2) + index j.
inline __m512i kept_columns(uint32_t meta) {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i group_base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i fields = _mm512_srlv_epi32(_mm512_set1_epi32(int(meta)), shifts);
  return _mm512_ternarylogic_epi32(fields, _mm512_set1_epi32(3), group_base, 0xEA);  // (a & b) | c
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}

inline uint16_t to_bf16_bits(float f) {  // round to nearest even, as torch's float -> bfloat16
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <Dtype T>
inline void store(void* y, int64_t i, float v) {
  if constexpr (T == Dtype::kFloat32) {
    static_cast<float*>(y)[i] = v;
  } else if constexpr (T == Dtype::kBFloat16) {
    static_cast<uint16_t*>(y)[i] = to_bf16_bits(v);
  } else {
    static_cast<uint16_t*>(y)[i] = uint16_t(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT));
  }
}

// One step (32 columns of x from column 32 * step) for R weight rows and MX rows of x.
template <Dtype T, int B, int R, int MX>
inline void step(const Args& a, const void* const* values, const uint8_t* const* meta, const float* x, int64_t s,
                 __m512 (&acc)[R][MX], bool tail, int tail_groups) {
  const __mmask16 value_mask = tail ? __mmask16((1u << (2 * tail_groups)) - 1u) : __mmask16(0xffff);
  const int tail_cols = 4 * tail_groups;
  const __mmask16 x_lo = tail ? __mmask16((1u << (tail_cols < 16 ? tail_cols : 16)) - 1u) : __mmask16(0xffff);
  const __mmask16 x_hi = tail ? __mmask16(tail_cols > 16 ? (1u << (tail_cols - 16)) - 1u : 0u) : __mmask16(0xffff);
  __m512 w[R];
  __m512i cols[R];
  for (int r = 0; r < R; ++r) {
    w[r] = load_values<T, B>(values[r], 16 * s, value_mask, tail);
    uint32_t bits = 0;
    if (tail) {
      for (int b = 0; b < (tail_groups + 1) / 2; ++b) bits |= uint32_t(meta[r][4 * s + b]) << (8 * b);
    } else {
      bits = load_u32(meta[r] + 4 * s);
      _mm_prefetch(static_cast<const char*>(values[r]) + value_bytes<T, B>(16 * s) + 2048, _MM_HINT_T0);
    }
    cols[r] = kept_columns(bits);  // in the tail, columns past k read x's zeros
  }
  for (int i = 0; i < MX; ++i) {
    const float* xp = x + i * a.x_stride + 32 * s;
    const __m512 lo = tail ? _mm512_maskz_loadu_ps(x_lo, xp) : _mm512_loadu_ps(xp);
    const __m512 hi = tail ? _mm512_maskz_loadu_ps(x_hi, xp + 16) : _mm512_loadu_ps(xp + 16);
    for (int r = 0; r < R; ++r) acc[r][i] = _mm512_fmadd_ps(w[r], _mm512_permutex2var_ps(lo, cols[r], hi), acc[r][i]);
  }
}

// Grouped scales: total += acc * scale of `group`, acc = 0.
template <int R, int MX>
inline void fold(const Args& a, int64_t row, int64_t group, __m512 (&acc)[R][MX], __m512 (&total)[R][MX]) {
  for (int r = 0; r < R; ++r) {
    const __m512 scale = _mm512_set1_ps(a.scales[(row + r) * a.scale_stride + group]);
    for (int i = 0; i < MX; ++i) {
      total[r][i] = _mm512_fmadd_ps(acc[r][i], scale, total[r][i]);
      acc[r][i] = _mm512_setzero_ps();
    }
  }
}

// y[m0 : m0 + MX, row : row + R].
template <Dtype T, int B, int R, int MX>
void block(const Args& a, int64_t row, int64_t m0) {
  const void* values[R];
  const uint8_t* meta[R];
  for (int r = 0; r < R; ++r) {
    values[r] = static_cast<const char*>(a.values) + value_bytes<T, B>((row + r) * (a.k / 2));
    meta[r] = a.meta + (row + r) * a.meta_stride;
  }
  const float* x = a.x + m0 * a.x_stride;
  __m512 acc[R][MX], total[R][MX];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MX; ++i) acc[r][i] = total[r][i] = _mm512_setzero_ps();
  const int64_t steps = a.k / 32;
  const bool grouped = B != 0 && a.group_size > 0;
  const int64_t group_steps = grouped ? a.group_size / 32 : 0;
  for (int64_t s = 0; s < steps; ++s) {
    step<T, B, R, MX>(a, values, meta, x, s, acc, false, 0);
    if (grouped && (s + 1) % group_steps == 0) fold<R, MX>(a, row, s / group_steps, acc, total);
  }
  if (a.k % 32) step<T, B, R, MX>(a, values, meta, x, steps, acc, true, int(a.k % 32) / 4);
  if (grouped && (steps % group_steps || a.k % 32)) fold<R, MX>(a, row, steps / group_steps, acc, total);
  for (int r = 0; r < R; ++r) {
    const float b = a.bias ? a.bias[row + r] : 0.0f;
    const float scale = B != 0 && !grouped ? a.scales[(row + r) * a.scale_stride] : 1.0f;
    for (int i = 0; i < MX; ++i) {
      const float sum = _mm512_reduce_add_ps(grouped ? total[r][i] : acc[r][i]);
      store<T>(a.y, (m0 + i) * a.y_stride + row + r, (B != 0 && !grouped ? sum * scale : sum) + b);
    }
  }
}

template <Dtype T, int B, int R>
void rows_block(const Args& a, int64_t row) {
  int64_t m0 = 0;
  for (; m0 + kXRows <= a.m_rows; m0 += kXRows) block<T, B, R, kXRows>(a, row, m0);
  switch (a.m_rows - m0) {
    case 3: return block<T, B, R, 3>(a, row, m0);
    case 2: return block<T, B, R, 2>(a, row, m0);
    case 1: return block<T, B, R, 1>(a, row, m0);
    default: return;
  }
}

template <Dtype T, int B>
void run(const Args& a, int64_t begin, int64_t end) {
  int64_t row = begin;
  for (; row + kRows <= end; row += kRows) rows_block<T, B, kRows>(a, row);
  for (; row < end; ++row) rows_block<T, B, 1>(a, row);
}

template <int B>
void run_dtype(const Args& args, int64_t begin, int64_t end) {
  switch (args.dtype) {
    case Dtype::kFloat32: return run<Dtype::kFloat32, B>(args, begin, end);
    case Dtype::kBFloat16: return run<Dtype::kBFloat16, B>(args, begin, end);
    case Dtype::kFloat16: return run<Dtype::kFloat16, B>(args, begin, end);
  }
}

}  // namespace

void gemm_2of4_avx512(const Args& args, int64_t begin, int64_t end) {
  switch (args.code_bits) {
    case 8: return run_dtype<8>(args, begin, end);
    case 4: return run_dtype<4>(args, begin, end);
    default: return run_dtype<0>(args, begin, end);
  }
}

}  // namespace cpu_gemm
}  // namespace nxm
