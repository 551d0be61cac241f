// CPU sparse GEMM y = x @ W^T (+ bias) of a packed N:M weight (the packed layout read as it is; no
// conversion at load): checks, x in fp32, the SIMD kernel this CPU runs, and threads over output
// rows with at::parallel_for (torch.set_num_threads applies). Specification: reference.sparse_mm.
//
// Kernels (chosen at run time, never by -march at build time):
//   amx       bf16 2:4 at M > 4 in cpu_gemm_bf16_amx.cpp (AMX-BF16 tiles, AVX-512 VBMI2), the rest
//             as avx512
//   avx512    2:4 in cpu_gemm_avx512.cpp (AVX-512 F/BW/VL)
//   avx2      2:4 in cpu_gemm_avx2.cpp (AVX2, FMA, F16C)
//   portable  every n:m here, plain C++: the fallback, and the path of patterns other than 2:4.
// All accumulate in fp32 and round the result once to the output dtype, as the reference does.
// The schemas of sparse_mm_packed and cpu_isa: nxm_kernels/_ops.py.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "cpu_gemm.h"
#include "cpu_isa.h"
#include "packed_indices.h"
#include "op_common.h"

namespace nxm {
namespace {

using Isa = isa_level::Level;

// AMX-TILE, AMX-BF16 and AVX-512 VBMI2 (CPUID leaf 7), and Linux's permission to use the tile state,
// which a process must request (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; it fails on
// kernels before 5.16 or where the OS does not enable AMX).
bool amx_usable() {
#if NXM_X86_KERNELS && defined(__linux__)
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool vbmi2 = ecx >> 6 & 1, amx_bf16 = edx >> 22 & 1, amx_tile = edx >> 24 & 1;
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return vbmi2 && amx_bf16 && amx_tile && syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

// The best kernel this CPU (and its OS: libgcc checks XGETBV) runs.
Isa best_isa() {
  static const Isa isa = [] {
#if NXM_X86_KERNELS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
      return amx_usable() ? Isa::kAmx : Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return Isa::kAvx2;
#endif
    return Isa::kPortable;
  }();
  return isa;
}

// The kernel to run: the best one, or the one NXM_CPU_ISA names (read at every call, so that tests
// and benchmarks can compare the kernels of one CPU).
Isa requested_isa() {
  const Isa best = best_isa();
  const std::optional<Isa> asked = isa_level::requested("nxm::sparse_mm_packed");
  if (!asked) return best;
  TORCH_CHECK(*asked <= best, "nxm::sparse_mm_packed: NXM_CPU_ISA=", isa_level::name(*asked), " needs CPU features this ",
              "CPU lacks (it runs up to ", isa_level::name(best), "): unset NXM_CPU_ISA or choose a lower one");
  return *asked;
}

cpu_gemm::Dtype gemm_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cpu_gemm::Dtype::kFloat32;
    case at::kBFloat16: return cpu_gemm::Dtype::kBFloat16;
    case at::kHalf: return cpu_gemm::Dtype::kFloat16;
    default: TORCH_CHECK(false, "nxm::sparse_mm_packed: the CPU GEMM takes float32, bfloat16 or float16, got ", t);
  }
}

// Kept value s of a weight row as fp32: the value, or its code times its scale rounded to fp32 (the
// reference's dequantization). `column` is its column in the dense weight.
template <typename Value>
float weight_at(const cpu_gemm::Args& a, int64_t row, int64_t kept, int64_t s, int64_t column) {
  if (a.code_bits == 0) return float(static_cast<const Value*>(a.values)[row * kept + s]);
  int code;
  if (a.code_bits == 8) {
    code = static_cast<const int8_t*>(a.values)[row * kept + s];
  } else {  // two per byte, low nibble first, 4-bit two's complement
    const uint8_t byte = static_cast<const uint8_t*>(a.values)[row * ((kept + 1) / 2) + s / 2];
    code = (int((s % 2 ? byte >> 4 : byte) & 0xF) ^ 8) - 8;
  }
  const int64_t group = a.group_size > 0 ? column / a.group_size : 0;
  return float(code) * a.scales[row * a.scale_stride + group];
}

// Any n:m: each weight row's indices decoded once into columns, its values into fp32, then one dot
// product per row of x.
template <typename Value>
void gemm_portable(const cpu_gemm::Args& a, int n, int m, int64_t begin, int64_t end) {
  const int64_t kept = a.k / m * n;
  std::vector<int64_t> columns(kept);
  std::vector<uint8_t> valid(kept);
  std::vector<float> w(kept);
  for (int64_t row = begin; row < end; ++row) {
    packed_row_columns(a.meta + row * a.meta_stride, kept, n, m, columns.data(), valid.data());
    // a corrupt index contributes nothing, as in decompress_packed
    for (int64_t s = 0; s < kept; ++s) w[s] = valid[s] ? weight_at<Value>(a, row, kept, s, columns[s]) : 0.0f;
    const float b = a.bias ? a.bias[row] : 0.0f;
    for (int64_t i = 0; i < a.m_rows; ++i) {
      const float* x = a.x + i * a.x_stride;
      // Eight partial sums, as the SIMD kernels' lanes: independent chains, and a rounding error
      // that grows with kept / 8 instead of kept.
      float acc[8] = {};
      int64_t s = 0;
      for (; s + 8 <= kept; s += 8)
        for (int j = 0; j < 8; ++j) acc[j] += w[s + j] * x[columns[s + j]];
      for (; s < kept; ++s) acc[s % 8] += w[s] * x[columns[s]];
      const float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
      static_cast<Value*>(a.y)[i * a.y_stride + row] = Value(sum + b);
    }
  }
}

void run_portable(const cpu_gemm::Args& a, int n, int m, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case cpu_gemm::Dtype::kFloat32: return gemm_portable<float>(a, n, m, begin, end);
    case cpu_gemm::Dtype::kBFloat16: return gemm_portable<c10::BFloat16>(a, n, m, begin, end);
    case cpu_gemm::Dtype::kFloat16: return gemm_portable<c10::Half>(a, n, m, begin, end);
  }
}

// Rows of x from which bf16 2:4 runs on AMX tiles: below, the AVX-512 kernel streams the weight at
// less cost than expanding it for the tiles (measured: benchmarks/RESULTS.md, CPU GEMM).
constexpr int64_t kAmxMinRows = 5;

// Tasks of at least ~64K multiply-adds each, so that the thread hand-off stays small against the
// work of a small layer; `unit` rows of the weight per block.
int64_t grain_blocks(int64_t rows, int64_t cols, int64_t n, int64_t m, int64_t unit) {
  const int64_t work_per_block = std::max<int64_t>(1, rows * cols / m * n * unit);
  return std::max<int64_t>(1, (int64_t(1) << 16) / work_per_block);
}

// The GEMM of checked operands: values of x's dtype (code_bits 0) or codes with fp32 scales.
at::Tensor run_gemm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& metadata,
                    const std::optional<at::Tensor>& bias, int64_t n, int64_t m, int code_bits,
                    const at::Tensor& scales, int64_t group_size, const char* op) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const at::ScalarType t = x.scalar_type();
  const cpu_gemm::Dtype dtype = gemm_dtype(t);
  const int64_t out_features = values.size(0);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features && bias->scalar_type() == t, op,
                ": bias must be ", t, " [", out_features, "], got ", bias->scalar_type(), " ", bias->sizes());
  }
  const Isa isa = requested_isa();
  const bool amx = NXM_X86_KERNELS && isa == Isa::kAmx && t == at::kBFloat16 && code_bits == 0 && n == 2 && m == 4 &&
                   rows >= kAmxMinRows && cols > 0;

  // x in fp32 with unit column stride: the kernels read it many times, the conversion costs one pass.
  // (The AMX kernel packs the bf16 x into tiles instead.)
  const bool x_usable = amx || (t == at::kFloat && (x.stride(1) == 1 || cols <= 1));
  const at::Tensor x32 = x_usable ? x : at::empty({rows, cols}, x.options().dtype(at::kFloat)).copy_(x);
  const at::Tensor bias32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor v = values.contiguous(), meta = metadata.contiguous();
  const at::Tensor sc = code_bits ? scales.contiguous() : scales;
  at::Tensor y = at::empty({rows, out_features}, x.options());
  if (rows == 0 || out_features == 0) return y;

  cpu_gemm::Args args{amx ? nullptr : x32.const_data_ptr<float>(), x32.stride(0), rows, cols, v.const_data_ptr(),
                      meta.const_data_ptr<uint8_t>(), meta.size(1), dtype,
                      bias ? bias32.const_data_ptr<float>() : nullptr, y.mutable_data_ptr(), y.stride(0)};
  if (code_bits) {
    args.code_bits = code_bits;
    args.scales = sc.const_data_ptr<float>();
    args.scale_stride = sc.size(1);
    args.group_size = group_size;
  }
#if NXM_X86_KERNELS
  if (amx) {
    // x packed into B tiles once, on this thread (M x K copies: one parallel region less, which
    // matters more where the CPUs are shared), then threads over 32-row weight blocks, each
    // expanding its weight into its own scratch.
    const at::Tensor xb = x.stride(1) == 1 || cols <= 1 ? x : x.contiguous();
    const int64_t steps = (cols + 31) / 32, token_blocks = (rows + 15) / 16;
    at::Tensor panel = at::empty({token_blocks * steps * 512}, x.options());
    const int64_t scratch_bytes = 32768 + 2048 * token_blocks;
    at::Tensor scratch = at::empty({at::get_num_threads(), scratch_bytes}, x.options().dtype(at::kByte));
    const auto* xp = reinterpret_cast<const uint16_t*>(xb.const_data_ptr<at::BFloat16>());
    auto* pp = reinterpret_cast<uint16_t*>(panel.mutable_data_ptr<at::BFloat16>());
    auto* sp = scratch.mutable_data_ptr<uint8_t>();
    for (int64_t block = 0; block < token_blocks; ++block) cpu_gemm::pack_x_bf16_amx(xp, xb.stride(0), rows, cols, block, pp);
    at::parallel_for(0, (out_features + 31) / 32, grain_blocks(rows, cols, n, m, 32), [&](int64_t begin, int64_t end) {
      cpu_gemm::gemm_2of4_bf16_amx(args, pp, sp + at::get_thread_num() * scratch_bytes, 32 * begin,
                                   std::min(32 * end, out_features));
    });
    return y;
  }
#endif
  // The SIMD kernels read codes on AVX-512, with whole 32-column steps per scale group.
  const bool simd_codes = code_bits == 0 || (isa >= Isa::kAvx512 && group_size % 32 == 0);
  auto kernel = [&](int64_t begin, int64_t end) {
#if NXM_X86_KERNELS
    if (n == 2 && m == 4 && simd_codes && isa >= Isa::kAvx512) return cpu_gemm::gemm_2of4_avx512(args, begin, end);
    if (n == 2 && m == 4 && code_bits == 0 && isa == Isa::kAvx2) return cpu_gemm::gemm_2of4_avx2(args, begin, end);
#endif
    run_portable(args, int(n), int(m), begin, end);
  };
  // Tasks of whole 4-row blocks (the SIMD kernels' unit).
  at::parallel_for(0, out_features, 4 * grain_blocks(rows, cols, n, m, 4), [&](int64_t begin, int64_t end) {
    // parallel_for splits anywhere: round the split points to 4-row blocks.
    const int64_t b = begin == 0 ? 0 : (begin + 3) / 4 * 4, e = end == out_features ? end : (end + 3) / 4 * 4;
    if (b < e) kernel(b, std::min(e, out_features));
  });
  return y;
}

at::Tensor sparse_mm_packed_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& metadata,
                                const std::optional<at::Tensor>& bias, int64_t n, int64_t m) {
  const char* op = "nxm::sparse_mm_packed";
  check_2d(x, "x", op);
  check_packed_storage(values, metadata, x.size(1), n, m, op);
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), op, ": x is ", x.scalar_type(), " but the weight is ",
              values.scalar_type(), ": cast one to match");
  return run_gemm(x, values, metadata, bias, n, m, 0, at::Tensor(), 0, op);
}

// W8A16 / W4A16: x (float) @ dequantized codes; specification reference.sparse_mm.
at::Tensor sparse_mm_packed_q_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& metadata,
                                  const at::Tensor& scales, const std::optional<at::Tensor>& bias, int64_t n, int64_t m,
                                  int64_t bits, int64_t group_size) {
  const char* op = "nxm::sparse_mm_packed_q";
  check_2d(x, "x", op);
  check_2d(values, "values", op);
  check_2d(scales, "scales", op);
  check_pattern(n, m, op);
  const int64_t rows = values.size(0), cols = x.size(1);
  TORCH_CHECK(cols % m == 0, op, ": in_features=", cols, " must be a multiple of m=", m);
  TORCH_CHECK(bits == 8 || bits == 4, op, ": bits must be 8 or 4, got ", bits);
  const int64_t kept = cols / m * n;
  const at::ScalarType code_dtype = bits == 8 ? at::kChar : at::kByte;
  const int64_t value_cols = bits == 8 ? kept : (kept + 1) / 2;
  TORCH_CHECK(values.scalar_type() == code_dtype && values.size(1) == value_cols, op, ": values must be ",
              code_dtype, " [", rows, ", ", value_cols, "], got ", values.scalar_type(), " ", values.sizes());
  const int64_t row_bytes = packed_row_bytes(cols / m, int(n), index_bits(int(m)));
  TORCH_CHECK(metadata.scalar_type() == at::kByte && metadata.dim() == 2 && metadata.size(0) == rows &&
                  metadata.size(1) == row_bytes,
              op, ": metadata must be uint8 [", rows, ", ", row_bytes, "], got ", metadata.scalar_type(), " ",
              metadata.sizes());
  TORCH_CHECK(group_size >= 0, op, ": group_size must be >= 0 (0: one scale per row), got ", group_size);
  const int64_t groups = group_size > 0 ? (cols + group_size - 1) / group_size : 1;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.size(0) == rows && scales.size(1) == groups, op,
              ": scales must be float32 [", rows, ", ", groups, "], got ", scales.scalar_type(), " ", scales.sizes());
  TORCH_CHECK(values.device() == x.device() && metadata.device() == x.device() && scales.device() == x.device(), op,
              ": x, values, metadata and scales must be on one device");
  return run_gemm(x, values, metadata, bias, n, m, int(bits), scales, group_size, op);
}

std::string cpu_isa() { return isa_level::name(best_isa()); }

}  // namespace

TORCH_LIBRARY_IMPL(nxm, CPU, m) {
  m.impl("sparse_mm_packed", &sparse_mm_packed_cpu);
  m.impl("sparse_mm_packed_q", &sparse_mm_packed_q_cpu);
}

TORCH_LIBRARY_IMPL(nxm, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", &cpu_isa);
}

}  // namespace nxm
