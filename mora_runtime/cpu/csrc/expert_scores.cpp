// Every MoRA expert's key against every token of a small batch, on the CPU:
//   z[t, n] = sum_i x[t, i] * A[n, i]        x [T, D] f32, A [N, D] f32 (both contiguous)
// What torch.mm(x, A.t()) computes, for the shapes of a decode step (T = a few dozen tokens,
// N = the pool's slots, D = a layer's input width). At those shapes a BLAS call spends more
// on set-up and threading than on the arithmetic (docs/performance.md has the figures), and
// a model calls it once per adapted layer per step. Tiles of 4 keys x 3 tokens keep 12 sums
// in registers (4 x 4 in 512-bit registers where the CPU has AVX-512, avx512.h: twice the
// products per instruction; the sums then add up in another order, so scores may differ
// from the AVX2 kernel's in the last bits); the tile's keys stay in L1 while every token
// passes. Work is split over keys on torch's thread pool.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstdint>

#include "avx2.h"
#include "avx512.h"

namespace {

// z[t0 .. t0+NT, n0 .. n0+NK]; D is a multiple of 8 here (the tail is done by the caller).
template <int NK, int NT>
void tile(const float* x, const float* a, float* z, int64_t t0, int64_t n0, int64_t D,
          int64_t N) {
  __m256 acc[NK][NT];
  for (int k = 0; k < NK; ++k)
    for (int t = 0; t < NT; ++t) acc[k][t] = _mm256_setzero_ps();
  const int64_t body = D - D % 8;
  for (int64_t i = 0; i < body; i += 8) {
    __m256 keys[NK];
    for (int k = 0; k < NK; ++k) keys[k] = _mm256_loadu_ps(a + (n0 + k) * D + i);
    for (int t = 0; t < NT; ++t) {
      const __m256 xt = _mm256_loadu_ps(x + (t0 + t) * D + i);
      for (int k = 0; k < NK; ++k) acc[k][t] = _mm256_fmadd_ps(keys[k], xt, acc[k][t]);
    }
  }
  for (int k = 0; k < NK; ++k) {
    for (int t = 0; t < NT; ++t) {
      float sum = hsum(acc[k][t]);
      for (int64_t i = body; i < D; ++i) sum += x[(t0 + t) * D + i] * a[(n0 + k) * D + i];
      z[(t0 + t) * N + n0 + k] = sum;
    }
  }
}

// The same tile in 512-bit registers: D's multiple of 16 here, the rest by the caller.
template <int NK, int NT>
MORA_AVX512 void tile512(const float* x, const float* a, float* z, int64_t t0, int64_t n0,
                         int64_t D, int64_t N) {
  __m512 acc[NK][NT];
  for (int k = 0; k < NK; ++k)
    for (int t = 0; t < NT; ++t) acc[k][t] = _mm512_setzero_ps();
  const int64_t body = D - D % 16;
  for (int64_t i = 0; i < body; i += 16) {
    __m512 keys[NK];
    for (int k = 0; k < NK; ++k) keys[k] = _mm512_loadu_ps(a + (n0 + k) * D + i);
    for (int t = 0; t < NT; ++t) {
      const __m512 xt = _mm512_loadu_ps(x + (t0 + t) * D + i);
      for (int k = 0; k < NK; ++k) acc[k][t] = _mm512_fmadd_ps(keys[k], xt, acc[k][t]);
    }
  }
  for (int k = 0; k < NK; ++k) {
    for (int t = 0; t < NT; ++t) {
      float sum = _mm512_reduce_add_ps(acc[k][t]);
      for (int64_t i = body; i < D; ++i) sum += x[(t0 + t) * D + i] * a[(n0 + k) * D + i];
      z[(t0 + t) * N + n0 + k] = sum;
    }
  }
}

template <int NK>
void key_tile(const float* x, const float* a, float* z, int64_t n0, int64_t T, int64_t D,
              int64_t N) {
  int64_t t0 = 0;
  if (mora::use_avx512()) {
    for (; t0 + 4 <= T; t0 += 4) tile512<NK, 4>(x, a, z, t0, n0, D, N);
    for (; t0 < T; ++t0) tile512<NK, 1>(x, a, z, t0, n0, D, N);
    return;
  }
  for (; t0 + 3 <= T; t0 += 3) tile<NK, 3>(x, a, z, t0, n0, D, N);
  for (; t0 < T; ++t0) tile<NK, 1>(x, a, z, t0, n0, D, N);
}

}  // namespace

// Groups of 4 keys (the last may be short) that z [T, N] = x A^T is computed in.
int64_t expert_score_group_count(int64_t N) { return (N + 3) / 4; }

// Key groups [g_begin, g_end) of 4 keys each (the last may be short) of z [T, N] = x A^T,
// on the calling thread (expert_layer.cpp splits groups over the threads of its own region).
void expert_score_groups(const float* xp, const float* ap, float* zp, int64_t g_begin,
                         int64_t g_end, int64_t T, int64_t D, int64_t N) {
  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t n0 = 4 * g;
    if (n0 + 4 <= N) {
      key_tile<4>(xp, ap, zp, n0, T, D, N);
    } else {
      for (int64_t n = n0; n < N; ++n) key_tile<1>(xp, ap, zp, n, T, D, N);
    }
  }
}

// z [T, N] = x [T, D] @ A [N, D]^T.
at::Tensor expert_scores(const at::Tensor& x, const at::Tensor& A) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && A.scalar_type() == at::kFloat &&
                  x.device().is_cpu() && A.device().is_cpu(),
              "expert_scores: float32 CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && A.dim() == 2 && x.size(1) == A.size(1) && x.is_contiguous() &&
                  A.is_contiguous(),
              "expert_scores: x [T, D] and A [N, D] must be contiguous with the same D");
  const int64_t T = x.size(0), D = x.size(1), N = A.size(0);
  at::Tensor z = at::empty({T, N}, x.options());
  if (T == 0 || N == 0) return z;
  const float *xp = x.data_ptr<float>(), *ap = A.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  at::parallel_for(0, expert_score_group_count(N), 4, [&](int64_t begin, int64_t end) {
    expert_score_groups(xp, ap, zp, begin, end, T, D, N);
  });
  return z;
}
