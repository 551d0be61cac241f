// W8A8 on CPU: y = x @ W^T (+ bias) with x quantized per token to int8 and W's int8/int4 codes,
// integer dot products, then both scales. Equal, bit for bit, to reference.sparse_mm_int:
//   1. each row of x quantized once: scale = absmax / 127 (float64, rounded once to fp32), codes
//      round(x / scale) half to even, nudged to within half a step, clamped to [-127, 127];
//   2. per scale group j, acc_j = the int32 dot of the codes (exact while it fits int32);
//   3. y = 0; y = y + fp32(acc_j) * scale_j for j in order; y = y * x_scale; y = y + bias; each
//      product and sum rounded to fp32 on its own (no fused multiply-add); then x's dtype.
//
// Kernels (chosen at run time; NXM_CPU_ISA=portable forces the portable one):
//   avx512    2:4, group_size 0 or a multiple of 64, in cpu_gemm_w8a8_avx512.cpp (VNNI + VBMI)
//   portable  every n:m and group size here, plain C++.
// The schema of sparse_mm_packed_w8a8: nxm_kernels/_ops.py.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu_gemm.h"
#include "cpu_isa.h"
#include "packed_indices.h"
#include "op_common.h"

namespace nxm {
namespace {

constexpr const char* kOp = "nxm::sparse_mm_packed_w8a8";

// Whether the AVX-512 kernels run: the CPU (and OS) has F, BW, VL, VNNI and VBMI, and NXM_CPU_ISA
// (read at every call, as by the float GEMM) does not ask for a lower instruction set ("amx", the
// float GEMM's top level, has no int8 kernel here: it runs the AVX-512 one).
bool use_avx512() {
#if NXM_X86_KERNELS
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("avx512vbmi");
  }();
#else
  const bool has = false;
#endif
  return has && isa_level::allows(isa_level::Level::kAvx512, kOp);
}

// A value passed through memory: rounded to its type, so that no multiply-add can be fused across
// it, whatever the target and -ffp-contract (this file has the baseline flags of every platform).
template <typename T>
T rounded(T v) {
  volatile T r = v;
  return r;
}

// Step 1, portable: rows [begin, end) of x (fp32) -> codes + 128 and scales.
void quantize_rows_portable(const float* x, int64_t x_stride, int64_t k, int64_t begin, int64_t end, uint8_t* xq,
                            int64_t xq_stride, float* x_scales) {
  for (int64_t row = begin; row < end; ++row) {
    const float* xr = x + row * x_stride;
    uint8_t* qr = xq + row * xq_stride;
    double absmax = 0.0;
    for (int64_t c = 0; c < k; ++c) {
      const double v = std::fabs(double(xr[c]));
      absmax = std::isnan(v) || std::isnan(absmax) ? NAN : std::max(absmax, v);
    }
    float scale = float(absmax / 127.0);
    if (absmax > 0 && scale == 0.0f) scale = 0x1p-149f;  // the smallest fp32 step, as the reference
    x_scales[row] = scale;
    const double step = scale;
    const double safe = step > 0 ? step : 1.0;
    for (int64_t c = 0; c < k; ++c) {
      const double v = xr[c];
      double q = std::nearbyint(v / safe);
      const double residual = v - rounded(q * safe);
      q += (residual > safe / 2) - (residual < -safe / 2);
      // (an infinite x gives a NaN code: 0, as the AVX-512 kernel's conversion gives)
      q = step > 0 && !std::isnan(q) ? std::min(std::max(q, -127.0), 127.0) : 0.0;
      qr[c] = uint8_t(int(q) + 128);
    }
    for (int64_t c = k; c < xq_stride; ++c) qr[c] = 128;
  }
}

// Steps 2-3, portable, any n:m: output rows [begin, end) into y (fp32).
void gemm_portable(const cpu_gemm::W8A8Args& a, int n, int m, int64_t begin, int64_t end) {
  const int64_t kept = a.k / m * n;
  // kept values per scale group (group_size is a multiple of m); one group without one
  const int64_t group_kept = a.group_size > 0 ? a.group_size / m * n : std::max<int64_t>(kept, 1);
  std::vector<int64_t> columns(kept);
  std::vector<uint8_t> valid(kept);
  std::vector<int32_t> codes(kept);
  for (int64_t row = begin; row < end; ++row) {
    packed_row_columns(a.meta + row * a.meta_stride, kept, n, m, columns.data(), valid.data());
    for (int64_t s = 0; s < kept; ++s) {
      int code;
      if (a.code_bits == 8) {
        code = static_cast<const int8_t*>(a.values)[row * kept + s];
      } else {  // two per byte, low nibble first, 4-bit two's complement
        const uint8_t byte = static_cast<const uint8_t*>(a.values)[row * ((kept + 1) / 2) + s / 2];
        code = (int((s % 2 ? byte >> 4 : byte) & 0xF) ^ 8) - 8;
      }
      codes[s] = valid[s] ? code : 0;  // a corrupt index contributes nothing
    }
    const int64_t groups = a.group_size > 0 ? (a.k + a.group_size - 1) / a.group_size : 1;
    for (int64_t i = 0; i < a.m_rows; ++i) {
      const uint8_t* x = a.xq + i * a.xq_stride;
      float y = 0.0f;
      for (int64_t j = 0; j < groups; ++j) {
        int64_t dot = 0;
        for (int64_t s = j * group_kept; s < std::min(kept, (j + 1) * group_kept); ++s)
          dot += int64_t(int(x[columns[s]]) - 128) * codes[s];
        const int32_t acc = int32_t(uint32_t(uint64_t(dot)));  // int32, wrapping as the SIMD kernel
        y = y + rounded(float(acc) * a.scales[row * a.scale_stride + j]);
      }
      float v = rounded(y * a.x_scales[i]);
      if (a.bias) v = v + a.bias[row];
      a.y[i * a.y_stride + row] = v;
    }
  }
}

at::Tensor sparse_mm_packed_w8a8_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& metadata,
                                     const at::Tensor& scales, const std::optional<at::Tensor>& bias, int64_t n,
                                     int64_t m, int64_t bits, int64_t group_size) {
  check_2d(x, "x", kOp);
  check_2d(values, "values", kOp);
  check_2d(scales, "scales", kOp);
  check_pattern(n, m, kOp);
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, kOp,
              ": x must be float32, bfloat16 or float16 (it is quantized per row), got ", t);
  const int64_t rows = x.size(0), cols = x.size(1), out_features = values.size(0);
  TORCH_CHECK(cols % m == 0, kOp, ": in_features=", cols, " must be a multiple of m=", m);
  TORCH_CHECK(bits == 8 || bits == 4, kOp, ": bits must be 8 or 4, got ", bits);
  const int64_t kept = cols / m * n;
  const at::ScalarType code_dtype = bits == 8 ? at::kChar : at::kByte;
  const int64_t value_cols = bits == 8 ? kept : (kept + 1) / 2;
  TORCH_CHECK(values.scalar_type() == code_dtype && values.size(1) == value_cols, kOp, ": values must be ",
              code_dtype, " [", out_features, ", ", value_cols, "], got ", values.scalar_type(), " ", values.sizes());
  const int64_t row_bytes = packed_row_bytes(cols / m, int(n), index_bits(int(m)));
  TORCH_CHECK(metadata.scalar_type() == at::kByte && metadata.dim() == 2 && metadata.size(0) == out_features &&
                  metadata.size(1) == row_bytes,
              kOp, ": metadata must be uint8 [", out_features, ", ", row_bytes, "], got ", metadata.scalar_type(), " ",
              metadata.sizes());
  TORCH_CHECK(group_size == 0 || (group_size > 0 && group_size % m == 0), kOp,
              ": group_size must be 0 (one scale per row) or a positive multiple of m=", m, ", got ", group_size);
  const int64_t groups = group_size > 0 ? (cols + group_size - 1) / group_size : 1;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.size(0) == out_features && scales.size(1) == groups, kOp,
              ": scales must be float32 [", out_features, ", ", groups, "], got ", scales.scalar_type(), " ",
              scales.sizes());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features && bias->scalar_type() == t, kOp,
                ": bias must be ", t, " [", out_features, "], got ", bias->scalar_type(), " ", bias->sizes());
  }
  const bool simd = use_avx512();

  at::Tensor y32 = at::empty({rows, out_features}, x.options().dtype(at::kFloat));
  if (rows == 0 || out_features == 0) return t == at::kFloat ? y32 : y32.to(t);
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const int64_t xq_stride = (cols + cpu_gemm::kW8A8Step - 1) / cpu_gemm::kW8A8Step * cpu_gemm::kW8A8Step;
  const at::Tensor xq = at::empty({rows, xq_stride}, x.options().dtype(at::kByte));
  const at::Tensor x_scales = at::empty({rows}, x.options().dtype(at::kFloat));
  const at::Tensor bias32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor v = values.contiguous(), meta = metadata.contiguous(), sc = scales.contiguous();

  // Step 1: each row of x once; in threads only from ~1M elements (it is one pass, cheap beside the GEMM,
  // and every parallel region costs a hand-off).
  at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(cols, 1)),
                   [&](int64_t begin, int64_t end) {
    auto quantize = quantize_rows_portable;
#if NXM_X86_KERNELS
    if (simd) quantize = cpu_gemm::quantize_rows_avx512;
#endif
    quantize(x32.const_data_ptr<float>(), cols, cols, begin, end, xq.mutable_data_ptr<uint8_t>(), xq_stride,
             x_scales.mutable_data_ptr<float>());
  });

  // Steps 2-3: threads over output rows (whole 4-row blocks), never splitting a dot product.
  cpu_gemm::W8A8Args args{xq.const_data_ptr<uint8_t>(), xq_stride, x_scales.const_data_ptr<float>(), rows, cols,
                          v.const_data_ptr(), int(bits), meta.const_data_ptr<uint8_t>(), meta.size(1),
                          sc.const_data_ptr<float>(), sc.size(1), group_size,
                          bias ? bias32.const_data_ptr<float>() : nullptr, y32.mutable_data_ptr<float>(), y32.stride(0)};
  const bool simd_gemm = simd && n == 2 && m == 4 && group_size % 64 == 0;
  const int64_t work_per_row = std::max<int64_t>(1, rows * kept);
  const int64_t grain_rows = (std::max<int64_t>(1, (int64_t(1) << 16) / work_per_row) + 3) / 4 * 4;
  at::parallel_for(0, out_features, grain_rows, [&](int64_t begin, int64_t end) {
    const int64_t b = begin == 0 ? 0 : (begin + 3) / 4 * 4, e = end == out_features ? end : (end + 3) / 4 * 4;
    if (b >= e) return;
#if NXM_X86_KERNELS
    if (simd_gemm) {
      std::vector<uint8_t> scratch(cpu_gemm::w8a8_avx512_scratch_bytes(cols) + 63);
      void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t(63));
      return cpu_gemm::gemm_2of4_w8a8_avx512(args, b, std::min(e, out_features), aligned);
    }
#endif
    gemm_portable(args, int(n), int(m), b, std::min(e, out_features));
  });
  return t == at::kFloat ? y32 : y32.to(t);
}

}  // namespace

TORCH_LIBRARY_IMPL(nxm, CPU, m) {
  m.impl("sparse_mm_packed_w8a8", &sparse_mm_packed_w8a8_cpu);
}

}  // namespace nxm
