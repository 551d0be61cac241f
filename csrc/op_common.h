// Input checks and output shapes shared by the CPU ops and the CUDA bindings. ops.py has already
// validated user input; these checks guard direct torch.ops.nxm calls against crashes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "nm_core.h"

namespace nxm {

inline void check_pattern(int64_t n, int64_t m, const char* op) {
  TORCH_CHECK(1 <= n && n < m && m <= kMaxGroup, op, ": unsupported pattern ", n, ":", m,
              ", need 1 <= n < m <= ", kMaxGroup);
}

inline bool is_selectable(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble || t == at::kChar;
}

inline bool is_cutlass_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kChar;
}

// w: any shape [..., cols] with cols % m == 0; scores: float32/float64 of the same shape and device.
inline void check_selection(const at::Tensor& w, int64_t n, int64_t m, const std::optional<at::Tensor>& scores,
                            const char* op) {
  check_pattern(n, m, op);
  TORCH_CHECK(is_selectable(w.scalar_type()), op, ": unsupported dtype ", w.scalar_type(),
              " (float16, bfloat16, float32, float64 or int8)");
  TORCH_CHECK(w.dim() >= 1 && w.size(-1) % m == 0, op, ": the last dimension of w (shape ", w.sizes(),
              ") must split into groups of ", m);
  if (scores) {
    TORCH_CHECK(scores->scalar_type() == at::kFloat || scores->scalar_type() == at::kDouble, op,
                ": scores must be float32 or float64, got ", scores->scalar_type());
    TORCH_CHECK(scores->sizes() == w.sizes(), op, ": scores have shape ", scores->sizes(), ", w has ", w.sizes());
    TORCH_CHECK(scores->device() == w.device(), op, ": scores are on ", scores->device(), ", w on ", w.device());
  }
}

inline void check_2d(const at::Tensor& t, const char* what, const char* op) {
  TORCH_CHECK(t.dim() == 2, op, ": ", what, " must be 2-D, got shape ", t.sizes());
}

// (rows, cols) multiples of the cutlass layout (formats.cutlass_multiples).
inline int64_t cutlass_row_multiple(at::ScalarType t) { return t == at::kChar ? 16 : 32; }
inline int64_t cutlass_col_multiple(at::ScalarType t) { return t == at::kChar ? 32 : 16; }
inline at::ScalarType cutlass_meta_dtype(at::ScalarType t) { return t == at::kChar ? at::kInt : at::kShort; }
// Dense columns covered by one metadata element (one group per nibble).
inline int64_t cutlass_cols_per_meta(at::ScalarType t) {
  return t == at::kChar ? 32 : (t == at::kFloat ? 8 : 16);
}

inline void check_cutlass_shape(at::ScalarType t, int64_t rows, int64_t cols, const char* op) {
  TORCH_CHECK(is_cutlass_dtype(t), op, ": the cutlass layout holds float16, bfloat16, float32 or int8, got ", t);
  TORCH_CHECK(rows % cutlass_row_multiple(t) == 0 && cols % cutlass_col_multiple(t) == 0, op,
              ": the cutlass layout for ", t, " needs rows divisible by ", cutlass_row_multiple(t),
              " and columns by ", cutlass_col_multiple(t), ", got ", rows, "x", cols);
}

inline void check_packed_storage(const at::Tensor& values, const at::Tensor& metadata, int64_t cols, int64_t n,
                                 int64_t m, const char* op) {
  check_pattern(n, m, op);
  check_2d(values, "values", op);
  check_2d(metadata, "metadata", op);
  TORCH_CHECK(is_cutlass_dtype(values.scalar_type()), op, ": unsupported values dtype ", values.scalar_type());
  TORCH_CHECK(cols >= 0 && cols % m == 0, op, ": cols=", cols, " must be a multiple of m=", m);
  const int64_t rows = values.size(0);
  const int64_t row_bytes = packed_row_bytes(cols / m, int(n), index_bits(int(m)));
  TORCH_CHECK(values.size(1) == cols / m * n, op, ": values have shape ", values.sizes(), ", expected [", rows,
              ", ", cols / m * n, "]");
  TORCH_CHECK(metadata.scalar_type() == at::kByte && metadata.size(0) == rows && metadata.size(1) == row_bytes,
              op, ": metadata must be uint8 [", rows, ", ", row_bytes, "], got ", metadata.scalar_type(), " ",
              metadata.sizes());
  TORCH_CHECK(values.device() == metadata.device(), op, ": values and metadata are on different devices");
}

inline void check_cutlass_storage(const at::Tensor& values, const at::Tensor& metadata, const char* op) {
  check_2d(values, "values", op);
  check_2d(metadata, "metadata", op);
  const auto t = values.scalar_type();
  const int64_t rows = values.size(0), cols = values.size(1) * 2;
  check_cutlass_shape(t, rows, cols, op);
  TORCH_CHECK(metadata.scalar_type() == cutlass_meta_dtype(t) && metadata.size(0) == rows &&
                  metadata.size(1) == cols / cutlass_cols_per_meta(t),
              op, ": metadata must be ", cutlass_meta_dtype(t), " [", rows, ", ", cols / cutlass_cols_per_meta(t),
              "], got ", metadata.scalar_type(), " ", metadata.sizes());
  TORCH_CHECK(values.device() == metadata.device(), op, ": values and metadata are on different devices");
}

}  // namespace nxm
