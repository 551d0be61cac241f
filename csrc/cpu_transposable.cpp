// nxm::select_2of4t on CPU: the exact 2:4t selection (mask or projection) of
// nxm_kernels/patterns/transposable.py, bit for bit: in every 4x4 block, of the 90 masks that keep 2
// per row and per column, the one with the largest sum of scores (|w|, or the given scores); ties to
// the lowest mask number. Threads over block rows (at::parallel_for).
//
// The AVX-512 kernel (cpu_transposable_avx512.cpp) settles 8 blocks at a time with exact integer
// sums; the blocks it cannot settle (scores spanning more than 2**48 with bits below that range, a
// ragged end of a row), and every block on other CPUs, take the scalar path here: the same integers
// and the same meet-in-the-middle search (cpu_transposable_tables.h) when they are exact; else,
// truncated, they pick the candidates within the truncation error of the best, and exact sums
// (error-free transformations) decide among them.
// The schema: nxm_kernels/_ops.py.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "cpu_gemm.h"
#include "cpu_isa.h"
#include "cpu_transposable_tables.h"
#include "op_common.h"

namespace nxm {
namespace {

using cpu_transposable::Elem;
using cpu_transposable::kPairs;

// ---------------------------------------------------------------- the 90 masks, by mask number

constexpr int kMasks = 90;

struct MaskTable {
  uint8_t choice[kMasks][4];  // the pair each row keeps
  uint16_t bits[kMasks];      // bit 4 * row + col: kept
};

// Row choices in lexicographic order, i.e. by decreasing bits read row-major: mask numbers.
constexpr MaskTable make_masks() {
  MaskTable t{};
  int k = 0;
  for (int q0 = 0; q0 < 6; ++q0)
    for (int q1 = 0; q1 < 6; ++q1)
      for (int q2 = 0; q2 < 6; ++q2)
        for (int q3 = 0; q3 < 6; ++q3) {
          const int q[4] = {q0, q1, q2, q3};
          int counts[4] = {0, 0, 0, 0}, bits = 0;
          for (int row = 0; row < 4; ++row)
            for (int c : kPairs[q[row]]) {
              ++counts[c];
              bits |= 1 << (4 * row + c);
            }
          if (counts[0] != 2 || counts[1] != 2 || counts[2] != 2 || counts[3] != 2) continue;
          for (int row = 0; row < 4; ++row) t.choice[k][row] = uint8_t(q[row]);
          t.bits[k++] = uint16_t(bits);
        }
  return t;
}

constexpr MaskTable kMaskTable = make_masks();

// ---------------------------------------------------------------- exact sums

// Wide enough that sums of 16 finite doubles cannot overflow (x86-64 and most 64-bit Linux: 80 or
// 128 bits); where long double is double, scores of 2**1000 or more are refused instead.
using Wide = long double;
constexpr bool kWideHasRoom = std::numeric_limits<Wide>::max_exponent > std::numeric_limits<double>::max_exponent + 8;

// The sign of the exact sum of `n` terms: Shewchuk's grow-expansion (round to nearest, no
// reassociation) keeps the sum as non-overlapping components; the largest one carries the sign.
int exact_sign(const Wide* terms, int n) {
  Wide e[32];
  int len = 0;
  for (int t = 0; t < n; ++t) {
    Wide q = terms[t];
    int kept = 0;
    for (int i = 0; i < len; ++i) {
      const Wide sum = q + e[i], b_virtual = sum - q, a_virtual = sum - b_virtual;
      const Wide low = (q - a_virtual) + (e[i] - b_virtual);
      q = sum;
      if (low != 0) e[kept++] = low;
    }
    e[kept++] = q;
    len = kept;
  }
  for (int i = len - 1; i >= 0; --i)
    if (e[i] != 0) return e[i] > 0 ? 1 : -1;
  return 0;
}

// True when mask a's scores sum to more than mask b's, exactly.
bool sums_more(const double s[16], int a, int b) {
  const int only_a = kMaskTable.bits[a] & ~kMaskTable.bits[b], only_b = kMaskTable.bits[b] & ~kMaskTable.bits[a];
  Wide terms[16];
  int n = 0;
  for (int e = 0; e < 16; ++e) {
    if (only_a >> e & 1) terms[n++] = s[e];
    if (only_b >> e & 1) terms[n++] = -Wide(s[e]);
  }
  return exact_sign(terms, n) > 0;
}

// The kept bits of the best mask of a block whose scores are the exact integers t (below 2**48):
// meet in the middle with tie codes, as the AVX-512 kernel does for 8 blocks at once.
uint16_t best_of_integers(const int64_t t[16]) {
  using cpu_transposable::kTables;
  int64_t pair[4][6];
  for (int row = 0; row < 4; ++row)
    for (int q = 0; q < 6; ++q)
      pair[row][q] = (t[4 * row + kPairs[q][0]] + t[4 * row + kPairs[q][1]]) * (int64_t(1) << cpu_transposable::kCodeBits) +
                     (5 - q) * cpu_transposable::kRowCode[row];
  int64_t upper[cpu_transposable::kClasses], lower[cpu_transposable::kClasses];
  for (int i = 0; i < 36; ++i) {
    const int64_t up = pair[0][i / 6] + pair[1][i % 6], down = pair[2][i / 6] + pair[3][i % 6];
    int64_t& u = upper[kTables.upper[i]];
    int64_t& l = lower[kTables.lower[i]];
    u = kTables.first_upper[i] ? up : std::max(u, up);
    l = kTables.first_lower[i] ? down : std::max(l, down);
  }
  int64_t best = upper[0] + lower[0];
  for (int c = 1; c < cpu_transposable::kClasses; ++c) best = std::max(best, upper[c] + lower[c]);
  return kTables.mask[best & ((1 << cpu_transposable::kCodeBits) - 1)];  // (two's complement: the code)
}

// The kept bits of the best mask of one block, scores s[4 * row + col].
uint16_t best_mask(const double s[16]) {
  double top = 0;
  for (int e = 0; e < 16; ++e) top = std::max(top, std::abs(s[e]));
  int exponent = 0;
  std::frexp(top, &exponent);  // top < 2**exponent
  // Integers below 2**48 (sums of 8 below 2**51, with tie codes below 2**62): exact sums; a truncated
  // entry is off by < 1.
  int64_t t[16];
  bool exact = true;
  if (exponent >= -900) {  // both powers of two are normal doubles: multiply (ldexp is a call)
    const double up = std::ldexp(1.0, 48 - exponent), down = std::ldexp(1.0, exponent - 48);
    for (int e = 0; e < 16; ++e) {
      t[e] = int64_t(s[e] * up);
      exact = exact && double(t[e]) * down == s[e];
    }
  } else {
    for (int e = 0; e < 16; ++e) {
      t[e] = int64_t(std::ldexp(s[e], 48 - exponent));
      exact = exact && std::ldexp(double(t[e]), exponent - 48) == s[e];
    }
  }
  if (exact) return best_of_integers(t);
  int64_t pair[4][6];
  for (int row = 0; row < 4; ++row)
    for (int q = 0; q < 6; ++q) pair[row][q] = t[4 * row + kPairs[q][0]] + t[4 * row + kPairs[q][1]];
  int64_t total[kMasks];
  int best = 0;
  for (int k = 0; k < kMasks; ++k) {
    const uint8_t* q = kMaskTable.choice[k];
    total[k] = pair[0][q[0]] + pair[1][q[1]] + pair[2][q[2]] + pair[3][q[3]];
    if (total[k] > total[best]) best = k;
  }
  // Truncated: each total is within 8 of its exact (scaled) sum, so only masks within 16 of the best
  // can win.
  TORCH_CHECK(kWideHasRoom || top < 0x1p1000, "nxm::select_2of4t: scores of 2**1000 or more need a build whose long "
              "double is wider than double (e.g. x86-64): scale the scores down");
  int winner = -1;
  for (int k = 0; k < kMasks; ++k) {
    if (total[k] <= total[best] - 16) continue;
    if (winner < 0 || sums_more(s, k, winner)) winner = k;  // in mask order: ties stay with the lower number
  }
  return kMaskTable.bits[winner];
}

// ---------------------------------------------------------------- elements

template <typename T>
double as_double(T v) {
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) return double(float(v));
  return double(v);
}

template <typename T>
void with_type(at::ScalarType t, T&& f) {
  switch (t) {
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kChar: return f(int8_t{});
    default: TORCH_CHECK(false, "nxm::select_2of4t: unsupported dtype ", t);
  }
}

Elem elem_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return Elem::kFloat16;
    case at::kBFloat16: return Elem::kBFloat16;
    case at::kFloat: return Elem::kFloat32;
    case at::kDouble: return Elem::kFloat64;
    case at::kChar: return Elem::kInt8;
    default: return Elem::kNone;
  }
}

// Settles block `b` of block row `block_row` on the scalar path and writes its output.
template <typename T>
void settle_block(const cpu_transposable::Args& a, int64_t block_row, int64_t b) {
  const T* w = static_cast<const T*>(a.w);
  double s[16];
  for (int row = 0; row < 4; ++row)
    for (int c = 0; c < 4; ++c) {
      const int64_t i = (4 * block_row + row) * a.cols + 4 * b + c;
      s[4 * row + c] = a.score_type == Elem::kFloat64 ? static_cast<const double*>(a.scores)[i]
                       : a.score_type == Elem::kFloat32 ? double(static_cast<const float*>(a.scores)[i])
                                                         : std::abs(as_double(w[i]));
    }
  const uint16_t kept = best_mask(s);
  for (int row = 0; row < 4; ++row)
    for (int c = 0; c < 4; ++c) {
      const int64_t i = (4 * block_row + row) * a.cols + 4 * b + c;
      const bool keep = kept >> (4 * row + c) & 1;
      if (a.project) {
        static_cast<T*>(a.out)[i] = keep ? w[i] : T(0);
      } else {
        static_cast<bool*>(a.out)[i] = keep;
      }
    }
}

// ---------------------------------------------------------------- instruction sets

bool has_avx512() {
  static const bool has = [] {
#if NXM_X86_KERNELS
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("bmi2");
#else
    return false;
#endif
  }();
  return has;
}

// The AVX-512 kernel unless NXM_CPU_ISA (read at every call, as the GEMM does) asks for a lower set:
// this op has no AVX2 kernel, so "avx2" runs the scalar path.
bool use_avx512() {
  return has_avx512() && isa_level::allows(isa_level::Level::kAvx512, "nxm::select_2of4t");
}

// ---------------------------------------------------------------- the op

at::Tensor select_2of4t_cpu(const at::Tensor& w_in, const std::optional<at::Tensor>& scores_in, bool project) {
  const char* op = "nxm::select_2of4t";
  TORCH_CHECK(is_selectable(w_in.scalar_type()), op, ": unsupported dtype ", w_in.scalar_type(),
              " (float16, bfloat16, float32, float64 or int8)");
  TORCH_CHECK(w_in.dim() >= 2 && w_in.size(-2) % 4 == 0 && w_in.size(-1) % 4 == 0, op,
              ": w must be [..., rows, cols] with rows and cols multiples of 4 (the 4x4 blocks), got shape ",
              w_in.sizes());
  if (scores_in) {
    TORCH_CHECK(scores_in->scalar_type() == at::kFloat || scores_in->scalar_type() == at::kDouble, op,
                ": scores must be float32 or float64, got ", scores_in->scalar_type());
    TORCH_CHECK(scores_in->sizes() == w_in.sizes(), op, ": scores have shape ", scores_in->sizes(), ", w has ",
                w_in.sizes());
    TORCH_CHECK(scores_in->device() == w_in.device(), op, ": scores are on ", scores_in->device(), ", w on ",
                w_in.device());
  }
  const at::Tensor w = w_in.contiguous();
  const at::Tensor scores = scores_in ? scores_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(project ? w.scalar_type() : at::kBool));
  const int64_t cols = w.size(-1), block_rows = w.numel() / std::max<int64_t>(cols, 1) / 4;
  if (w.numel() == 0) return out;
  const cpu_transposable::Args args{w.const_data_ptr(), elem_of(w.scalar_type()),
                                    scores_in ? scores.const_data_ptr() : nullptr,
                                    scores_in ? elem_of(scores.scalar_type()) : Elem::kNone, cols,
                                    out.mutable_data_ptr(), project};
  const bool simd = NXM_X86_KERNELS && use_avx512();
  with_type(w.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    // Tasks of about 64K elements.
    at::parallel_for(0, block_rows, std::max<int64_t>(1, (int64_t(1) << 16) / (4 * cols)), [&](int64_t begin, int64_t end) {
      std::vector<int64_t> left(cols / 4);
      for (int64_t block_row = begin; block_row < end; ++block_row) {
        int64_t count = cols / 4;
#if NXM_X86_KERNELS
        if (simd) {
          count = cpu_transposable::select_2of4t_avx512(args, block_row, left.data());
          for (int64_t i = 0; i < count; ++i) settle_block<T>(args, block_row, left[i]);
          continue;
        }
#endif
        for (int64_t b = 0; b < count; ++b) settle_block<T>(args, block_row, b);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nxm, CPU, m) { m.impl("select_2of4t", &select_2of4t_cpu); }

}  // namespace nxm
