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
constexpr int64_t kPrefetchBytes = 2048;

// Bitmaps of a block row's blocks, read from the metadata as it is: stored bitmaps, or mask numbers
// (uint8 or int16) into the library's table; 0 (nothing kept) for a number outside the library
// (only in unchecked corrupt metadata).
struct StoredBitmaps {
  const uint16_t* bits;  // of the block row's first block (2 bytes each, little-endian)
  __mmask16 operator()(int64_t b) const {
    uint16_t v;
    __builtin_memcpy(&v, bits + b, 2);
    return v;
  }
};

template <typename Number>
struct LibraryBitmaps {
  const Number* numbers;  // of the block row's first block
  const uint8_t* masks;
  int64_t count;
  __mmask16 operator()(int64_t b) const {
    const int64_t n = int64_t(numbers[b]);
    if (n < 0 || n >= count) return 0;
    return __mmask16(masks[2 * n] | masks[2 * n + 1] << 8);
  }
};

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
template <Dtype T, int R, typename Bitmaps>
void tile(const Args& g, const Bitmaps& bitmap, int64_t block_row, int64_t i0) {
  const int64_t grid_cols = g.k / 4, kept = g.kept;
  const __mmask16 lanes = __mmask16((1u << kept) - 1);
  const char* values = static_cast<const char*>(g.values) + block_row * grid_cols * kept * (T == Dtype::kFloat32 ? 4 : 2);
  const float* x[R];
  for (int i = 0; i < R; ++i) x[i] = g.x + (i0 + i) * g.k;
  // U blocks per step, each into its own sums: at least 4 independent FMA chains (their latency).
  constexpr int U = R >= 4 ? 1 : 4 / R;
  __m512 acc[U][R];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < R; ++i) acc[u][i] = _mm512_setzero_ps();
  auto step = [&](int u, int64_t b) {
    const __m512 w = _mm512_maskz_expand_ps(bitmap(b), load_kept<T>(values, b * kept, lanes));
    for (int i = 0; i < R; ++i)
      acc[u][i] = _mm512_fmadd_ps(w, _mm512_broadcast_f32x4(_mm_loadu_ps(x[i] + 4 * b)), acc[u][i]);
  };
  constexpr int64_t kSize = T == Dtype::kFloat32 ? 4 : 2;
  int64_t b = 0;
  for (; b + U <= grid_cols; b += U) {
    // The weight streams from memory once per call: ask for it ahead of the hardware prefetcher.
    for (int64_t at = b * kept * kSize; at < (b + U) * kept * kSize; at += 64)
      _mm_prefetch(values + at + kPrefetchBytes, _MM_HINT_T0);
    for (int u = 0; u < U; ++u) step(u, b + u);
  }
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

template <Dtype T, typename Bitmaps>
void block_row_tiles(const Args& g, const Bitmaps& bitmap, int64_t block_row, int64_t i, int64_t end) {
  if (end - i == kTile) return tile<T, kTile>(g, bitmap, block_row, i);
  if (end - i >= 4) tile<T, 4>(g, bitmap, block_row, i), i += 4;
  if (end - i >= 2) tile<T, 2>(g, bitmap, block_row, i), i += 2;
  if (end - i >= 1) tile<T, 1>(g, bitmap, block_row, i);
}

template <Dtype T>
void block_rows(const Args& g, int64_t begin, int64_t end) {
  const int64_t grid_cols = g.k / 4;
  auto run = [&](int64_t block_row, int64_t i, int64_t i_end) {
    const int64_t first = block_row * grid_cols;  // the block row's first block
    if (g.masks == nullptr) {
      block_row_tiles<T>(g, StoredBitmaps{reinterpret_cast<const uint16_t*>(g.bitmaps) + first}, block_row, i, i_end);
    } else if (g.numbers_int16) {
      block_row_tiles<T>(g, LibraryBitmaps<int16_t>{static_cast<const int16_t*>(g.numbers) + first, g.masks,
                                                     g.mask_count}, block_row, i, i_end);
    } else {
      block_row_tiles<T>(g, LibraryBitmaps<uint8_t>{static_cast<const uint8_t*>(g.numbers) + first, g.masks,
                                                     g.mask_count}, block_row, i, i_end);
    }
  };
  for (int64_t group = begin; group < end; group += kGroup) {
    const int64_t group_end = std::min(group + kGroup, end);
    for (int64_t i = 0; i < g.m_rows; i += kTile)
      for (int64_t block_row = group; block_row < group_end; ++block_row)
        run(block_row, i, std::min(i + kTile, g.m_rows));
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
