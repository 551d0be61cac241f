// AMX kernel of the bf16 2:4 CPU sparse GEMM at M > 8 (AMX-TILE, AMX-BF16, AVX-512 F/BW/VBMI2);
// compiled with those -m flags and called only where cpu_gemm.cpp found them and Linux granted the
// tile state. At M > 8 the AVX-512 kernel is bound by its permutes (one per 16 kept values per row
// of x), while dense bf16 runs on AMX: so this kernel runs on AMX too.
//
// y^T = W x^T in tiles: A = 16 weight rows x 32 columns of the dense weight, B = x in VNNI pairs
// (16 column pairs x 16 tokens), C = 16 weight rows x 16 tokens in fp32. Each 32-row weight block is
// expanded to dense bf16 once (vpexpandw: its 2:4 metadata is the expand mask) into a scratch buffer
// that stays in L2, then multiplied by every token tile. The weight is read once per call, as in the
// AVX-512 kernel, and the zeros cost only tile time, which AMX has plenty of.
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

// Weight rows [row0, row0 + 32) as dense bf16 A tiles: scratch[half][step][16 rows][32 columns], rows
// at or past `end` and columns past k zero.
void expand_block(const Args& a, int64_t row0, int64_t end, int64_t steps, uint16_t* scratch) {
  const int64_t kept = a.k / 2, full_steps = a.k / kStep;
  const int tail_groups = int(a.k % kStep) / 4;
  for (int r = 0; r < 2 * kTile; ++r) {
    uint16_t* out = scratch + (r / kTile) * steps * kTileElems + (r % kTile) * kStep;
    const int64_t row = row0 + r;
    if (row >= end) {
      for (int64_t s = 0; s < steps; ++s) _mm512_store_si512(out + s * kTileElems, _mm512_setzero_si512());
      continue;
    }
    const uint16_t* values = static_cast<const uint16_t*>(a.values) + row * kept;
    const uint8_t* meta = a.meta + row * a.meta_stride;
    for (int64_t s0 = 0; s0 < steps; s0 += 16) {
      const int64_t bytes = a.meta_stride - 4 * s0;  // 4 metadata bytes per step, the last one partial
      const __mmask64 load = bytes >= 64 ? ~__mmask64(0) : (__mmask64(1) << bytes) - 1;
      alignas(64) uint32_t masks[16];
      _mm512_store_si512(masks, expand_masks(_mm512_maskz_loadu_epi8(load, meta + 4 * s0)));
      const int64_t s_end = s0 + 16 < steps ? s0 + 16 : steps;
      for (int64_t s = s0; s < s_end; ++s) {
        __m256i v;
        __mmask32 mask = masks[s - s0];
        if (s < full_steps) {
          v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + 16 * s));
        } else {  // the tail: 2 values and 4 columns per remaining group
          v = _mm256_maskz_loadu_epi16(__mmask16((1u << (2 * tail_groups)) - 1u), values + 16 * s);
          mask &= (1u << (4 * tail_groups)) - 1u;
        }
        _mm512_store_si512(out + s * kTileElems, _mm512_maskz_expand_epi16(mask, _mm512_castsi256_si512(v)));
      }
    }
  }
}

// C tile `tile` (16 weight rows x 16 tokens) + bias, rounded to bf16, into y.
void store_tile(const Args& a, const float (&c)[kTile][kTile], int64_t row0, int64_t rows, int64_t token0,
                int64_t tokens) {
  uint16_t* y = static_cast<uint16_t*>(a.y);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t r = 0; r < rows; ++r)
      y[(token0 + t) * a.y_stride + row0 + r] = to_bf16_bits(c[r][t] + (a.bias ? a.bias[row0 + r] : 0.0f));
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

void gemm_2of4_bf16_amx(const Args& a, const uint16_t* panel, uint16_t* scratch, int64_t begin, int64_t end) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {  // 0-3: C, 4-5: A (weight), 6-7: B (x)
    config.rows[t] = kTile;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
  const int64_t steps = (a.k + kStep - 1) / kStep, token_blocks = (a.m_rows + kTile - 1) / kTile;
  alignas(64) float c[kTile][kTile];
  for (int64_t row0 = begin; row0 < end; row0 += 2 * kTile) {
    expand_block(a, row0, end, steps, scratch);
    const uint16_t* a0 = scratch;
    const uint16_t* a1 = scratch + steps * kTileElems;
    for (int64_t tb = 0; tb < token_blocks; tb += 2) {
      const bool two = tb + 1 < token_blocks;
      const uint16_t* b0 = panel + tb * steps * kTileElems;
      const uint16_t* b1 = b0 + steps * kTileElems;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t s = 0; s < steps; ++s) {
        _tile_loadd(4, a0 + s * kTileElems, 64);
        _tile_loadd(5, a1 + s * kTileElems, 64);
        _tile_loadd(6, b0 + s * kTileElems, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if (two) {
          _tile_loadd(7, b1 + s * kTileElems, 64);
          _tile_dpbf16ps(2, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      const int64_t rows0 = end - row0 < kTile ? end - row0 : kTile;
      const int64_t rows1 = end - row0 - kTile < kTile ? end - row0 - kTile : kTile;
      const int64_t tokens0 = a.m_rows - tb * kTile < kTile ? a.m_rows - tb * kTile : kTile;
      _tile_stored(0, c, 64);
      store_tile(a, c, row0, rows0, tb * kTile, tokens0);
      if (rows1 > 0) {
        _tile_stored(1, c, 64);
        store_tile(a, c, row0 + kTile, rows1, tb * kTile, tokens0);
      }
      if (two) {
        const int64_t tokens1 = a.m_rows - (tb + 1) * kTile < kTile ? a.m_rows - (tb + 1) * kTile : kTile;
        _tile_stored(2, c, 64);
        store_tile(a, c, row0, rows0, (tb + 1) * kTile, tokens1);
        if (rows1 > 0) {
          _tile_stored(3, c, 64);
          store_tile(a, c, row0 + kTile, rows1, (tb + 1) * kTile, tokens1);
        }
      }
    }
  }
  _tile_release();
}

}  // namespace cpu_gemm
}  // namespace nxm
