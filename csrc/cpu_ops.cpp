// CPU kernels of the nxm ops: at::parallel_for over rows (or groups), nm_core.h per unit.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "nm_core.h"
#include "op_common.h"

namespace nxm {
namespace {

// The x86-64 baseline (SSE2) leaves half the speed of the vectorised loops below unused: also build
// an AVX2 clone of them, picked at load time on CPUs that have AVX2.
#if defined(__x86_64__) && defined(__GNUC__)
#define NXM_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define NXM_SIMD_CLONES
#endif

// Enough work per parallel task to amortise the thread hand-off.
constexpr int64_t kGrainElements = 1 << 15;

int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1)); }

// Calls f(Bits{}) with the raw-bits type of dtype t (see nm_core.h).
template <typename F>
void with_bits(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kChar: return f(int8_t{});
    case at::kHalf:
    case at::kBFloat16: return f(uint16_t{});
    case at::kFloat: return f(uint32_t{});
    case at::kDouble: return f(uint64_t{});
    default: TORCH_CHECK(false, "nxm: unsupported dtype ", t);
  }
}

template <typename Bits>
const Bits* bits_of(const at::Tensor& t) { return static_cast<const Bits*>(t.const_data_ptr()); }
template <typename Bits>
Bits* mutable_bits_of(at::Tensor& t) { return static_cast<Bits*>(t.mutable_data_ptr()); }

// Calls f(keys) with the selection keys: |w| or the (contiguous) scores.
template <typename Bits, typename F>
void with_keys(const Bits* w, const std::optional<at::Tensor>& scores, F&& f) {
  if (!scores) return f(MagnitudeKeys<Bits>{w});
  if (scores->scalar_type() == at::kDouble) return f(ScoreKeys<double>{scores->const_data_ptr<double>()});
  return f(ScoreKeys<float>{scores->const_data_ptr<float>()});
}

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// Calls f(std::integral_constant<int, M>) with M = m for the common group sizes, so that their
// loops unroll and vectorise, else with M = 0 (m known at run time only).
template <typename F>
void with_group_size(int64_t m, F&& f) {
  switch (m) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

// nm_mask (Out = bool) or project (Out = Bits) of groups [begin, end).
template <int M, typename Out, typename Bits, typename Keys>
NXM_SIMD_CLONES void select_groups(const Bits* __restrict w, const Keys& keys, int64_t begin, int64_t end, int n,
                                   int m, Out* __restrict out) {
  const int size = M > 0 ? M : m;
  for (int64_t g = begin; g < end; ++g) {
    int rank[M > 0 ? M : kMaxGroup];
    group_ranks<M>(keys, g * size, size, rank);
    NXM_UNROLL
    for (int i = 0; i < size; ++i) {
      if constexpr (std::is_same_v<Out, bool>) {
        out[g * size + i] = rank[i] < n;
      } else {
        out[g * size + i] = pick(rank[i] < n, w[g * size + i], Bits(0));
      }
    }
  }
}

at::Tensor select_cpu(const at::Tensor& w_in, int64_t n, int64_t m, const std::optional<at::Tensor>& scores_in,
                      bool project, const char* op) {
  check_selection(w_in, n, m, scores_in, op);
  const at::Tensor w = w_in.contiguous();
  const auto scores = contiguous(scores_in);
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(project ? w.scalar_type() : at::kBool));
  const int64_t groups = w.numel() / m;
  with_bits(w.scalar_type(), [&](auto tag) {
    using Bits = decltype(tag);
    const Bits* wp = bits_of<Bits>(w);
    with_keys(wp, scores, [&](auto keys) {
      with_group_size(m, [&](auto group_size) {
        constexpr int M = decltype(group_size)::value;
        at::parallel_for(0, groups, grain_rows(m), [&](int64_t begin, int64_t end) {
          if (project) {
            select_groups<M>(wp, keys, begin, end, int(n), int(m), mutable_bits_of<Bits>(out));
          } else {
            select_groups<M>(wp, keys, begin, end, int(n), int(m), out.mutable_data_ptr<bool>());
          }
        });
      });
    });
  });
  return out;
}

at::Tensor nm_mask_cpu(const at::Tensor& w, int64_t n, int64_t m, const std::optional<at::Tensor>& scores) {
  return select_cpu(w, n, m, scores, /*project=*/false, "nxm::nm_mask");
}

at::Tensor project_cpu(const at::Tensor& w, int64_t n, int64_t m, const std::optional<at::Tensor>& scores) {
  return select_cpu(w, n, m, scores, /*project=*/true, "nxm::project");
}

std::tuple<at::Tensor, at::Tensor> compress_packed_cpu(const at::Tensor& w_in, int64_t n, int64_t m,
                                                       const std::optional<at::Tensor>& scores_in) {
  const char* op = "nxm::compress_packed";
  check_selection(w_in, n, m, scores_in, op);
  check_2d(w_in, "w", op);
  TORCH_CHECK(is_cutlass_dtype(w_in.scalar_type()), op, ": unsupported dtype ", w_in.scalar_type());
  const at::Tensor w = w_in.contiguous();
  const auto scores = contiguous(scores_in);
  const int64_t rows = w.size(0), cols = w.size(1), groups = cols / m;
  const int bits = index_bits(int(m)), chunk = packed_chunk_groups(int(n), bits);
  const int64_t row_bytes = packed_row_bytes(groups, int(n), bits);
  at::Tensor values = at::empty({rows, groups * n}, w.options());
  at::Tensor metadata = at::empty({rows, row_bytes}, w.options().dtype(at::kByte));
  with_bits(w.scalar_type(), [&](auto tag) {
    using Bits = decltype(tag);
    const Bits* wp = bits_of<Bits>(w);
    Bits* vp = mutable_bits_of<Bits>(values);
    uint8_t* mp = metadata.mutable_data_ptr<uint8_t>();
    with_keys(wp, scores, [&](auto keys) {
      with_group_size(m, [&](auto group_size) {
        constexpr int M = decltype(group_size)::value;
        at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            for (int64_t first = 0; first < groups; first += chunk) {
              compress_packed_chunk<M>(wp + r * cols, keys, r * cols, first,
                                       int(std::min<int64_t>(chunk, groups - first)), int(n), int(m), bits,
                                       vp + r * groups * n, mp + r * row_bytes);
            }
          }
        });
      });
    });
  });
  return {values, metadata};
}

at::Tensor decompress_packed_cpu(const at::Tensor& values_in, const at::Tensor& metadata_in, int64_t cols, int64_t n,
                                 int64_t m) {
  check_packed_storage(values_in, metadata_in, cols, n, m, "nxm::decompress_packed");
  const at::Tensor values = values_in.contiguous(), metadata = metadata_in.contiguous();
  const int64_t rows = values.size(0), groups = cols / m, row_bytes = metadata.size(1);
  const int bits = index_bits(int(m)), chunk = packed_chunk_groups(int(n), bits);
  at::Tensor dense = at::empty({rows, cols}, values.options());
  with_bits(values.scalar_type(), [&](auto tag) {
    using Bits = decltype(tag);
    const Bits* vp = bits_of<Bits>(values);
    const uint8_t* mp = metadata.const_data_ptr<uint8_t>();
    Bits* dp = mutable_bits_of<Bits>(dense);
    at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t first = 0; first < groups; first += chunk) {
          decompress_packed_chunk(vp + r * groups * n, mp + r * row_bytes, first,
                                  int(std::min<int64_t>(chunk, groups - first)), int(n), int(m), bits, dp + r * cols);
        }
      }
    });
  });
  return dense;
}

// One row of the cutlass layout, group by group (the loop vectorises): values and one nibble per group.
template <typename Bits, typename Keys>
NXM_SIMD_CLONES void cutlass_row(const Bits* __restrict w, const Keys& keys, int64_t keys_base, int64_t groups,
                                 Bits* __restrict values, uint8_t* __restrict nibbles) {
  if constexpr (Cutlass<Bits>::kGroup == 4) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t i = keys_base + 4 * g;
      nibbles[g] = uint8_t(cutlass_group_2of4(keys(i), keys(i + 1), keys(i + 2), keys(i + 3), w[4 * g], w[4 * g + 1],
                                              w[4 * g + 2], w[4 * g + 3], values[2 * g], values[2 * g + 1]));
    }
  } else {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t i = keys_base + 2 * g;
      nibbles[g] = uint8_t(cutlass_pair_1of2(keys(i), keys(i + 1), w[2 * g], w[2 * g + 1], values[g]));
    }
  }
}

template <typename Meta, typename Bits, typename Keys>
void compress_cutlass_rows(const Bits* w, const Keys& keys, int64_t rows, int64_t cols, Bits* values, Meta* meta) {
  constexpr int kGroup = Cutlass<Bits>::kGroup, kNibbles = Cutlass<Bits>::kNibbles;
  const int64_t groups = cols / kGroup, meta_cols = groups / kNibbles;
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> nibbles(groups);
    for (int64_t r = begin; r < end; ++r) {
      cutlass_row(w + r * cols, keys, r * cols, groups, values + r * cols / 2, nibbles.data());
      for (int64_t c = 0; c < meta_cols; ++c) {
        uint32_t word = 0;
        for (int k = 0; k < kNibbles; ++k) word |= uint32_t(nibbles[c * kNibbles + k]) << (4 * k);
        meta[cutlass_meta_offset(r, c, rows, sizeof(Meta) == 2)] = Meta(word);  // two's-complement wrap
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> compress_cutlass_cpu(const at::Tensor& w_in, const std::optional<at::Tensor>& scores_in) {
  const char* op = "nxm::compress_cutlass";
  const auto t = w_in.scalar_type();
  const int64_t group = t == at::kFloat ? 2 : 4;
  check_selection(w_in, group / 2, group, scores_in, op);
  check_2d(w_in, "w", op);
  check_cutlass_shape(t, w_in.size(0), w_in.size(1), op);
  const at::Tensor w = w_in.contiguous();
  const auto scores = contiguous(scores_in);
  const int64_t rows = w.size(0), cols = w.size(1);
  at::Tensor values = at::empty({rows, cols / 2}, w.options());
  at::Tensor metadata = at::empty({rows, cols / cutlass_cols_per_meta(t)}, w.options().dtype(cutlass_meta_dtype(t)));
  with_bits(t, [&](auto tag) {
    using Bits = decltype(tag);
    if constexpr (!std::is_same_v<Bits, uint64_t>) {
      using Meta = std::conditional_t<std::is_same_v<Bits, int8_t>, int32_t, int16_t>;
      const Bits* wp = bits_of<Bits>(w);
      with_keys(wp, scores, [&](auto keys) {
        compress_cutlass_rows(wp, keys, rows, cols, mutable_bits_of<Bits>(values), mutable_bits_of<Meta>(metadata));
      });
    }
  });
  return {values, metadata};
}

at::Tensor decompress_cutlass_cpu(const at::Tensor& values_in, const at::Tensor& metadata_in) {
  check_cutlass_storage(values_in, metadata_in, "nxm::decompress_cutlass");
  const at::Tensor values = values_in.contiguous(), metadata = metadata_in.contiguous();
  const int64_t rows = values.size(0), cols = values.size(1) * 2;
  at::Tensor dense = at::empty({rows, cols}, values.options());
  with_bits(values.scalar_type(), [&](auto tag) {
    using Bits = decltype(tag);
    if constexpr (!std::is_same_v<Bits, uint64_t>) {
      using Meta = std::conditional_t<std::is_same_v<Bits, int8_t>, uint32_t, uint16_t>;  // read without sign extension
      constexpr int64_t kCols = Cutlass<Bits>::kGroup * Cutlass<Bits>::kNibbles;
      const Bits* vp = bits_of<Bits>(values);
      const Meta* mp = bits_of<Meta>(metadata);
      Bits* dp = mutable_bits_of<Bits>(dense);
      at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          for (int64_t c = 0; c < cols / kCols; ++c) {
            const uint32_t word = mp[cutlass_meta_offset(r, c, rows, sizeof(Meta) == 2)];
            decompress_cutlass_element(word, vp + (r * cols + c * kCols) / 2, dp + r * cols + c * kCols);
          }
        }
      });
    }
  });
  return dense;
}

}  // namespace

// The schemas and fake kernels of these ops: nxm_kernels/_ops.py.
TORCH_LIBRARY_IMPL(nxm, CPU, m) {
  m.impl("nm_mask", &nm_mask_cpu);
  m.impl("project", &project_cpu);
  m.impl("compress_packed", &compress_packed_cpu);
  m.impl("decompress_packed", &decompress_packed_cpu);
  m.impl("compress_cutlass", &compress_cutlass_cpu);
  m.impl("decompress_cutlass", &decompress_cutlass_cpu);
}

}  // namespace nxm
