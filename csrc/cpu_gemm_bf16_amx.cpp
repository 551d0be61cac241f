// AMX kernel of the bf16 2:4 CPU sparse GEMM at M > 4 (AMX-TILE, AMX-BF16, AVX-512 F/BW/VBMI2);
// compiled with those -m flags and called only where cpu_gemm.cpp found them and Linux granted the
// tile state. From there the AVX-512 kernel is bound by its permutes (one per 16 kept values per
// row of x), while dense bf16 runs on AMX: so this kernel runs on AMX too.
//
// y^T = W x^T in tiles: A = 16 weight rows x 32 columns of the dense weight, B = x in VNNI pairs
// (16 column pairs x 16 tokens), C = 16 weight rows x 16 tokens in fp32. A 32-row weight block is
// expanded to dense bf16 16 steps (512 columns) at a time (vpexpandw: its 2:4 metadata is the expand
// mask) into 32 KiB that stay in L1, and multiplied there by every token tile, whose C tiles wait in
// scratch between chunks. The weight is read once per call, as in the AVX-512 kernel, and the zeros
// cost only tile time, which AMX has plenty of.
//
// Expansion puts a group's two kept values at its two indices in ascending order: the packed layout
// stores them so (layouts/packed.py checks it at load). Tile products are fp32 FMAs with bf16
// denormal inputs read as zero (DAZ), a difference from the reference only below 1e-38.
#include <immintrin.h>

#include <cstring>

#include "cpu_gemm.h"

namespace nxm {
namespace cpu_gemm {
namespace {

constexpr int kTile = 16;  // rows of an A tile, tokens of a B tile
constexpr int kStep = 32;  // weight columns per tile step (16 bf16 pairs)
constexpr int kTileElems = 512;  // bf16 in one 1 KiB tile
constexpr int kChunk = 8;  // steps expanded at a time
constexpr int kRowsPerStep = 2 * kTile / kChunk;  // rows of the next chunk expanded per tile step

struct TileConfig {  // the 64-byte operand of ldtilecfg, palette 1
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline uint16_t to_bf16_bits(float f) {  // round to nearest even, as torch's float -> bfloat16
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The expand masks of 16 steps from their 64 metadata bytes: each nibble holds one group's two
// 2-bit indices, whose mask is (1 << i0) | (1 << i1); byte b of the result covers columns 8b..8b+7.
inline __m512i expand_masks(__m512i meta) {
  const __m512i table = _mm512_broadcast_i32x4(_mm_setr_epi8(0b0001, 0b0011, 0b0101, 0b1001, 0b0011, 0b0010, 0b0110, 0b1010,
                                                             0b0101, 0b0110, 0b0100, 0b1100, 0b1001, 0b1010, 0b1100, 0b1000));
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  const __m512i lo = _mm512_shuffle_epi8(table, _mm512_and_si512(meta, nibble));
  const __m512i hi = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(meta, 4), nibble));
  return _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4));  // table entries < 16: no carry across bytes
}

// Steps [s0, s1) (at most kChunk) of weight rows [row0 + r0, row0 + r1) as dense bf16 A tiles into
// chunk[half][step - s0][16 rows][32 columns]; rows at or past `end` and columns past k zero.
void expand_rows(const Args& a, int64_t row0, int64_t end, int64_t steps, int64_t s0, int64_t s1, int r0, int r1,
                 uint16_t* chunk) {
  const int64_t kept = a.k / 2, full_steps = a.k / kStep;
  const int tail_groups = int(a.k % kStep) / 4;
  const int64_t bytes = a.meta_stride - 4 * s0;  // 4 metadata bytes per step, the last one partial
  const __mmask64 load = bytes >= 4 * kChunk ? (__mmask64(1) << 4 * kChunk) - 1 : (__mmask64(1) << bytes) - 1;
  for (int r = r0; r < r1; ++r) {
    // A row past `end` has mask 0: its expansion is zeros, whatever the load reads (row0 < end).
    const bool real = row0 + r < end;
    const int64_t row = real ? row0 + r : row0;
    alignas(64) uint32_t masks[16];
    _mm512_store_si512(masks, real ? expand_masks(_mm512_maskz_loadu_epi8(load, a.meta + row * a.meta_stride + 4 * s0))
                                   : _mm512_setzero_si512());
    const uint16_t* values = static_cast<const uint16_t*>(a.values) + row * kept;
    // The row's next chunk (256 bytes of values, 32 of metadata), for the next call: 32 rows 4 KiB
    // or more apart are more streams than the hardware prefetchers follow.
    if (s1 < steps) {
      for (int line = 0; line < 4; ++line) _mm_prefetch(reinterpret_cast<const char*>(values + 16 * s1) + 64 * line, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(a.meta + row * a.meta_stride + 4 * s1), _MM_HINT_T0);
    }
    for (int64_t s = s0; s < s1; ++s) {
      const bool tail = s >= full_steps;
      const __m256i v = tail ? _mm256_maskz_loadu_epi16(__mmask16((1u << (2 * tail_groups)) - 1u), values + 16 * s)
                             : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + 16 * s));
      const __mmask32 columns = tail ? __mmask32((1u << (4 * tail_groups)) - 1u) : ~__mmask32(0);
      uint16_t* out = chunk + ((r / kTile) * kChunk + s - s0) * kTileElems + (r % kTile) * kStep;
      _mm512_store_si512(out, _mm512_maskz_expand_epi16(masks[s - s0] & columns, _mm512_castsi256_si512(v)));
    }
  }
}

// A C tile c[16 weight rows][16 tokens] + bias, rounded to bf16, into y.
void store_tile(const Args& a, const float* c, int64_t row0, int64_t rows, int64_t token0, int64_t tokens) {
  uint16_t* y = static_cast<uint16_t*>(a.y);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t r = 0; r < rows; ++r)
      y[(token0 + t) * a.y_stride + row0 + r] = to_bf16_bits(c[r * kTile + t] + (a.bias ? a.bias[row0 + r] : 0.0f));
}

}  // namespace

void pack_x_bf16_amx(const uint16_t* x, int64_t x_stride, int64_t m_rows, int64_t k, int64_t token_block,
                     uint16_t* panel) {
  const int64_t steps = (k + kStep - 1) / kStep;
  uint32_t* out = reinterpret_cast<uint32_t*>(panel) + token_block * steps * kTileElems / 2;
  for (int t = 0; t < kTile; ++t) {
    const int64_t token = token_block * kTile + t;
    for (int64_t pair = 0; pair < steps * kStep / 2; ++pair) {
      uint32_t v = 0;
      if (token < m_rows && 2 * pair < k) std::memcpy(&v, x + token * x_stride + 2 * pair, 4);
      out[(pair / kTile) * kTileElems / 2 + (pair % kTile) * kTile + t] = v;
    }
  }
}

void gemm_2of4_bf16_amx(const Args& a, const uint16_t* panel, void* scratch, int64_t begin, int64_t end) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {  // 0-3: C, 4-5: A (weight), 6-7: B (x)
    config.rows[t] = kTile;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
  const int64_t steps = (a.k + kStep - 1) / kStep, token_blocks = (a.m_rows + kTile - 1) / kTile;
  // Two chunks of [2][kChunk] A tiles: the tiles multiply one while the vector units expand the
  // next, a few rows per tile step, so that both run at once.
  uint16_t* chunks[2] = {static_cast<uint16_t*>(scratch), static_cast<uint16_t*>(scratch) + 2 * kChunk * kTileElems};
  float* c = reinterpret_cast<float*>(chunks[1] + 2 * kChunk * kTileElems);  // [token block][2][16][16]
  for (int64_t row0 = begin; row0 < end; row0 += 2 * kTile) {
    expand_rows(a, row0, end, steps, 0, kChunk < steps ? kChunk : steps, 0, 2 * kTile, chunks[0]);
    for (int64_t s0 = 0, current = 0; s0 < steps; s0 += kChunk, current ^= 1) {
      // Only the last chunk may be short, and it has no next one to expand.
      const int64_t s1 = s0 + kChunk < steps ? s0 + kChunk : steps, s2 = s1 + kChunk < steps ? s1 + kChunk : steps;
      const uint16_t* chunk = chunks[current];
      for (int64_t tb = 0; tb < token_blocks; tb += 2) {  // two token tiles at a time
        const bool two = tb + 1 < token_blocks;
        float* c0 = c + tb * 2 * kTile * kTile;  // then c0 + 256: rows 16-31; c0 + 512, + 768: tb + 1
        const uint16_t* b0 = panel + tb * steps * kTileElems;
        const uint16_t* b1 = b0 + steps * kTileElems;
        if (s0 == 0) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        } else {
          _tile_loadd(0, c0, 64);
          _tile_loadd(1, c0 + 256, 64);
          if (two) {
            _tile_loadd(2, c0 + 512, 64);
            _tile_loadd(3, c0 + 768, 64);
          }
        }
        for (int64_t s = s0; s < s1; ++s) {
          _tile_loadd(4, chunk + (s - s0) * kTileElems, 64);
          _tile_loadd(5, chunk + (kChunk + s - s0) * kTileElems, 64);
          _tile_loadd(6, b0 + s * kTileElems, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 5, 6);
          if (two) {
            _tile_loadd(7, b1 + s * kTileElems, 64);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
          if (tb == 0 && s1 < s2) {
            const int r0 = int(s - s0) * kRowsPerStep;
            expand_rows(a, row0, end, steps, s1, s2, r0, r0 + kRowsPerStep, chunks[current ^ 1]);
          }
        }
        _tile_stored(0, c0, 64);
        _tile_stored(1, c0 + 256, 64);
        if (two) {
          _tile_stored(2, c0 + 512, 64);
          _tile_stored(3, c0 + 768, 64);
        }
      }
    }
    for (int64_t tb = 0; tb < token_blocks; ++tb) {
      const int64_t tokens = a.m_rows - tb * kTile < kTile ? a.m_rows - tb * kTile : kTile;
      for (int half = 0; half < 2 && row0 + half * kTile < end; ++half) {
        const int64_t rows = end - row0 - half * kTile < kTile ? end - row0 - half * kTile : kTile;
        store_tile(a, c + (tb * 2 + half) * kTile * kTile, row0 + half * kTile, rows, tb * kTile, tokens);
      }
    }
  }
  _tile_release();
}

}  // namespace cpu_gemm
}  // namespace nxm
