// The CPU sparse GEMM y = x @ W^T (+ bias) of packed N:M weights (csrc/cpu_gemm.cpp): the arguments
// its kernels share and the SIMD kernels of each instruction set.
//
// Torch-free on purpose: cpu_gemm_avx2.cpp and cpu_gemm_avx512.cpp are compiled with their own -m
// flags (setup.py), and any inline function they shared with the rest of _C (a torch or std
// template) could be linked into code that also runs on CPUs without that ISA. So the ISA files
// include only this header and <immintrin.h>, and keep everything else in anonymous namespaces.
#pragma once

#include <cstdint>

namespace nxm {
namespace cpu_gemm {

enum class Dtype : int { kFloat32, kBFloat16, kFloat16 };  // of the weight values, x and y

struct Args {
  const float* x;         // [m_rows, k] in fp32 (converted once per call), row stride x_stride
  int64_t x_stride;
  int64_t m_rows;         // M: rows of x
  int64_t k;              // in_features, a multiple of 4
  const void* values;     // [out_features, k / 2] of `dtype`, contiguous: the 2:4 packed layout
  const uint8_t* meta;    // [out_features, meta_stride]: 2-bit kept indices, LSB first
  int64_t meta_stride;
  Dtype dtype;
  const float* bias;      // [out_features] in fp32, or nullptr
  void* y;                // [m_rows, out_features] of `dtype`, row stride y_stride
  int64_t y_stride;
  // Quantized weights (nxm_kernels/encodings/integer.py): `values` holds int8 codes (code_bits 8,
  // [out_features, k / 2]) or int4 codes two per byte, low nibble first (code_bits 4, [out_features,
  // k / 4]); 0: values of `dtype`. scales: fp32 [out_features, scale_stride], one per row
  // (group_size 0) or per group_size input features.
  int code_bits = 0;
  const float* scales = nullptr;
  int64_t scale_stride = 0;
  int64_t group_size = 0;
};

// y[:, begin:end] for output rows [begin, end) of a 2:4 weight; fp32 accumulation. The AVX-512
// kernel also reads int8/int4 codes with group_size 0 or a multiple of 32.
void gemm_2of4_avx512(const Args& args, int64_t begin, int64_t end);
void gemm_2of4_avx2(const Args& args, int64_t begin, int64_t end);

// bf16 2:4 on AMX tiles (cpu_gemm_bf16_amx.cpp), for M > 4; reads `values` and `meta` of args, not
// its fp32 x. First pack_x_bf16_amx writes token block `token_block` (16 rows of the bf16 x) into
// `panel`: per token block and 32-column step, one 1 KiB tile of [16 column pairs][16 tokens][2]
// (zeros past m_rows and k); the panel holds ceil(m_rows / 16) * ceil(k / 32) * 512 bf16. Then
// gemm_2of4_bf16_amx computes y[:, begin:end] (begin a multiple of 32) with `scratch`, 64-byte
// aligned, of 32 KiB + 2 KiB * ceil(m_rows / 16) for this thread alone.
void pack_x_bf16_amx(const uint16_t* x, int64_t x_stride, int64_t m_rows, int64_t k, int64_t token_block,
                     uint16_t* panel);
void gemm_2of4_bf16_amx(const Args& args, const uint16_t* panel, void* scratch, int64_t begin, int64_t end);

// W8A8 (csrc/cpu_gemm_w8a8*.cpp; specification reference.sparse_mm_int): x quantized per row to
// int8 codes, kept as code + 128 (uint8, for vpdpbusd's unsigned operand), times int8 or int4 codes.
constexpr int64_t kW8A8Step = 128;  // columns of x per step of the AVX-512 kernel; xq rows are padded to it

struct W8A8Args {
  const uint8_t* xq;      // [m_rows, xq_stride]: codes + 128; columns k .. xq_stride - 1 hold 128 (code 0)
  int64_t xq_stride;      // a multiple of kW8A8Step
  const float* x_scales;  // [m_rows]
  int64_t m_rows;
  int64_t k;              // in_features, a multiple of 4
  const void* values;     // int8 codes [out_features, k / 2] (code_bits 8), or int4 two per byte (4)
  int code_bits;
  const uint8_t* meta;    // [out_features, meta_stride]: the packed layout's 2-bit kept indices
  int64_t meta_stride;
  const float* scales;    // fp32 [out_features, scale_stride]: per row (group_size 0) or group
  int64_t scale_stride;
  int64_t group_size;
  const float* bias;      // [out_features] in fp32, or nullptr
  float* y;               // [m_rows, y_stride] in fp32: the result before its rounding to x's dtype
  int64_t y_stride;
};

// Rows [begin, end) of x (fp32, row stride x_stride) -> their codes + 128 and scales, exactly as
// reference.quantize_activations. AVX-512 F/BW/VL/VNNI/VBMI.
void quantize_rows_avx512(const float* x, int64_t x_stride, int64_t k, int64_t begin, int64_t end, uint8_t* xq,
                          int64_t xq_stride, float* x_scales);
// y[:, begin:end] of a 2:4 weight with group_size 0 or a multiple of 64: AVX-512 VNNI + VBMI.
// scratch: w8a8_avx512_scratch_bytes(k) bytes, 64-byte aligned, for this call alone.
int64_t w8a8_avx512_scratch_bytes(int64_t k);
void gemm_2of4_w8a8_avx512(const W8A8Args& args, int64_t begin, int64_t end, void* scratch);

}  // namespace cpu_gemm
}  // namespace nxm

// The GEMM of the block layout (csrc/cpu_block_gemm.cpp): y = x @ W^T (+ bias) for W of R x C blocks
// that keep `kept` entries each, stored as their values in row-major order plus a bitmap, or a mask
// number into a table of bitmaps (a mask library).
namespace nxm {
namespace cpu_block_gemm {

struct Args {
  const float* x;            // [m_rows, k] fp32, contiguous
  int64_t m_rows, k;
  int64_t rows, cols, kept;  // the block: rows x cols entries, kept of them
  int64_t bitmap_bytes;      // entry i at bit i % 8 of byte i / 8
  const void* values;        // [n / rows, (k / cols) * kept] of `dtype`
  cpu_gemm::Dtype dtype;     // of the values and y
  const uint8_t* bitmaps;    // [n / rows, (k / cols) * bitmap_bytes] (no library), or
  const void* numbers;       // [n / rows, k / cols] uint8 or int16 mask numbers into
  bool numbers_int16;
  const uint8_t* masks;      //   masks [mask_count, bitmap_bytes]
  int64_t mask_count;
  const float* bias;         // [n] fp32, or nullptr
  void* y;                   // [m_rows, n] of `dtype` (the AVX-512 kernel: fp32)
  int64_t n;
};

// Block rows [begin, end) of a weight of 4x4 blocks: each block expanded from its kept values into a
// register (vexpandps under its bitmap), then multiplied with 4 columns of up to 8 rows of x at a time.
// AVX-512 F/BW/VL.
void gemm_4x4_avx512(const Args& args, int64_t begin, int64_t end);

}  // namespace cpu_block_gemm
}  // namespace nxm

// The exact 2:4t selection (csrc/cpu_transposable.cpp), whose SIMD kernel shares the ISA files' rules.
namespace nxm {
namespace cpu_transposable {

enum class Elem : int { kNone, kFloat16, kBFloat16, kFloat32, kFloat64, kInt8 };

struct Args {
  const void* w;        // [rows, cols] contiguous, rows and cols multiples of 4
  Elem w_type;
  const void* scores;   // float32/float64 of w's shape, or nullptr (score_type kNone): |w|
  Elem score_type;
  int64_t cols;
  void* out;            // bool mask, or (project) w with the dropped entries +0, of w's type
  bool project;
};

// Block row `block_row` (rows 4 * block_row .. + 3): writes `out` for every block and returns how
// many blocks it could not settle exactly (their output is to be rewritten), listing their block
// columns in `left` (room for cols / 4). AVX-512 F/DQ/BW/VL and BMI2.
int64_t select_2of4t_avx512(const Args& args, int64_t block_row, int64_t* left);

}  // namespace cpu_transposable
}  // namespace nxm
