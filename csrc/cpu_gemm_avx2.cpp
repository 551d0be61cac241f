// AVX2 kernel of the 2:4 CPU sparse GEMM; compiled with -mavx2 -mfma -mf16c and called only on CPUs
// that have them (cpu_gemm.cpp checks at run time). The scheme of cpu_gemm_avx512.cpp at half the
// width: one step reads 8 kept values (4 groups, 16 columns of x) and 16 metadata bits; vpermps
// selects within 8 lanes only, so each half of x's 16 columns is permuted and the halves blended.
#include <immintrin.h>

#include "cpu_gemm.h"

namespace nxm {
namespace cpu_gemm {
namespace {

constexpr int kRows = 4;   // weight rows per block
constexpr int kXRows = 2;  // rows of x per tile (16 ymm registers)

template <Dtype T>
constexpr int64_t value_bytes() { return T == Dtype::kFloat32 ? 4 : 2; }

// 8 values of a weight row from element i as fp32; `count` < 8 reads only that many (the tail).
template <Dtype T>
inline __m256 load_values(const void* row, int64_t i, int count) {
  if constexpr (T == Dtype::kFloat32) {
    const float* p = static_cast<const float*>(row) + i;
    if (count == 8) return _mm256_loadu_ps(p);
    float part[8] = {};
    for (int j = 0; j < count; ++j) part[j] = p[j];
    return _mm256_loadu_ps(part);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(row) + i;
    __m128i bits;
    if (count == 8) {
      bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {
      uint16_t part[8] = {};
      for (int j = 0; j < count; ++j) part[j] = p[j];
      bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(part));
    }
    if constexpr (T == Dtype::kBFloat16) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
    } else {
      return _mm256_cvtph_ps(bits);
    }
  }
}

// 8 floats of x from p; `count` < 8 reads that many and zero-fills.
inline __m256 load_x(const float* p, int count) {
  if (count >= 8) return _mm256_loadu_ps(p);
  float part[8] = {};
  for (int j = 0; j < count; ++j) part[j] = p[j];
  return _mm256_loadu_ps(part);
}

// Lane j's column within its half of the step's 16 columns: 4 * ((j / 2) % 2) + index j.
inline __m256i kept_columns(uint32_t meta) {
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i group_base = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
  const __m256i fields = _mm256_srlv_epi32(_mm256_set1_epi32(int(meta)), shifts);
  return _mm256_or_si256(_mm256_and_si256(fields, _mm256_set1_epi32(3)), group_base);
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

inline float reduce_add(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// One step (16 columns of x from column 16 * s) for R weight rows and MX rows of x; `groups` < 4
// in the tail.
template <Dtype T, int R, int MX>
inline void step(const Args& a, const void* const* values, const uint8_t* const* meta, const float* x, int64_t s,
                 __m256 (&acc)[R][MX], int groups) {
  __m256 w[R];
  __m256i cols[R];
  for (int r = 0; r < R; ++r) {
    w[r] = load_values<T>(values[r], 8 * s, 2 * groups);
    const uint8_t* m = meta[r] + 2 * s;
    const uint32_t bits = groups > 2 ? uint32_t(m[0]) | uint32_t(m[1]) << 8 : m[0];
    cols[r] = kept_columns(bits);  // in the tail, columns past k read x's zeros
  }
  const int x_cols = 4 * groups;
  for (int i = 0; i < MX; ++i) {
    const float* xp = x + i * a.x_stride + 16 * s;
    const __m256 lo = load_x(xp, x_cols), hi = load_x(xp + 8, x_cols - 8);
    for (int r = 0; r < R; ++r) {
      const __m256 picked = _mm256_blend_ps(_mm256_permutevar8x32_ps(lo, cols[r]),
                                            _mm256_permutevar8x32_ps(hi, cols[r]), 0xf0);
      acc[r][i] = _mm256_fmadd_ps(w[r], picked, acc[r][i]);
    }
  }
}

template <Dtype T, int R, int MX>
void block(const Args& a, int64_t row, int64_t m0) {
  const void* values[R];
  const uint8_t* meta[R];
  for (int r = 0; r < R; ++r) {
    values[r] = static_cast<const char*>(a.values) + (row + r) * (a.k / 2) * value_bytes<T>();
    meta[r] = a.meta + (row + r) * a.meta_stride;
  }
  const float* x = a.x + m0 * a.x_stride;
  __m256 acc[R][MX];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MX; ++i) acc[r][i] = _mm256_setzero_ps();
  const int64_t steps = a.k / 16;
  for (int64_t s = 0; s < steps; ++s) step<T, R, MX>(a, values, meta, x, s, acc, 4);
  if (a.k % 16) step<T, R, MX>(a, values, meta, x, steps, acc, int(a.k % 16) / 4);
  for (int r = 0; r < R; ++r) {
    const float b = a.bias ? a.bias[row + r] : 0.0f;
    for (int i = 0; i < MX; ++i) store<T>(a.y, (m0 + i) * a.y_stride + row + r, reduce_add(acc[r][i]) + b);
  }
}

template <Dtype T, int R>
void rows_block(const Args& a, int64_t row) {
  int64_t m0 = 0;
  for (; m0 + kXRows <= a.m_rows; m0 += kXRows) block<T, R, kXRows>(a, row, m0);
  if (m0 < a.m_rows) block<T, R, 1>(a, row, m0);
}

template <Dtype T>
void run(const Args& a, int64_t begin, int64_t end) {
  int64_t row = begin;
  for (; row + kRows <= end; row += kRows) rows_block<T, kRows>(a, row);
  for (; row < end; ++row) rows_block<T, 1>(a, row);
}

}  // namespace

void gemm_2of4_avx2(const Args& args, int64_t begin, int64_t end) {
  switch (args.dtype) {
    case Dtype::kFloat32: return run<Dtype::kFloat32>(args, begin, end);
    case Dtype::kBFloat16: return run<Dtype::kBFloat16>(args, begin, end);
    case Dtype::kFloat16: return run<Dtype::kFloat16>(args, begin, end);
  }
}

}  // namespace cpu_gemm
}  // namespace nxm
