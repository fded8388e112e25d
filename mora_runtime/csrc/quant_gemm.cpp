// Block-quantised matrix products for CPU decoding: 4-bit weights (Q4_1 layout) and 8-bit
// weights (Q8_0 layout) against activations quantised on the fly to 8 bits per 32 values.
//
// Semantics (for every token t and output o, blocks b of 32 inputs):
//   activations: s[t,b] = max|x[t,b,:]| / 127, q[t,b,j] = round(x[t,b,j] / s[t,b])
//   q4_1:  y[t,o] = sum_b d[o,b] * s[t,b] * sum_j n[o,b,j] * q[t,b,j]
//                   + m[o,b] * s[t,b] * sum_j q[t,b,j]          (w = d * n + m, n in 0..15)
//   q8_0:  y[t,o] = sum_b d[o,b] * s[t,b] * sum_j w8[o,b,j] * q[t,b,j]   (w = d * w8)
// This is the arithmetic llama.cpp uses for these formats (Q8_1 / Q8_0 activations), so a
// model served from a Q4_1 GGUF computes what llama.cpp computes, on the GGUF's own grid.
//
// Layouts: x [T, K] f32; nibbles [O, K/2] u8 where byte j of block b holds input j in its low
// nibble and input j + 16 in its high nibble (GGUF's order); d [O, K/32] f32 and m
// transposed, [K/32, O] f32; w8 [O, K] i8.
// Every token is computed by the same instructions in the same order whatever else is in
// the batch: results do not depend on the batch size.
//
// Work is split over output rows with at::parallel_for (torch's own thread pool, so the
// kernel never competes with torch's threads). The block dot products follow llama.cpp's
// AVX2 ggml_vec_dot_q4_1_q8_1 / q8_0_q8_0; the loader builds this file only on x86-64 CPUs
// with AVX2 and FMA (elsewhere the model keeps float weights).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <vector>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "quant_gemm.cpp needs AVX2 and FMA (the loader builds it only for such CPUs)"
#endif
#include <immintrin.h>

namespace {

constexpr int64_t kBlock = 32;

struct QuantizedActivations {
  std::vector<int8_t> q;      // [T, K]
  std::vector<float> scale;   // [T, K/32]
  std::vector<float> sum;     // [T, K/32]: scale * sum_j q (the Q4_1 minimum's term)
};

QuantizedActivations quantize_activations(const float* x, int64_t T, int64_t K) {
  const int64_t nb = K / kBlock;
  QuantizedActivations out{std::vector<int8_t>(T * K), std::vector<float>(T * nb),
                           std::vector<float>(T * nb)};
  at::parallel_for(0, T * nb, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xb = x + i * kBlock;  // block i of the [T, K] row-major input
      float amax = 0.0f;
      for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float s = amax / 127.0f;
      const float inv = s > 0.0f ? 1.0f / s : 0.0f;
      int32_t total = 0;
      int8_t* qb = out.q.data() + i * kBlock;
      for (int64_t j = 0; j < kBlock; ++j) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(xb[j] * inv));
        qb[j] = static_cast<int8_t>(v);
        total += v;
      }
      out.scale[i] = s;
      out.sum[i] = s * static_cast<float>(total);
    }
  });
  return out;
}

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// 32 unsigned 4-bit values (0..15) of one Q4_1 block, inputs 0..31 in order.
inline __m256i unpack_nibbles(const uint8_t* p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// sum_j u[j] * s[j] for unsigned u (< 128) and signed s, as 8 float lanes.
inline __m256 dot_u8_i8(__m256i u, __m256i s) {
  const __m256i pairs = _mm256_maddubs_epi16(u, s);                   // 16 x i16
  const __m256i quads = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));  // 8 x i32
  return _mm256_cvtepi32_ps(quads);
}

void check_input(const at::Tensor& x, int64_t K, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, name,
              ": x must be a float32 CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.is_contiguous(), name,
              ": x must be a contiguous [T, K] matrix with K = ", K);
  TORCH_CHECK(K % kBlock == 0, name, ": K must be a multiple of 32");
}

// The weight side of one product: Q4_1 (nibbles + d + m) or Q8_0 (int8 + d).
struct Weights {
  const uint8_t* nibbles = nullptr;  // Q4_1: [O, K/2]
  const int8_t* w8 = nullptr;        // Q8_0: [O, K]
  const float* d = nullptr;          // [O, K/32]
  const float* m = nullptr;          // Q4_1 only, transposed: [K/32, O]
  int64_t K = 0;
  int64_t nb = 0;
};

// Block b of output row o as (unsigned magnitudes, sign source): for Q4_1 the nibbles are
// already unsigned; for Q8_0, |w| and w (the activations take w's sign).
inline __m256i load_weight_block(const Weights& w, int64_t o, int64_t b, __m256i* sign) {
  if (w.nibbles != nullptr) return unpack_nibbles(w.nibbles + o * (w.K / 2) + b * 16);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.w8 + o * w.K + b * 32));
  *sign = v;
  return _mm256_sign_epi8(v, v);
}

// NO output rows x NT tokens, every weight block unpacked once for the NT tokens and every
// activation block loaded once for the NO rows.
template <int NO, int NT, bool Q8>
void tile(const Weights& w, const QuantizedActivations& a, int64_t o0, int64_t t0, int64_t O,
          float* out) {
  __m256 acc[NO][NT];
  for (int r = 0; r < NO; ++r)
    for (int i = 0; i < NT; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < w.nb; ++b) {
    __m256i mag[NO], sgn[NO];
    float dw[NO];
    for (int r = 0; r < NO; ++r) {
      mag[r] = load_weight_block(w, o0 + r, b, &sgn[r]);
      dw[r] = w.d[(o0 + r) * w.nb + b];
    }
    for (int i = 0; i < NT; ++i) {
      const int64_t tb = (t0 + i) * w.nb + b;
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + tb * kBlock));
      const float s = a.scale[tb];
      for (int r = 0; r < NO; ++r) {
        const __m256i qs = Q8 ? _mm256_sign_epi8(q, sgn[r]) : q;
        acc[r][i] = _mm256_fmadd_ps(dot_u8_i8(mag[r], qs), _mm256_set1_ps(dw[r] * s), acc[r][i]);
      }
    }
  }
  for (int r = 0; r < NO; ++r)
    for (int i = 0; i < NT; ++i) out[(t0 + i) * O + o0 + r] = hsum(acc[r][i]);
}

// Q4_1's minimum term for outputs [o0, o1): y[t, o] += sum_b m[b, o] * s[t, b] * sum_j q
// (m transposed to [K/32, O], so the loop over o vectorises).
void add_minimum_term(const Weights& w, const QuantizedActivations& a, int64_t o0, int64_t o1,
                      int64_t T, int64_t O, float* out) {
  for (int64_t t = 0; t < T; ++t) {
    float* yt = out + t * O;
    for (int64_t b = 0; b < w.nb; ++b) {
      const float sb = a.sum[t * w.nb + b];
      const float* mb = w.m + b * O;
      for (int64_t o = o0; o < o1; ++o) yt[o] += mb[o] * sb;
    }
  }
}

template <int NO, bool Q8>
void row_tiles(const Weights& w, const QuantizedActivations& a, int64_t o0, int64_t T, int64_t O,
               float* out) {
  int64_t t0 = 0;
  for (; t0 + 4 <= T; t0 += 4) tile<NO, 4, Q8>(w, a, o0, t0, O, out);
  for (; t0 < T; ++t0) tile<NO, 1, Q8>(w, a, o0, t0, O, out);
}

template <bool Q8>
at::Tensor product(const at::Tensor& x, const Weights& w, int64_t O) {
  const int64_t T = x.size(0);
  at::Tensor y = at::empty({T, O}, x.options());
  if (T == 0 || O == 0) return y;
  const QuantizedActivations a = quantize_activations(x.data_ptr<float>(), T, w.K);
  float* out = y.data_ptr<float>();
  at::parallel_for(0, (O + 1) / 2, 8, [&](int64_t begin, int64_t end) {
    const int64_t o_begin = 2 * begin;
    const int64_t o_end = std::min(O, 2 * end);
    int64_t o = o_begin;
    for (; o + 2 <= o_end; o += 2) row_tiles<2, Q8>(w, a, o, T, O, out);
    for (; o < o_end; ++o) row_tiles<1, Q8>(w, a, o, T, O, out);
    if (!Q8) add_minimum_term(w, a, o_begin, o_end, T, O, out);
  });
  return y;
}

}  // namespace

// y [T, O] = x [T, K] times the Q4_1 weight (nibbles [O, K/2], d [O, K/32], m_t [K/32, O])
// transposed.
at::Tensor q4_1_linear(const at::Tensor& x, const at::Tensor& nibbles, const at::Tensor& d,
                       const at::Tensor& m_t) {
  const int64_t O = nibbles.size(0);
  const int64_t K = nibbles.size(1) * 2;
  check_input(x, K, "q4_1_linear");
  TORCH_CHECK(nibbles.scalar_type() == at::kByte && nibbles.is_contiguous(), "nibbles: u8");
  TORCH_CHECK(d.scalar_type() == at::kFloat && m_t.scalar_type() == at::kFloat &&
                  d.is_contiguous() && m_t.is_contiguous() && d.size(0) == O &&
                  d.size(1) == K / kBlock && m_t.size(0) == K / kBlock && m_t.size(1) == O,
              "d must be contiguous float32 [O, K/32] and m_t [K/32, O]");
  Weights w;
  w.nibbles = nibbles.data_ptr<uint8_t>();
  w.d = d.data_ptr<float>();
  w.m = m_t.data_ptr<float>();
  w.K = K;
  w.nb = K / kBlock;
  return product<false>(x, w, O);
}

// y [T, O] = x [T, K] times the Q8_0 weight (w8 [O, K] int8, d [O, K/32]) transposed.
at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& w8, const at::Tensor& d) {
  const int64_t O = w8.size(0);
  const int64_t K = w8.size(1);
  check_input(x, K, "q8_0_linear");
  TORCH_CHECK(w8.scalar_type() == at::kChar && w8.is_contiguous(), "w8: contiguous int8");
  TORCH_CHECK(d.scalar_type() == at::kFloat && d.is_contiguous() && d.size(0) == O &&
                  d.size(1) == K / kBlock,
              "d must be contiguous float32 [O, K/32]");
  Weights w;
  w.w8 = w8.data_ptr<int8_t>();
  w.d = d.data_ptr<float>();
  w.K = K;
  w.nb = K / kBlock;
  return product<true>(x, w, O);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("q4_1_linear", &q4_1_linear, "x @ dequant(Q4_1 weight).T, 8-bit activations");
  module.def("q8_0_linear", &q8_0_linear, "x @ dequant(Q8_0 weight).T, 8-bit activations");
}
