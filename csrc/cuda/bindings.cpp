// CUDA implementations of the nxm ops: check -> allocate -> launch (nm_kernels.cu) on the current
// stream; a failed launch raises with CUDA's reason.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../op_common.h"
#include "launch.h"

namespace nxm {
namespace {

using cuda::ScoreKind;
using cuda::ValueKind;

// Checked before anything touches CUDA, so that a machine without a GPU gets this sentence.
void check_gpu(const at::Tensor& t, const char* op) {
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess) (void)cudaGetLastError();  // clear it: the next CUDA call must not see it
  TORCH_CHECK(status == cudaSuccess && devices > 0, op,
              ": the nxm CUDA kernels need an NVIDIA GPU, but CUDA finds none on this machine (",
              status == cudaSuccess ? "0 devices" : cudaGetErrorString(status),
              "): use CPU tensors (nxm's C++ CPU ops) or run on a machine with a GPU");
  TORCH_CHECK(t.is_cuda(), op, ": expected CUDA tensors, got a tensor on ", t.device());
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

ValueKind value_kind(at::ScalarType t) {
  switch (t) {
    case at::kChar: return ValueKind::Int8;
    case at::kHalf:
    case at::kBFloat16: return ValueKind::Bits16;
    case at::kFloat: return ValueKind::Bits32;
    case at::kDouble: return ValueKind::Bits64;
    default: TORCH_CHECK(false, "nxm: unsupported dtype ", t);
  }
}

// (kind, contiguous scores or an undefined tensor) for the launchers.
std::pair<ScoreKind, at::Tensor> score_input(const std::optional<at::Tensor>& scores) {
  if (!scores) return {ScoreKind::Magnitude, at::Tensor()};
  const ScoreKind kind = scores->scalar_type() == at::kDouble ? ScoreKind::Float64 : ScoreKind::Float32;
  return {kind, scores->contiguous()};
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

at::Tensor select_cuda(const at::Tensor& w_in, int64_t n, int64_t m, const std::optional<at::Tensor>& scores,
                       bool project, const char* op) {
  check_gpu(w_in, op);
  check_selection(w_in, n, m, scores, op);
  const c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = w_in.contiguous();
  const auto [score_kind, s] = score_input(scores);
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(project ? w.scalar_type() : at::kBool));
  const int64_t cols = w.size(-1), rows = cols ? w.numel() / cols : 0;
  check_launch(cuda::select(value_kind(w.scalar_type()), w.const_data_ptr(), score_kind, data_or_null(s), rows, cols,
                            int(n), int(m), project, out.mutable_data_ptr(), at::cuda::getCurrentCUDAStream()),
               op);
  return out;
}

at::Tensor nm_mask_cuda(const at::Tensor& w, int64_t n, int64_t m, const std::optional<at::Tensor>& scores) {
  return select_cuda(w, n, m, scores, /*project=*/false, "nxm::nm_mask");
}

at::Tensor project_cuda(const at::Tensor& w, int64_t n, int64_t m, const std::optional<at::Tensor>& scores) {
  return select_cuda(w, n, m, scores, /*project=*/true, "nxm::project");
}

std::tuple<at::Tensor, at::Tensor> compress_packed_cuda(const at::Tensor& w_in, int64_t n, int64_t m,
                                                        const std::optional<at::Tensor>& scores) {
  const char* op = "nxm::compress_packed";
  check_gpu(w_in, op);
  check_selection(w_in, n, m, scores, op);
  check_2d(w_in, "w", op);
  TORCH_CHECK(is_cutlass_dtype(w_in.scalar_type()), op, ": unsupported dtype ", w_in.scalar_type());
  const c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = w_in.contiguous();
  const auto [score_kind, s] = score_input(scores);
  const int64_t rows = w.size(0), cols = w.size(1);
  at::Tensor values = at::empty({rows, cols / m * n}, w.options());
  at::Tensor metadata =
      at::empty({rows, packed_row_bytes(cols / m, int(n), index_bits(int(m)))}, w.options().dtype(at::kByte));
  check_launch(cuda::compress_packed(value_kind(w.scalar_type()), w.const_data_ptr(), score_kind, data_or_null(s), rows,
                                     cols, int(n), int(m), values.mutable_data_ptr(),
                                     metadata.mutable_data_ptr<uint8_t>(), at::cuda::getCurrentCUDAStream()),
               op);
  return {values, metadata};
}

at::Tensor decompress_packed_cuda(const at::Tensor& values_in, const at::Tensor& metadata_in, int64_t cols, int64_t n,
                                  int64_t m) {
  const char* op = "nxm::decompress_packed";
  check_gpu(values_in, op);
  check_packed_storage(values_in, metadata_in, cols, n, m, op);
  const c10::cuda::CUDAGuard guard(values_in.device());
  const at::Tensor values = values_in.contiguous(), metadata = metadata_in.contiguous();
  at::Tensor dense = at::empty({values.size(0), cols}, values.options());
  check_launch(cuda::decompress_packed(value_kind(values.scalar_type()), values.const_data_ptr(),
                                       metadata.const_data_ptr<uint8_t>(), values.size(0), cols, int(n), int(m),
                                       dense.mutable_data_ptr(), at::cuda::getCurrentCUDAStream()),
               op);
  return dense;
}

std::tuple<at::Tensor, at::Tensor> compress_cutlass_cuda(const at::Tensor& w_in, const std::optional<at::Tensor>& scores) {
  const char* op = "nxm::compress_cutlass";
  check_gpu(w_in, op);
  const auto t = w_in.scalar_type();
  const int64_t group = t == at::kFloat ? 2 : 4;
  check_selection(w_in, group / 2, group, scores, op);
  check_2d(w_in, "w", op);
  check_cutlass_shape(t, w_in.size(0), w_in.size(1), op);
  const c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = w_in.contiguous();
  const auto [score_kind, s] = score_input(scores);
  const int64_t rows = w.size(0), cols = w.size(1);
  at::Tensor values = at::empty({rows, cols / 2}, w.options());
  at::Tensor metadata = at::empty({rows, cols / cutlass_cols_per_meta(t)}, w.options().dtype(cutlass_meta_dtype(t)));
  check_launch(cuda::compress_cutlass(value_kind(t), w.const_data_ptr(), score_kind, data_or_null(s), rows, cols,
                                      values.mutable_data_ptr(), metadata.mutable_data_ptr(),
                                      at::cuda::getCurrentCUDAStream()),
               op);
  return {values, metadata};
}

at::Tensor decompress_cutlass_cuda(const at::Tensor& values_in, const at::Tensor& metadata_in) {
  const char* op = "nxm::decompress_cutlass";
  check_gpu(values_in, op);
  check_cutlass_storage(values_in, metadata_in, op);
  const c10::cuda::CUDAGuard guard(values_in.device());
  const at::Tensor values = values_in.contiguous(), metadata = metadata_in.contiguous();
  const int64_t rows = values.size(0), cols = values.size(1) * 2;
  at::Tensor dense = at::empty({rows, cols}, values.options());
  check_launch(cuda::decompress_cutlass(value_kind(values.scalar_type()), values.const_data_ptr(),
                                        metadata.const_data_ptr(), rows, cols, dense.mutable_data_ptr(),
                                        at::cuda::getCurrentCUDAStream()),
               op);
  return dense;
}

}  // namespace

// The schemas and fake kernels of these ops: nxm_kernels/_ops.py.
TORCH_LIBRARY_IMPL(nxm, CUDA, m) {
  m.impl("nm_mask", &nm_mask_cuda);
  m.impl("project", &project_cuda);
  m.impl("compress_packed", &compress_packed_cuda);
  m.impl("decompress_packed", &decompress_packed_cuda);
  m.impl("compress_cutlass", &compress_cutlass_cuda);
  m.impl("decompress_cutlass", &decompress_cutlass_cuda);
}

}  // namespace nxm
