// Instruction-set levels of the CPU kernels and the NXM_CPU_ISA variable, shared by every CPU op:
// each op runs its best kernel at or below both the level asked for and what the CPU has, so one
// variable steers them all (tests and benchmarks compare the kernels of one CPU with it).
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <optional>
#include <string>

// The ISA files exist on x86-64 only (setup.py compiles them there, with GCC or Clang).
#if defined(__x86_64__) && defined(__GNUC__)
#define NXM_X86_KERNELS 1
#else
#define NXM_X86_KERNELS 0
#endif

namespace nxm::isa_level {

enum class Level { kPortable, kAvx2, kAvx512, kAmx };

inline const char* name(Level level) {
  switch (level) {
    case Level::kAmx: return "amx";
    case Level::kAvx512: return "avx512";
    case Level::kAvx2: return "avx2";
    default: return "portable";
  }
}

// The level NXM_CPU_ISA names, read at every call; nullopt when unset or "auto" (the best the CPU
// runs). An unknown name is refused, naming the op that read it.
inline std::optional<Level> requested(const char* op) {
  const char* env = std::getenv("NXM_CPU_ISA");
  const std::string asked = env ? env : "";
  if (asked.empty() || asked == "auto") return std::nullopt;
  for (Level level : {Level::kPortable, Level::kAvx2, Level::kAvx512, Level::kAmx}) {
    if (asked == name(level)) return level;
  }
  TORCH_CHECK(false, op, ": unknown NXM_CPU_ISA=", asked, ": choose auto, amx, avx512, avx2 or portable");
}

// Whether an op whose fastest kernel needs `level` may run it: NXM_CPU_ISA does not ask for less.
// (The op checks the CPU's features for that kernel itself: they differ from op to op.)
inline bool allows(Level level, const char* op) {
  const std::optional<Level> asked = requested(op);
  return !asked || *asked >= level;
}

}  // namespace nxm::isa_level
