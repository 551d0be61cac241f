// CPU GEMM y = x @ W^T (+ bias) of a weight in the block layout (nxm_kernels/layouts/block.py): every
// R x C block keeps `kept` entries, stored as its kept values in row-major order plus a bitmap (entry i
// at bit i%8 of byte i//8), or, for a mask library, a mask number into a table of such bitmaps.
// Specification: reference.sparse_mm. Schema of sparse_mm_block: nxm_kernels/_ops.py.
//
// Threads take whole block rows (R output rows). Kernels (chosen at run time):
//   avx512    4x4 blocks in cpu_block_gemm_avx512.cpp: one vexpandps decodes a block into a register
//   portable  every block here: a block row is decoded once into its dense rows (fp32, zeros where
//             nothing is kept), then dense dot products with every row of x, 16 partial sums each
//             (vectorised; an AVX2 clone where the CPU has it).
// Both take x in fp32 (converted once per call), accumulate in fp32 and round once to the output dtype.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "cpu_gemm.h"
#include "cpu_isa.h"
#include "op_common.h"

namespace nxm {
namespace {

constexpr const char* kOp = "nxm::sparse_mm_block";
constexpr int kLanes = 16;  // partial sums per dot product

using BlockGemm = cpu_block_gemm::Args;

// The AVX-512 kernel on CPUs that have it, unless NXM_CPU_ISA (read at every call, as the packed GEMM
// does) asks for a lower set: this op has no AVX2 kernel, so "avx2" runs the portable one.
bool use_avx512() {
  static const bool has = [] {
#if NXM_X86_KERNELS
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
#else
    return false;
#endif
  }();
  return has && isa_level::allows(isa_level::Level::kAvx512, kOp);
}

// The bitmap of block (block_row, block_col); nullptr for a mask number outside the library (only in
// unchecked corrupt metadata: that block contributes nothing).
const uint8_t* bitmap_of(const BlockGemm& g, int64_t block_row, int64_t block_col) {
  const int64_t grid_cols = g.k / g.cols;
  if (g.masks == nullptr) return g.bitmaps + (block_row * grid_cols + block_col) * g.bitmap_bytes;
  const int64_t at = block_row * grid_cols + block_col;
  const int64_t number = g.numbers_int16 ? int64_t(static_cast<const int16_t*>(g.numbers)[at])
                                         : int64_t(static_cast<const uint8_t*>(g.numbers)[at]);
  return number >= 0 && number < g.mask_count ? g.masks + number * g.bitmap_bytes : nullptr;
}

// The x86-64 baseline (SSE2) leaves most of a dot product's speed unused: also build an AVX2 clone,
// picked at load time on CPUs that have it.
#if NXM_X86_KERNELS
#define NXM_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define NXM_SIMD_CLONES
#endif

// Dense dot product, kLanes independent partial sums (vectorised), combined pairwise.
NXM_SIMD_CLONES float dot(const float* __restrict a, const float* __restrict b, int64_t k) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  for (; i < k; ++i) acc[i % kLanes] += a[i] * b[i];
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
  return acc[0];
}

template <typename Value>
void gemm_block_rows(const BlockGemm& g, int64_t begin, int64_t end) {
  const int64_t grid_cols = g.k / g.cols;
  const int64_t entries = g.rows * g.cols;
  // The block row decoded into its dense rows (fp32, zeros where nothing is kept), once per block row.
  std::vector<float> panel(g.rows * g.k);
  std::vector<int64_t> offset(entries);  // of block entry e in the panel, from its block's first column
  for (int64_t e = 0; e < entries; ++e) offset[e] = e / g.cols * g.k + e % g.cols;
  for (int64_t block_row = begin; block_row < end; ++block_row) {
    std::fill(panel.begin(), panel.end(), 0.0f);
    const Value* values = static_cast<const Value*>(g.values) + block_row * grid_cols * g.kept;
    for (int64_t block_col = 0; block_col < grid_cols; ++block_col) {
      const uint8_t* bitmap = bitmap_of(g, block_row, block_col);
      if (bitmap == nullptr) continue;
      float* corner = panel.data() + block_col * g.cols;
      const Value* kept = values + block_col * g.kept;
      int64_t slot = 0;  // the kept entries of a block, in row-major order, are its values in order
      for (int64_t byte = 0; byte < g.bitmap_bytes && slot < g.kept; ++byte) {
        for (unsigned bits = bitmap[byte]; bits != 0 && slot < g.kept; bits &= bits - 1) {
          const int64_t e = 8 * byte + __builtin_ctz(bits);
          if (e < entries) corner[offset[e]] = float(kept[slot++]);
        }
      }
    }
    for (int64_t r = 0; r < g.rows; ++r) {
      const int64_t out = block_row * g.rows + r;
      const float b = g.bias ? g.bias[out] : 0.0f;
      for (int64_t i = 0; i < g.m_rows; ++i)
        static_cast<Value*>(g.y)[i * g.n + out] = Value(dot(panel.data() + r * g.k, g.x + i * g.k, g.k) + b);
    }
  }
}

at::Tensor sparse_mm_block_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& metadata,
                               const std::optional<at::Tensor>& masks, const std::optional<at::Tensor>& bias,
                               int64_t block_rows, int64_t block_cols, int64_t kept) {
  check_2d(x, "x", kOp);
  check_2d(values, "values", kOp);
  check_2d(metadata, "metadata", kOp);
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, kOp,
              ": x must be float32, bfloat16 or float16, got ", t);
  TORCH_CHECK(values.scalar_type() == t, kOp, ": x is ", t, " but the weight is ", values.scalar_type(),
              ": cast one to match");
  TORCH_CHECK(block_rows >= 1 && block_cols >= 1 && block_rows * block_cols <= 256 && 1 <= kept &&
                  kept < block_rows * block_cols,
              kOp, ": unsupported block ", kept, ":", block_rows, "x", block_cols,
              " (need 1 <= kept < rows * cols <= 256)");
  const int64_t k = x.size(1), grid_rows = values.size(0);
  TORCH_CHECK(k % block_cols == 0, kOp, ": in_features=", k, " is not a multiple of the block's ", block_cols,
              " columns");
  const int64_t grid_cols = k / block_cols, bitmap_bytes = (block_rows * block_cols + 7) / 8;
  TORCH_CHECK(values.size(1) == grid_cols * kept, kOp, ": values have shape ", values.sizes(), ", expected [",
              grid_rows, ", ", grid_cols * kept, "]");
  if (masks) {
    TORCH_CHECK(masks->dim() == 2 && masks->scalar_type() == at::kByte && masks->size(1) == bitmap_bytes, kOp,
                ": masks must be uint8 [count, ", bitmap_bytes, "], got ", masks->scalar_type(), " ", masks->sizes());
    TORCH_CHECK((metadata.scalar_type() == at::kByte || metadata.scalar_type() == at::kShort) &&
                    metadata.size(0) == grid_rows && metadata.size(1) == grid_cols,
                kOp, ": mask numbers must be uint8 or int16 [", grid_rows, ", ", grid_cols, "], got ",
                metadata.scalar_type(), " ", metadata.sizes());
  } else {
    TORCH_CHECK(metadata.scalar_type() == at::kByte && metadata.size(0) == grid_rows &&
                    metadata.size(1) == grid_cols * bitmap_bytes,
                kOp, ": bitmaps must be uint8 [", grid_rows, ", ", grid_cols * bitmap_bytes, "], got ",
                metadata.scalar_type(), " ", metadata.sizes());
  }
  const int64_t n = grid_rows * block_rows;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == t, kOp, ": bias must be ", t,
                " [", n, "], got ", bias->scalar_type(), " ", bias->sizes());
  }
  TORCH_CHECK(values.device() == x.device() && metadata.device() == x.device() &&
                  (!masks || masks->device() == x.device()),
              kOp, ": x, values, metadata and masks must be on one device");

  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const at::Tensor bias32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor v = values.contiguous(), meta = metadata.contiguous();
  const at::Tensor table = masks ? masks->contiguous() : at::Tensor();
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  if (y.numel() == 0) return y;

  const bool simd = NXM_X86_KERNELS && block_rows == 4 && block_cols == 4 && use_avx512();
  // The SIMD kernel writes fp32, rounded once to the output dtype below.
  at::Tensor y32 = simd && t != at::kFloat ? at::empty({x.size(0), n}, x.options().dtype(at::kFloat)) : y;
  const cpu_gemm::Dtype dtype = t == at::kFloat ? cpu_gemm::Dtype::kFloat32
                                : t == at::kBFloat16 ? cpu_gemm::Dtype::kBFloat16 : cpu_gemm::Dtype::kFloat16;
  BlockGemm g{x32.const_data_ptr<float>(), x.size(0), k, block_rows, block_cols, kept, bitmap_bytes,
              v.const_data_ptr(), dtype, masks ? nullptr : meta.const_data_ptr<uint8_t>(),
              masks ? meta.const_data_ptr() : nullptr, meta.scalar_type() == at::kShort,
              masks ? table.const_data_ptr<uint8_t>() : nullptr, masks ? table.size(0) : 0,
              bias ? bias32.const_data_ptr<float>() : nullptr, y32.mutable_data_ptr(), n};
  // Tasks of at least ~64K multiply-adds, so that the thread hand-off stays small on a small layer.
  const int64_t work_per_block_row = std::max<int64_t>(1, x.size(0) * k * kept / block_cols);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / work_per_block_row);
  at::parallel_for(0, grid_rows, grain, [&](int64_t begin, int64_t end) {
#if NXM_X86_KERNELS
    if (simd) return cpu_block_gemm::gemm_4x4_avx512(g, begin, end);
#endif
    switch (t) {
      case at::kFloat: return gemm_block_rows<float>(g, begin, end);
      case at::kBFloat16: return gemm_block_rows<c10::BFloat16>(g, begin, end);
      default: return gemm_block_rows<c10::Half>(g, begin, end);
    }
  });
  if (y32.data_ptr() != y.data_ptr()) y.copy_(y32);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(nxm, CPU, m) { m.impl("sparse_mm_block", &sparse_mm_block_cpu); }

}  // namespace nxm
