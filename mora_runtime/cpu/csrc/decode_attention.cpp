// Attention for a decode step on the CPU: one new query token per sequence against that
// sequence's cached keys and values.
//
// Semantics, for sequence b, query head h, its key/value head kh = h / (H / KH):
//   s[j] = scale * <q[b,h], k[b,kh,j]>        for the columns j with mask[b,j] (all without a mask)
//   out[b,h] = sum_j softmax(s)[j] * v[b,kh,j]
// Layouts: q [B, H, d] f32 contiguous; k, v [B, KH, L, d] f32 with unit stride along d (the
// engine's cache buffers are views with a larger column capacity); mask [B, L] bool or
// empty; out [B, H, d].
//
// Why not torch's scaled_dot_product_attention: for one query token per sequence over
// its cache, its CPU kernels are built for long queries (blocked flash attention, or batched
// small GEMMs) and spend most of a call on set-up, which this loop does not have
// (docs/performance.md has the figures). The query heads that share a key/value head run
// together, so each key row is read once for them.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "avx2.h"

namespace {

// exp(x) for x <= 0 (scores minus their maximum), 8 lanes: Cephes' single-precision
// polynomial after reducing by powers of two (relative error ~1e-7); below -87 the result
// is 0, like exp's own underflow.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i exponent = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(exponent));
  return _mm256_andnot_ps(underflow, y);
}

// Softmax of s[0, L) in place; masked columns hold -inf. Returns false when every column is
// masked (the row then attends to nothing).
bool softmax(float* s, int64_t L) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < L; ++j) top = std::max(top, s[j]);
  if (top == -std::numeric_limits<float>::infinity()) return false;
  const __m256 shift = _mm256_set1_ps(top);
  __m256 total = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= L; j += 8) {
    const __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), shift));
    _mm256_storeu_ps(s + j, p);
    total = _mm256_add_ps(total, p);
  }
  float sum = hsum(total);
  for (; j < L; ++j) {  // the tail through the same polynomial, one lane used
    const float p = _mm256_cvtss_f32(exp_nonpositive(_mm256_set1_ps(s[j] - top)));
    s[j] = p;
    sum += p;
  }
  const float inv = 1.0f / sum;
  for (j = 0; j < L; ++j) s[j] *= inv;
  return true;
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat && q.device().is_cpu() && k.device().is_cpu() &&
                  v.device().is_cpu(),
              "decode_attention: float32 CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be contiguous [B, H, d]");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes() && k.stride(3) == 1 &&
                  v.stride(3) == 1,
              "k and v must be [B, KH, L, d] with unit stride along d");
  const int64_t B = q.size(0), H = q.size(1), d = q.size(2);
  const int64_t KH = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == d && KH > 0 && H % KH == 0 && d % 8 == 0,
              "shapes do not match (or d is not a multiple of 8)");
  const bool masked = mask.defined() && mask.numel() > 0;
  if (masked) {
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B &&
                    mask.size(1) == L && mask.is_contiguous(),
                "mask must be contiguous bool [B, L]");
  }
  const int64_t G = H / KH;
  at::Tensor out = at::empty({B, H, d}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = masked ? mask.data_ptr<bool>() : nullptr;
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const int64_t k_row = k.stride(0), k_head = k.stride(1), k_col = k.stride(2);
  const int64_t v_row = v.stride(0), v_head = v.stride(1), v_col = v.stride(2);
  at::parallel_for(0, B * KH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KH, kh = task % KH;
      const float* kb = kp + b * k_row + kh * k_head;
      const float* vb = vp + b * v_row + kh * v_head;
      const float* qb = qp + (b * H + kh * G) * d;  // the G query heads of this kv head
      // Scores, 4 columns at a time: each query vector load serves 4 keys and the 4 sums
      // are independent chains (a single chain waits on every fma's latency).
      int64_t j = 0;
      for (; j + 4 <= L; j += 4) {
        for (int64_t g = 0; g < G; ++g) {
          __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                           _mm256_setzero_ps()};
          for (int64_t e = 0; e < d; e += 8) {
            const __m256 qe = _mm256_loadu_ps(qb + g * d + e);
            for (int c = 0; c < 4; ++c)
              acc[c] = _mm256_fmadd_ps(qe, _mm256_loadu_ps(kb + (j + c) * k_col + e), acc[c]);
          }
          for (int c = 0; c < 4; ++c) scores[g * L + j + c] = fscale * hsum(acc[c]);
        }
      }
      for (; j < L; ++j) {
        for (int64_t g = 0; g < G; ++g) {
          __m256 acc = _mm256_setzero_ps();
          for (int64_t e = 0; e < d; e += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(qb + g * d + e),
                                  _mm256_loadu_ps(kb + j * k_col + e), acc);
          scores[g * L + j] = fscale * hsum(acc);
        }
      }
      if (mp != nullptr) {
        for (int64_t c = 0; c < L; ++c) {
          if (mp[b * L + c]) continue;
          for (int64_t g = 0; g < G; ++g)
            scores[g * L + c] = -std::numeric_limits<float>::infinity();
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* p = scores.data() + g * L;
        float* o = op + (b * H + kh * G + g) * d;
        if (!softmax(p, L)) {
          for (int64_t e = 0; e < d; ++e) o[e] = 0.0f;
          continue;
        }
        for (int64_t e0 = 0; e0 < d; e0 += 64) {  // up to 8 accumulators of 8 lanes
          const int64_t width = std::min<int64_t>(64, d - e0);
          __m256 acc[8];
          for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
          for (int64_t j = 0; j < L; ++j) {
            if (p[j] == 0.0f) continue;  // masked (or underflowed) columns add nothing
            const __m256 pj = _mm256_set1_ps(p[j]);
            const float* vj = vb + j * v_col + e0;
            for (int i = 0; i < width / 8; ++i)
              acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * i), acc[i]);
          }
          for (int i = 0; i < width / 8; ++i) _mm256_storeu_ps(o + e0 + 8 * i, acc[i]);
        }
      }
    }
  });
  return out;
}
