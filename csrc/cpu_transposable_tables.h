// The tables of the 2:4t meet-in-the-middle search (nxm_kernels/patterns/transposable.py), for the
// AVX-512 kernel (cpu_transposable_avx512.cpp) and the scalar path (cpu_transposable.cpp).
//
// Everything here is constexpr data in an anonymous namespace: each file gets its own copy, compiled
// at build time, so no function compiled with one file's ISA flags can be linked into the other.
#pragma once

#include <cstdint>

namespace nxm {
namespace cpu_transposable {
namespace {

constexpr int kPairs[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};  // decreasing row bits
constexpr int kCodeBits = 11;  // tie codes run below 6**4 = 1296 < 2**11

// Column-count class (base-3 digits of the counts) of a choice for two rows (q, r): class ids 0..80.
constexpr int class_of(int q, int r) {
  int counts[4] = {0, 0, 0, 0};
  for (int c : kPairs[q]) ++counts[c];
  for (int c : kPairs[r]) ++counts[c];
  return counts[0] + 3 * counts[1] + 9 * counts[2] + 27 * counts[3];
}

constexpr int kClasses = 19;  // column counts of rows 0-1: 6 of (2,2,0,0), 12 of (2,1,1,0), (1,1,1,1)

struct Tables {
  int upper[36];  // class slot (0..18) of choice 6 * q0 + q1 for rows 0-1
  int lower[36];  // class slot completed by choice 6 * q2 + q3 for rows 2-3
  bool first_upper[36], first_lower[36];  // the first choice of its slot
  uint16_t mask[1296];  // tie code -> kept bits (bit 4 * row + col); 0 for codes of no valid mask
};

constexpr Tables make_tables() {
  Tables t{};
  int slot_of[81] = {};
  for (int& s : slot_of) s = -1;
  int slots = 0;
  for (int q = 0; q < 6; ++q)
    for (int r = 0; r < 6; ++r) {
      const int c = class_of(q, r);
      if (slot_of[c] < 0) slot_of[c] = slots++;
      t.upper[6 * q + r] = slot_of[c];
    }
  for (int q = 0; q < 6; ++q)
    for (int r = 0; r < 6; ++r) t.lower[6 * q + r] = slot_of[80 - class_of(q, r)];  // 80: every count 2
  bool seen_upper[kClasses] = {}, seen_lower[kClasses] = {};
  for (int i = 0; i < 36; ++i) {
    t.first_upper[i] = !seen_upper[t.upper[i]];
    t.first_lower[i] = !seen_lower[t.lower[i]];
    seen_upper[t.upper[i]] = seen_lower[t.lower[i]] = true;
  }
  for (int q0 = 0; q0 < 6; ++q0)
    for (int q1 = 0; q1 < 6; ++q1)
      for (int q2 = 0; q2 < 6; ++q2)
        for (int q3 = 0; q3 < 6; ++q3) {
          if (class_of(q0, q1) + class_of(q2, q3) != 80) continue;
          const int q[4] = {q0, q1, q2, q3};
          int bits = 0;
          for (int row = 0; row < 4; ++row) bits |= (1 << (4 * row + kPairs[q[row]][0])) | (1 << (4 * row + kPairs[q[row]][1]));
          t.mask[(5 - q0) * 216 + (5 - q1) * 36 + (5 - q2) * 6 + (5 - q3)] = uint16_t(bits);
        }
  return t;
}

constexpr Tables kTables = make_tables();
constexpr int kRowCode[4] = {216, 36, 6, 1};  // tie code of a row's choice q: (5 - q) * kRowCode[row]

}  // namespace
}  // namespace cpu_transposable
}  // namespace nxm
