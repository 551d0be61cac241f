// AVX-512 (F, BW, VL) kernel of the block-layout GEMM for 4x4 blocks; compiled with -mavx512f
// -mavx512bw -mavx512vl -mfma -mf16c and called only on CPUs that have them (cpu_block_gemm.cpp
// checks at run time). Specification: reference.sparse_mm.
//
// A 4x4 block is 16 fp32 lanes, row-major. Its kept values (in row-major order) are loaded as they
// are stored and vexpandps puts them in the lanes its 16-bit bitmap names, zeros elsewhere: the
// bitmap is decoded by one instruction, at the weight's own memory speed. One FMA then multiplies
// the block with 4 columns of a row of x (broadcast to the 4 block rows) into 16 partial sums,
// per row of x in a tile of up to 8; each output row sums its 4 lanes at the end of the block row,
// into an fp32 y (cpu_block_gemm.cpp rounds it once to the output dtype).
#include <immintrin.h>

#include <algorithm>

#include "cpu_gemm.h"

namespace nxm {
namespace cpu_block_gemm {
namespace {

using cpu_gemm::Dtype;

constexpr int kTile = 8;  // rows of x per pass over a block row

// The bitmap of block (block_row, block_col); 0 (nothing kept) for a mask number outside the
// library (only in unchecked corrupt metadata).
inline __mmask16 bitmap_of(const Args& g, int64_t at) {
  const uint8_t* bits;
  if (g.masks == nullptr) {
    bits = g.bitmaps + at * 2;
  } else {
    const int64_t number = g.numbers_int16 ? int64_t(static_cast<const int16_t*>(g.numbers)[at])
                                           : int64_t(static_cast<const uint8_t*>(g.numbers)[at]);
    if (number < 0 || number >= g.mask_count) return 0;
    bits = g.masks + number * 2;
  }
  return __mmask16(bits[0] | bits[1] << 8);
}

// The first `kept` lanes: a block's stored values as fp32.
template <Dtype T>
inline __m512 load_kept(const void* values, int64_t at, __mmask16 lanes) {
  if constexpr (T == Dtype::kFloat32) {
    return _mm512_maskz_loadu_ps(lanes, static_cast<const float*>(values) + at);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(lanes, static_cast<const uint16_t*>(values) + at);
    if constexpr (T == Dtype::kFloat16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // bf16: top half of fp32
  }
}

// Rows i0 .. i0 + R - 1 of x times block row `block_row`.
template <Dtype T, int R>
void tile(const Args& g, int64_t block_row, int64_t i0) {
  const int64_t grid_cols = g.k / 4;
  const __mmask16 lanes = __mmask16((1u << g.kept) - 1);
  const int64_t first = block_row * grid_cols;  // the block row's first block
  const float* x[R];
  for (int i = 0; i < R; ++i) x[i] = g.x + (i0 + i) * g.k;
  // U blocks per step, each into its own sums: at least 4 independent FMA chains (their latency).
  constexpr int U = R >= 4 ? 1 : 4 / R;
  __m512 acc[U][R];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < R; ++i) acc[u][i] = _mm512_setzero_ps();
  auto step = [&](int u, int64_t b) {
    const __m512 w = _mm512_maskz_expand_ps(bitmap_of(g, first + b), load_kept<T>(g.values, (first + b) * g.kept, lanes));
    for (int i = 0; i < R; ++i)
      acc[u][i] = _mm512_fmadd_ps(w, _mm512_broadcast_f32x4(_mm_loadu_ps(x[i] + 4 * b)), acc[u][i]);
  };
  int64_t b = 0;
  for (; b + U <= grid_cols; b += U)
    for (int u = 0; u < U; ++u) step(u, b + u);
  for (; b < grid_cols; ++b) step(0, b);
  for (int i = 0; i < R; ++i) {
    for (int u = 1; u < U; ++u) acc[0][i] = _mm512_add_ps(acc[0][i], acc[u][i]);
    alignas(64) float lane[16];
    _mm512_store_ps(lane, acc[0][i]);
    for (int r = 0; r < 4; ++r) {
      const int64_t out = 4 * block_row + r;
      const float* l = lane + 4 * r;
      static_cast<float*>(g.y)[(i0 + i) * g.n + out] = ((l[0] + l[1]) + (l[2] + l[3])) + (g.bias ? g.bias[out] : 0.0f);
    }
  }
}

// Block rows per group: a group's weight (8 x 4 rows, about 0.3 MB at k = 4096 in fp32) stays in L2
// while every tile of x passes over it, instead of all of x passing over each block row.
constexpr int64_t kGroup = 8;

template <Dtype T>
void block_rows(const Args& g, int64_t begin, int64_t end) {
  for (int64_t group = begin; group < end; group += kGroup) {
    const int64_t group_end = std::min(group + kGroup, end);
    int64_t i = 0;
    for (; i + kTile <= g.m_rows; i += kTile)
      for (int64_t block_row = group; block_row < group_end; ++block_row) tile<T, kTile>(g, block_row, i);
    for (int64_t block_row = group; block_row < group_end; ++block_row) {
      int64_t j = i;
      if (g.m_rows - j >= 4) tile<T, 4>(g, block_row, j), j += 4;
      if (g.m_rows - j >= 2) tile<T, 2>(g, block_row, j), j += 2;
      if (g.m_rows - j >= 1) tile<T, 1>(g, block_row, j);
    }
  }
}

}  // namespace

void gemm_4x4_avx512(const Args& g, int64_t begin, int64_t end) {
  switch (g.dtype) {
    case Dtype::kFloat32: return block_rows<Dtype::kFloat32>(g, begin, end);
    case Dtype::kBFloat16: return block_rows<Dtype::kBFloat16>(g, begin, end);
    case Dtype::kFloat16: return block_rows<Dtype::kFloat16>(g, begin, end);
  }
}

}  // namespace cpu_block_gemm
}  // namespace nxm
