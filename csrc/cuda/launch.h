// Host entry points of the CUDA kernels in nm_kernels.cu: plain pointers, no torch types, so the
// .cu files compile without torch headers. Each launches on `stream` and returns the launch's
// cudaError_t, which bindings.cpp turns into an exception.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace nxm::cuda {

// The raw-bits type of the values (see nm_core.h).
enum class ValueKind : int { Int8, Bits16, Bits32, Bits64 };
// What selection compares: |w|, or float32 / float64 scores of w's shape.
enum class ScoreKind : int { Magnitude, Float32, Float64 };

// nm_mask (out: bool) or project (out: w's dtype) of a contiguous [rows, cols] view of w.
cudaError_t select(ValueKind kind, const void* w, ScoreKind score_kind, const void* scores, int64_t rows,
                   int64_t cols, int n, int m, bool project, void* out, cudaStream_t stream);

cudaError_t compress_packed(ValueKind kind, const void* w, ScoreKind score_kind, const void* scores, int64_t rows,
                            int64_t cols, int n, int m, void* values, uint8_t* metadata, cudaStream_t stream);

cudaError_t decompress_packed(ValueKind kind, const void* values, const uint8_t* metadata, int64_t rows, int64_t cols,
                              int n, int m, void* dense, cudaStream_t stream);

// kind: Int8 (2:4, int32 metadata), Bits16 (2:4, int16) or Bits32 (fp32 1:2, int16).
cudaError_t compress_cutlass(ValueKind kind, const void* w, ScoreKind score_kind, const void* scores, int64_t rows,
                             int64_t cols, void* values, void* metadata, cudaStream_t stream);

cudaError_t decompress_cutlass(ValueKind kind, const void* values, const void* metadata, int64_t rows, int64_t cols,
                               void* dense, cudaStream_t stream);

}  // namespace nxm::cuda
