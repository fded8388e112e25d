// What the AVX2 kernels of the CPU extension share (mora_runtime/cpu/build.py builds them only on
// x86-64 CPUs with AVX2 and FMA).
#pragma once

#if !defined(__AVX2__) || !defined(__FMA__)
#error "the CPU kernels need AVX2 and FMA (the loader builds them only for such CPUs)"
#endif
#include <immintrin.h>

// The sum of the 8 lanes.
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  lo = _mm_add_ps(lo, _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
