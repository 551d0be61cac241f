// CUDA kernels of the nxm ops, built on the same per-unit functions as the CPU ops (nm_core.h).
// No torch headers here (they cost minutes of nvcc time): bindings.cpp checks and allocates,
// launch.h is the interface. NVRTC (the CuPy path) compiles the kernels alone, so everything on
// the host side sits outside __CUDACC_RTC__.
//
// Work is cut into units (a group, a byte-aligned chunk of groups, a cutlass metadata element),
// numbered row by row. One thread block takes a tile of whole rows; consecutive threads take
// consecutive units of a row, so loads are coalesced, and units are copied in and out with the
// widest accesses their addresses allow (16 bytes for the cutlass values).
#include "../nm_core.h"

#ifndef __CUDACC_RTC__
#include "launch.h"
#endif

namespace nxm {

constexpr int kThreads = 256;

struct NoScores {};  // selection by |w|

template <typename A, typename B>
struct same_type {
  static constexpr bool value = false;
};
template <typename A>
struct same_type<A, A> {
  static constexpr bool value = true;
};

__device__ __forceinline__ void copy_bytes(void* dst, const void* src, int bytes) {
  const unsigned long long align = reinterpret_cast<unsigned long long>(dst) |
                                   reinterpret_cast<unsigned long long>(src) | (unsigned long long)bytes;
  if (align % 16 == 0) {
    for (int i = 0; i < bytes / 16; ++i) static_cast<uint4*>(dst)[i] = static_cast<const uint4*>(src)[i];
  } else if (align % 8 == 0) {
    for (int i = 0; i < bytes / 8; ++i) static_cast<uint2*>(dst)[i] = static_cast<const uint2*>(src)[i];
  } else if (align % 4 == 0) {
    for (int i = 0; i < bytes / 4; ++i) static_cast<uint32_t*>(dst)[i] = static_cast<const uint32_t*>(src)[i];
  } else {
    for (int i = 0; i < bytes; ++i) static_cast<uint8_t*>(dst)[i] = static_cast<const uint8_t*>(src)[i];
  }
}

// Calls f(row, unit) for this thread's units of this block's row tile.
template <typename F>
__device__ __forceinline__ void for_each_unit(int64_t rows, int64_t units_per_row, int64_t rows_per_block, F f) {
  const int64_t first_row = int64_t(blockIdx.x) * rows_per_block;
  for (int64_t u = threadIdx.x; u < rows_per_block * units_per_row; u += blockDim.x) {
    const int64_t row = first_row + u / units_per_row;
    if (row >= rows) return;  // units go row by row: the rest are past the end too
    f(row, u % units_per_row);
  }
}

// Kept positions of a group: by |w| from the unit's copy in registers, or by the scores in memory.
template <typename Bits, typename Score>
__device__ __forceinline__ uint32_t select_in_unit(const Bits* local, int local_base, const Score* scores,
                                                   int64_t global_base, int n, int m) {
  if constexpr (same_type<Score, NoScores>::value) {
    return select_group(MagnitudeKeys<Bits>{local}, local_base, n, m);
  } else {
    return select_group(ScoreKeys<Score>{scores}, global_base, n, m);
  }
}

// nm_mask / project. A unit is unit_groups groups (16 bytes of w when groups divide it), at most 16 values.
template <typename Bits, typename Score, bool kProject>
__global__ void __launch_bounds__(kThreads)
    select_kernel(const Bits* __restrict__ w, const Score* __restrict__ scores, int64_t rows, int64_t units_per_row,
                  int64_t rows_per_block, int unit_groups, int n, int m, void* __restrict__ out) {
  for_each_unit(rows, units_per_row, rows_per_block, [&](int64_t row, int64_t unit) {
    const int count = unit_groups * m;
    const int64_t start = (row * units_per_row + unit) * count;
    alignas(16) Bits v[kMaxGroup];
    alignas(16) Bits projected[kMaxGroup];
    alignas(16) uint8_t mask[kMaxGroup];
    copy_bytes(v, w + start, count * int(sizeof(Bits)));
    for (int g = 0; g < unit_groups; ++g) {
      const uint32_t kept = select_in_unit(v, g * m, scores, start + g * m, n, m);
      for (int i = 0; i < m; ++i) {
        const bool keep = (kept >> i) & 1u;
        if (kProject) {
          projected[g * m + i] = pick(keep, v[g * m + i], Bits(0));
        } else {
          mask[g * m + i] = keep;
        }
      }
    }
    if (kProject) {
      copy_bytes(static_cast<Bits*>(out) + start, projected, count * int(sizeof(Bits)));
    } else {
      copy_bytes(static_cast<uint8_t*>(out) + start, mask, count);
    }
  });
}

// packed layout. A unit is a chunk of groups whose indices fill whole bytes (nm_core.h).
template <typename Bits, typename Score>
__global__ void __launch_bounds__(kThreads)
    compress_packed_kernel(const Bits* __restrict__ w, const Score* __restrict__ scores, int64_t rows, int64_t cols,
                           int64_t units_per_row, int64_t rows_per_block, int chunk_groups, int n, int m, int bits,
                           Bits* __restrict__ values, uint8_t* __restrict__ metadata) {
  const int64_t groups = cols / m, row_bytes = packed_row_bytes(groups, n, bits);
  for_each_unit(rows, units_per_row, rows_per_block, [&](int64_t row, int64_t unit) {
    const int64_t first = unit * chunk_groups;
    const int count = int(groups - first < chunk_groups ? groups - first : chunk_groups);
    const Bits* w_row = w + row * cols;
    if constexpr (same_type<Score, NoScores>::value) {
      compress_packed_chunk(w_row, MagnitudeKeys<Bits>{w_row}, 0, first, count, n, m, bits, values + row * groups * n,
                            metadata + row * row_bytes);
    } else {
      compress_packed_chunk(w_row, ScoreKeys<Score>{scores}, row * cols, first, count, n, m, bits,
                            values + row * groups * n, metadata + row * row_bytes);
    }
  });
}

template <typename Bits>
__global__ void __launch_bounds__(kThreads)
    decompress_packed_kernel(const Bits* __restrict__ values, const uint8_t* __restrict__ metadata, int64_t rows,
                             int64_t cols, int64_t units_per_row, int64_t rows_per_block, int chunk_groups, int n,
                             int m, int bits, Bits* __restrict__ dense) {
  const int64_t groups = cols / m, row_bytes = packed_row_bytes(groups, n, bits);
  for_each_unit(rows, units_per_row, rows_per_block, [&](int64_t row, int64_t unit) {
    const int64_t first = unit * chunk_groups;
    const int count = int(groups - first < chunk_groups ? groups - first : chunk_groups);
    decompress_packed_chunk(values + row * groups * n, metadata + row * row_bytes, first, count, n, m, bits,
                            dense + row * cols);
  });
}

// cutlass layout. A unit is one metadata element: 32 bytes of w in, 16 bytes of values out.
template <typename Bits>
struct CutlassMeta {
  typedef int16_t type;
  typedef uint16_t bits;
};
template <>
struct CutlassMeta<int8_t> {
  typedef int32_t type;
  typedef uint32_t bits;
};

template <typename Bits, typename Score>
__global__ void __launch_bounds__(kThreads)
    compress_cutlass_kernel(const Bits* __restrict__ w, const Score* __restrict__ scores, int64_t rows, int64_t cols,
                            int64_t rows_per_block, Bits* __restrict__ values,
                            typename CutlassMeta<Bits>::type* __restrict__ metadata) {
  constexpr int kCols = Cutlass<Bits>::kGroup * Cutlass<Bits>::kNibbles;
  for_each_unit(rows, cols / kCols, rows_per_block, [&](int64_t row, int64_t col) {
    const int64_t start = row * cols + col * kCols;
    alignas(16) Bits v[kCols];
    alignas(16) Bits kept[kCols / 2];
    copy_bytes(v, w + start, int(sizeof(v)));
    uint32_t word;
    if constexpr (same_type<Score, NoScores>::value) {
      word = compress_cutlass_element(v, MagnitudeKeys<Bits>{v}, 0, kept);
    } else {
      word = compress_cutlass_element(v, ScoreKeys<Score>{scores}, start, kept);
    }
    copy_bytes(values + start / 2, kept, int(sizeof(kept)));
    metadata[cutlass_meta_offset(row, col, rows, sizeof(typename CutlassMeta<Bits>::type) == 2)] =
        typename CutlassMeta<Bits>::type(word);  // two's-complement wrap
  });
}

template <typename Bits>
__global__ void __launch_bounds__(kThreads)
    decompress_cutlass_kernel(const Bits* __restrict__ values, const typename CutlassMeta<Bits>::bits* __restrict__ metadata,
                              int64_t rows, int64_t cols, int64_t rows_per_block, Bits* __restrict__ dense) {
  constexpr int kCols = Cutlass<Bits>::kGroup * Cutlass<Bits>::kNibbles;
  for_each_unit(rows, cols / kCols, rows_per_block, [&](int64_t row, int64_t col) {
    const int64_t start = row * cols + col * kCols;
    alignas(16) Bits kept[kCols / 2];
    alignas(16) Bits out[kCols];
    copy_bytes(kept, values + start / 2, int(sizeof(kept)));
    const uint32_t word = metadata[cutlass_meta_offset(row, col, rows, sizeof(metadata[0]) == 2)];
    decompress_cutlass_element(word, kept, out);
    copy_bytes(dense + start, out, int(sizeof(out)));
  });
}

}  // namespace nxm

#ifndef __CUDACC_RTC__
namespace nxm::cuda {
namespace {

struct RowTiles {
  unsigned blocks;
  int64_t rows_per_block;
};

// Enough whole rows per block to give every thread a unit (one row per block for long rows).
RowTiles row_tiles(int64_t rows, int64_t units_per_row) {
  if (rows == 0 || units_per_row == 0) return {0, 1};
  const int64_t per_block = units_per_row >= kThreads ? 1 : kThreads / units_per_row;
  return {unsigned((rows + per_block - 1) / per_block), per_block};
}

template <typename F>
cudaError_t with_bits(ValueKind kind, F f) {
  switch (kind) {
    case ValueKind::Int8: return f(int8_t{});
    case ValueKind::Bits16: return f(uint16_t{});
    case ValueKind::Bits32: return f(uint32_t{});
    case ValueKind::Bits64: return f(uint64_t{});
  }
  return cudaErrorInvalidValue;
}

template <typename F>
cudaError_t with_scores(ScoreKind kind, F f) {
  switch (kind) {
    case ScoreKind::Magnitude: return f(NoScores{});
    case ScoreKind::Float32: return f(float{});
    case ScoreKind::Float64: return f(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t select(ValueKind kind, const void* w, ScoreKind score_kind, const void* scores, int64_t rows,
                   int64_t cols, int n, int m, bool project, void* out, cudaStream_t stream) {
  return with_bits(kind, [&](auto bits) {
    using Bits = decltype(bits);
    return with_scores(score_kind, [&](auto score) {
      using Score = decltype(score);
      const int group_bytes = m * int(sizeof(Bits));
      const int per_16_bytes = 16 % group_bytes == 0 ? 16 / group_bytes : 1;
      const int unit_groups = (cols / m) % per_16_bytes == 0 ? per_16_bytes : 1;
      const int64_t units_per_row = cols / m / unit_groups;
      const RowTiles tiles = row_tiles(rows, units_per_row);
      if (tiles.blocks == 0) return cudaSuccess;
      const auto* w_bits = static_cast<const Bits*>(w);
      const auto* s = static_cast<const Score*>(scores);
      if (project) {
        select_kernel<Bits, Score, true><<<tiles.blocks, kThreads, 0, stream>>>(
            w_bits, s, rows, units_per_row, tiles.rows_per_block, unit_groups, n, m, out);
      } else {
        select_kernel<Bits, Score, false><<<tiles.blocks, kThreads, 0, stream>>>(
            w_bits, s, rows, units_per_row, tiles.rows_per_block, unit_groups, n, m, out);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t compress_packed(ValueKind kind, const void* w, ScoreKind score_kind, const void* scores, int64_t rows,
                            int64_t cols, int n, int m, void* values, uint8_t* metadata, cudaStream_t stream) {
  return with_bits(kind, [&](auto bits_tag) {
    using Bits = decltype(bits_tag);
    if constexpr (same_type<Bits, uint64_t>::value) {  // no float64 compressed layouts
      return cudaErrorInvalidValue;
    } else {
      return with_scores(score_kind, [&](auto score) {
        using Score = decltype(score);
        const int bits = index_bits(m), chunk_groups = packed_chunk_groups(n, bits);
        const int64_t units_per_row = (cols / m + chunk_groups - 1) / chunk_groups;
        const RowTiles tiles = row_tiles(rows, units_per_row);
        if (tiles.blocks == 0) return cudaSuccess;
        compress_packed_kernel<Bits, Score><<<tiles.blocks, kThreads, 0, stream>>>(
            static_cast<const Bits*>(w), static_cast<const Score*>(scores), rows, cols, units_per_row,
            tiles.rows_per_block, chunk_groups, n, m, bits, static_cast<Bits*>(values), metadata);
        return cudaGetLastError();
      });
    }
  });
}

cudaError_t decompress_packed(ValueKind kind, const void* values, const uint8_t* metadata, int64_t rows, int64_t cols,
                              int n, int m, void* dense, cudaStream_t stream) {
  return with_bits(kind, [&](auto bits_tag) {
    using Bits = decltype(bits_tag);
    if constexpr (same_type<Bits, uint64_t>::value) {
      return cudaErrorInvalidValue;
    } else {
      const int bits = index_bits(m), chunk_groups = packed_chunk_groups(n, bits);
      const int64_t units_per_row = (cols / m + chunk_groups - 1) / chunk_groups;
      const RowTiles tiles = row_tiles(rows, units_per_row);
      if (tiles.blocks == 0) return cudaSuccess;
      decompress_packed_kernel<Bits><<<tiles.blocks, kThreads, 0, stream>>>(
          static_cast<const Bits*>(values), metadata, rows, cols, units_per_row, tiles.rows_per_block, chunk_groups,
          n, m, bits, static_cast<Bits*>(dense));
      return cudaGetLastError();
    }
  });
}

cudaError_t compress_cutlass(ValueKind kind, const void* w, ScoreKind score_kind, const void* scores, int64_t rows,
                             int64_t cols, void* values, void* metadata, cudaStream_t stream) {
  return with_bits(kind, [&](auto bits_tag) {
    using Bits = decltype(bits_tag);
    if constexpr (same_type<Bits, uint64_t>::value) {
      return cudaErrorInvalidValue;
    } else {
      return with_scores(score_kind, [&](auto score) {
        using Score = decltype(score);
        constexpr int kCols = Cutlass<Bits>::kGroup * Cutlass<Bits>::kNibbles;
        const RowTiles tiles = row_tiles(rows, cols / kCols);
        if (tiles.blocks == 0) return cudaSuccess;
        compress_cutlass_kernel<Bits, Score><<<tiles.blocks, kThreads, 0, stream>>>(
            static_cast<const Bits*>(w), static_cast<const Score*>(scores), rows, cols, tiles.rows_per_block,
            static_cast<Bits*>(values), static_cast<typename CutlassMeta<Bits>::type*>(metadata));
        return cudaGetLastError();
      });
    }
  });
}

cudaError_t decompress_cutlass(ValueKind kind, const void* values, const void* metadata, int64_t rows, int64_t cols,
                               void* dense, cudaStream_t stream) {
  return with_bits(kind, [&](auto bits_tag) {
    using Bits = decltype(bits_tag);
    if constexpr (same_type<Bits, uint64_t>::value) {
      return cudaErrorInvalidValue;
    } else {
      constexpr int kCols = Cutlass<Bits>::kGroup * Cutlass<Bits>::kNibbles;
      const RowTiles tiles = row_tiles(rows, cols / kCols);
      if (tiles.blocks == 0) return cudaSuccess;
      decompress_cutlass_kernel<Bits><<<tiles.blocks, kThreads, 0, stream>>>(
          static_cast<const Bits*>(values), static_cast<const typename CutlassMeta<Bits>::bits*>(metadata), rows,
          cols, tiles.rows_per_block, static_cast<Bits*>(dense));
      return cudaGetLastError();
    }
  });
}

}  // namespace nxm::cuda
#endif  // __CUDACC_RTC__
