// The AVX-512 kernels beside the AVX2 ones: compiled into the same extension with a
// function-level target (the build's flags stay AVX2, so the extension still loads on CPUs
// without AVX-512) and chosen at run time where the CPU has AVX-512 F/BW/VL/VNNI.
#pragma once

#include <atomic>

#define MORA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

namespace mora {

inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
}

// Off: every kernel takes its AVX2 path (set_avx512: the tests compare the two).
inline std::atomic<bool> avx512_allowed{true};

inline bool use_avx512() {
  return avx512_allowed.load(std::memory_order_relaxed) && cpu_has_avx512();
}

}  // namespace mora
