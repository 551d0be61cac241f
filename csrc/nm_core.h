// The per-group logic of N:M selection and of the two compressed layouts, the one source of truth
// for the C++ CPU ops (csrc/cpu_ops.cpp) and the CUDA kernels (csrc/cuda/nm_kernels.cu, compiled
// by nvcc or, for the CuPy path, by NVRTC). It mirrors nxm_kernels/reference.py.
//
// Values travel as raw bits (uint16_t for fp16 and bf16, uint32_t for fp32, uint64_t for fp64,
// int8_t for int8): no half-precision types are needed, copies are exact, and the magnitude order
// is an integer order, the same keys as reference.magnitude_keys.
//
// Every function works on one "unit" (a group, a byte-aligned chunk of groups, or one cutlass
// metadata element) so that a CPU loop iteration and a GPU thread run the very same code.
#pragma once

#if defined(__CUDACC__)
#define NXM_HD __host__ __device__ __forceinline__
#else
#define NXM_HD inline
#endif

// On loops over a group: complete unrolling when its size M is a compile-time constant (<= 16),
// which lets the loop over groups around it vectorise; a run-time size stays a loop.
#if defined(__CUDACC__) || defined(__clang__)
#define NXM_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define NXM_UNROLL _Pragma("GCC unroll 16")
#else
#define NXM_UNROLL
#endif

#if defined(__CUDACC_RTC__)  // NVRTC has no standard headers
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
#include <cstdint>
#endif

namespace nxm {

constexpr int kMaxGroup = 16;  // pattern.MAX_GROUP

// ------------------------------------------------------------------ selection

// |w| as an integer with the same order: IEEE bits without the sign bit; |int8| (128 fits int16).
// Signed and as narrow as the value, so that SIMD compares them natively.
NXM_HD int16_t magnitude_key(int8_t v) { return int16_t(v < 0 ? -v : v); }
NXM_HD int16_t magnitude_key(uint16_t bits) { return int16_t(bits & 0x7fffu); }
NXM_HD int32_t magnitude_key(uint32_t bits) { return int32_t(bits & 0x7fffffffu); }
NXM_HD int64_t magnitude_key(uint64_t bits) { return int64_t(bits & 0x7fffffffffffffffull); }

// Selection keys read from the weight itself (largest |w|) ...
template <typename Bits>
struct MagnitudeKeys {
  const Bits* w;
  NXM_HD auto operator()(int64_t i) const { return magnitude_key(w[i]); }
};

// ... or from given scores (float or double, finite, compared as they are).
template <typename Score>
struct ScoreKeys {
  const Score* scores;
  NXM_HD Score operator()(int64_t i) const { return scores[i]; }
};

// The selection rule: in the group starting at `base`, position i is kept iff rank(i) < n, where
// rank(i) = #{j > i: key_j > key_i} + #{j < i: key_j >= key_i}: the n largest keys, ties to the
// lower index (as reference.nm_mask: one comparison per pair). M > 0 fixes m at compile time: the
// loops unroll completely, and a loop over groups around this call vectorises.
// (GCC unrolls the run-time-size loops too, after which -Warray-bounds imagines indices up to 31:
// size <= kMaxGroup holds, so that warning is silenced here.)
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Warray-bounds"
#endif
template <int M = 0, typename Keys>
NXM_HD void group_ranks(const Keys& keys, int64_t base, int m, int* rank) {
  decltype(keys(0)) k[M > 0 ? M : kMaxGroup];
  const int size = M > 0 ? M : m;
  NXM_UNROLL
  for (int i = 0; i < size; ++i) {
    k[i] = keys(base + i);
    rank[i] = 0;
  }
  NXM_UNROLL
  for (int i = 0; i < size; ++i) {
    NXM_UNROLL
    for (int j = i + 1; j < size; ++j) {
      const int j_wins = k[j] > k[i];
      rank[i] += j_wins;
      rank[j] += 1 - j_wins;
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#pragma GCC diagnostic pop
#endif

// Bit i set <=> position i of the group starting at `base` is kept.
template <int M = 0, typename Keys>
NXM_HD uint32_t select_group(const Keys& keys, int64_t base, int n, int m) {
  int rank[M > 0 ? M : kMaxGroup];
  group_ranks<M>(keys, base, m, rank);
  uint32_t kept = 0;
  NXM_UNROLL
  for (int i = 0; i < (M > 0 ? M : m); ++i) kept |= uint32_t(rank[i] < n) << i;
  return kept;
}

// ------------------------------------------------------------------ packed layout
// Each row's metadata is one LSB-first bitstream of the kept indices, `bits` bits each. A row is
// cut into chunks of groups whose indices fill whole bytes, so chunks are written independently.

NXM_HD int index_bits(int m) {
  int bits = 1;
  while ((1 << bits) < m) ++bits;
  return bits;
}

NXM_HD int packed_chunk_groups(int n, int bits) {  // smallest g with g*n*bits % 8 == 0 (<= 8)
  int groups = 1;
  while ((groups * n * bits) % 8) ++groups;
  return groups;
}

NXM_HD int64_t packed_row_bytes(int64_t groups_per_row, int n, int bits) {
  return (groups_per_row * n * bits + 7) / 8;
}

// Compress `groups` groups starting at group `first` of one row: kept values (ascending index)
// into values_row, their indices into meta_row. A row's last chunk writes its zero padding.
template <int M = 0, typename Bits, typename Keys>
NXM_HD void compress_packed_chunk(const Bits* w_row, const Keys& keys, int64_t keys_row_base,
                                  int64_t first, int groups, int n, int m, int bits,
                                  Bits* values_row, uint8_t* meta_row) {
  int64_t value = first * n;
  int64_t byte = first * n * bits / 8;
  uint32_t pending = 0;
  int pending_bits = 0;
  for (int g = 0; g < groups; ++g) {
    const int64_t base = (first + g) * m;
    const uint32_t kept = select_group<M>(keys, keys_row_base + base, n, m);
    for (int i = 0; i < m; ++i) {
      if (!((kept >> i) & 1u)) continue;
      values_row[value++] = w_row[base + i];
      pending |= uint32_t(i) << pending_bits;
      pending_bits += bits;
      while (pending_bits >= 8) {
        meta_row[byte++] = uint8_t(pending & 0xffu);
        pending >>= 8;
        pending_bits -= 8;
      }
    }
  }
  if (pending_bits) meta_row[byte] = uint8_t(pending);
}

// Inverse of compress_packed_chunk: dense groups with zeros where nothing was kept. An index
// outside the group (possible only in unchecked corrupt metadata) is ignored, never written.
template <typename Bits>
NXM_HD void decompress_packed_chunk(const Bits* values_row, const uint8_t* meta_row, int64_t first,
                                    int groups, int n, int m, int bits, Bits* dense_row) {
  int64_t value = first * n;
  int64_t byte = first * n * bits / 8;
  uint32_t pending = 0;
  int pending_bits = 0;
  const uint32_t index_mask = (1u << bits) - 1u;
  for (int g = 0; g < groups; ++g) {
    Bits* dense = dense_row + (first + g) * m;
    for (int i = 0; i < m; ++i) dense[i] = Bits(0);
    for (int s = 0; s < n; ++s) {
      while (pending_bits < bits) {
        pending |= uint32_t(meta_row[byte++]) << pending_bits;
        pending_bits += 8;
      }
      const uint32_t index = pending & index_mask;
      pending >>= bits;
      pending_bits -= bits;
      const Bits v = values_row[value++];
      if (index < uint32_t(m)) dense[index] = v;
    }
  }
}

// ------------------------------------------------------------------ cutlass layout
// One metadata element covers kNibbles groups and exactly 16 bytes of kept values:
//   fp16/bf16: int16 = 4 nibbles x (2 of 4);  int8: int32 = 8 x (2 of 4);  fp32: int16 = 4 x (1 of 2).

template <typename Bits>
struct Cutlass {
  static constexpr int kGroup = 4;
  static constexpr int kNibbles = 4;
};
template <>
struct Cutlass<int8_t> {
  static constexpr int kGroup = 4;
  static constexpr int kNibbles = 8;
};
template <>
struct Cutlass<uint32_t> {
  static constexpr int kGroup = 2;
  static constexpr int kNibbles = 4;
};

// reference.CUTLASS_NIBBLE_OF_FLAGS, 4 bits per entry: flags (bit i = position i kept and nonzero)
// -> nibble (low 2 bits: first stored position, high 2 bits: second).
NXM_HD constexpr uint32_t cutlass_nibble(uint32_t flags) {
  return uint32_t(0x4dce4dce498e498eull >> (4u * flags)) & 0xfu;
}

// The same table in closed form, as selects that vectorise (no lookup, no gather). Only flags
// with at most two bits set occur (n = 2 kept); for them it equals the table (checked below).
// first = f0 ? 0 : f1 ? 1 : 2;  second = f3 ? 3 : 3 - f0 - f1.
NXM_HD constexpr uint32_t cutlass_first_of_flags(bool f0, bool f1) { return (1u - f0) * (2u - f1); }
NXM_HD constexpr uint32_t cutlass_second_of_flags(bool f0, bool f1, bool f3) {
  return 3u - (1u - f3) * (uint32_t(f0) + uint32_t(f1));
}

NXM_HD constexpr bool cutlass_closed_form_matches_table() {
  for (uint32_t flags = 0; flags < 16; ++flags) {
    const bool f0 = flags & 1u, f1 = flags & 2u, f2 = flags & 4u, f3 = flags & 8u;
    if (int(f0) + int(f1) + int(f2) + int(f3) > 2) continue;
    const uint32_t nibble = cutlass_first_of_flags(f0, f1) | cutlass_second_of_flags(f0, f1, f3) << 2;
    if (nibble != cutlass_nibble(flags)) return false;
  }
  return true;
}
static_assert(cutlass_closed_form_matches_table(), "cutlass closed form disagrees with CUTLASS_NIBBLE_OF_FLAGS");

// c ? a : b without a branch (random data would mispredict it) and in a form SIMD vectorises.
template <typename Bits>
NXM_HD Bits pick(bool c, Bits a, Bits b) {
  return Bits(b ^ ((a ^ b) & Bits(-Bits(c))));
}

// One 2:4 group of the cutlass layout (fp16, bf16, int8): keeps the 2 largest keys k (ties to the
// lower index), stores the positions the nibble names (a kept zero makes way for CUTLASS's
// fill-in choice) into first/second, and returns the nibble. Values are read from project(w):
// a fill-in slot may name a dropped position, which holds +0 there even where w has -0.
template <typename Key, typename Bits>
NXM_HD uint32_t cutlass_group_2of4(Key k0, Key k1, Key k2, Key k3, Bits v0, Bits v1, Bits v2, Bits v3,
                                   Bits& first, Bits& second) {
  const bool b_a = k1 > k0, c_a = k2 > k0, d_a = k3 > k0, c_b = k2 > k1, d_b = k3 > k1, d_c = k3 > k2;
  const bool keep0 = int(b_a) + int(c_a) + int(d_a) < 2, keep1 = int(!b_a) + int(c_b) + int(d_b) < 2;
  const bool keep2 = int(!c_a) + int(!c_b) + int(d_c) < 2, keep3 = int(!d_a) + int(!d_b) + int(!d_c) < 2;
  v0 = pick(keep0, v0, Bits(0));
  v1 = pick(keep1, v1, Bits(0));
  v2 = pick(keep2, v2, Bits(0));
  v3 = pick(keep3, v3, Bits(0));
  const bool f0 = keep0 & (magnitude_key(v0) != 0);
  const bool f1 = keep1 & (magnitude_key(v1) != 0);
  const bool f3 = keep3 & (magnitude_key(v3) != 0);
  first = pick(f0, v0, pick(f1, v1, v2));
  second = pick(f3, v3, pick(f0 & f1, v1, pick(f0 | f1, v2, v3)));
  return cutlass_first_of_flags(f0, f1) | cutlass_second_of_flags(f0, f1, f3) << 2;
}

// One 1:2 pair of the cutlass layout (fp32), encoded as 2:4 over its four 16-bit halves [a a b b]:
// flags 0b0011 (a kept, nonzero) -> nibble 0b0100, else 0b1110 (as the table says). The second
// value is read from project(w): +0 when a was kept (a kept zero), even where w has -0.
template <typename Key, typename Bits>
NXM_HD uint32_t cutlass_pair_1of2(Key k0, Key k1, Bits v0, Bits v1, Bits& kept) {
  const bool keep0 = k0 >= k1;
  const bool f0 = keep0 & (magnitude_key(v0) != 0);
  kept = pick(f0, v0, pick(keep0, Bits(0), v1));
  return f0 ? cutlass_nibble(0x3u) : cutlass_nibble(0x0u);
}

// reference.cutlass_meta_offsets for one element: where (row, col) of the row-major metadata lives.
NXM_HD int64_t cutlass_meta_offset(int64_t row, int64_t col, int64_t rows, bool int16_meta) {
  const int64_t block = int16_meta ? 32 : 16, spread = int16_meta ? 4 : 2;
  int64_t r = row / block * block + (row % 8) * spread + (row % block) / 8;
  int64_t c = col;
  if (r % 2 == 0 && c % 2 == 1) {
    r += 1;
    c -= 1;
  } else if (r % 2 == 1 && c % 2 == 0) {
    r -= 1;
    c += 1;
  }
  return (c / 2) * rows * 2 + r * 2 + c % 2;
}

// Compress the kNibbles groups starting at w (keys at keys_base): 16 bytes of values, and the
// metadata element's bits (nibbles LSB first; the caller narrows to int16 or int32).
template <typename Bits, typename Keys>
NXM_HD uint32_t compress_cutlass_element(const Bits* w, const Keys& keys, int64_t keys_base, Bits* values) {
  uint32_t word = 0;
  for (int k = 0; k < Cutlass<Bits>::kNibbles; ++k) {
    uint32_t nibble;
    if (Cutlass<Bits>::kGroup == 4) {
      const Bits* v = w + 4 * k;
      const int64_t i = keys_base + 4 * k;
      nibble = cutlass_group_2of4(keys(i), keys(i + 1), keys(i + 2), keys(i + 3), v[0], v[1], v[2], v[3],
                                  values[2 * k], values[2 * k + 1]);
    } else {
      const int64_t i = keys_base + 2 * k;
      nibble = cutlass_pair_1of2(keys(i), keys(i + 1), w[2 * k], w[2 * k + 1], values[k]);
    }
    word |= nibble << (4 * k);
  }
  return word;
}

// Inverse: the dense kNibbles*kGroup values of one metadata element (word = its bits, unsigned).
template <typename Bits>
NXM_HD void decompress_cutlass_element(uint32_t word, const Bits* values, Bits* dense) {
  constexpr int kGroup = Cutlass<Bits>::kGroup;
  for (int k = 0; k < Cutlass<Bits>::kNibbles; ++k) {
    const uint32_t nibble = (word >> (4 * k)) & 0xfu;
    Bits* group = dense + k * kGroup;
    for (int i = 0; i < kGroup; ++i) group[i] = Bits(0);
    if (kGroup == 4) {
      group[nibble & 3u] = values[2 * k];
      group[nibble >> 2] = values[2 * k + 1];
    } else {
      group[(nibble & 3u) >> 1] = values[k];
    }
  }
}

}  // namespace nxm
