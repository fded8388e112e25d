// Block-quantised matrix products for CPU decoding: 4-bit weights (Q4_1 grid) and 8-bit
// weights (Q8_0 grid) against activations quantised on the fly to 8 bits per 32 values.
//
// Semantics (for every token t and output o, blocks b of 32 inputs):
//   activations: s[t,b] = max|x[t,b,:]| / 127, q[t,b,j] = round(x[t,b,j] / s[t,b])
//   q4_1:  y[t,o] = sum_b d[o,b] * s[t,b] * sum_j n[o,b,j] * q[t,b,j]
//                   + m[o,b] * s[t,b] * sum_j q[t,b,j]          (w = d * n + m, n in 0..15)
//   q8_0:  y[t,o] = sum_b d[o,b] * s[t,b] * sum_j w8[o,b,j] * q[t,b,j]   (w = d * w8)
// This is the arithmetic llama.cpp uses for these formats (Q8_1 / Q8_0 activations), so a
// model served from a Q4_1 GGUF computes what llama.cpp computes, on the GGUF's own grid.
//
// Layouts ("8-row interleaved", written by quantize.py's repack_* functions): output rows
// come in groups of 8 (the last group padded with zero rows). For group g and block b the
// weights of the 8 rows are interleaved in 4-byte pieces, so that one 32-byte load holds the
// same 4 inputs of all 8 rows, one 32-bit lane per row:
//   q4_1: packed [O8/8, K/32, 4, 8, 4] u8: piece c of row r is bytes 4c..4c+3 of the row's
//         16 GGUF bytes; low nibbles are inputs 4c..4c+3, high nibbles inputs 16+4c..16+4c+3.
//   q8_0: packed [O8/8, K/32, 8, 8, 4] i8: piece c of row r is inputs 4c..4c+3.
//   d, m: [O8/8, K/32, 8] f16 (one vector of the 8 rows' scales per block; float16 as in the
//         GGUF, which is also 2 of the 6 bits a Q4_1 weight costs to read instead of 4).
// Multiplying a piece by the activations' matching 4 bytes broadcast to every lane gives, in
// lane r, row r's partial dot product: the 8 outputs of a group come out in one vector, with
// no horizontal sums (the idea of llama.cpp's repacked "8x8" CPU kernels). x is [T, K] f32.
//
// Every token is computed by the same instructions in the same order whatever else is in
// the batch (integer sums are exact, the float steps run per token in block order): results
// do not depend on the batch size. Work is split over pairs of row groups with
// at::parallel_for (torch's own thread pool, so the kernel never competes with torch's
// threads). The loader builds this file only on x86-64 CPUs with AVX2 and FMA (elsewhere
// weights stay float); where the CPU also has AVX-512 VNNI (avx512.h), pairs of row groups
// take the 512-bit kernels below, which give the same bits.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "avx2.h"
#include "avx512.h"

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kRows = 8;  // output rows per interleaved group

struct QuantizedActivations {
  std::vector<int8_t> q;     // [T, K]
  std::vector<float> scale;  // [T, K/32]
  std::vector<float> sum;    // [T, K/32]: scale * sum_j q (the Q4_1 minimum's term)
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

// The 4 activation bytes at p in every 32-bit lane.
inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm256_set1_epi32(v);
}

struct Problem {
  const uint8_t* packed;  // one of the layouts above
  const uint16_t* d;      // [O8/8, nb, 8] float16
  const uint16_t* m;      // q4_1 only: [O8/8, nb, 8] float16
  int64_t K, nb, O;
};

// The 8 float16 scales at p, as floats.
inline __m256 load_scales(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Row group g against tokens t0 .. t0 + NT: out[i][r] = y[t0 + i, 8 g + r].
// Q4_1: a piece's low and high nibbles (u4) times the broadcast activations (i8) with
// maddubs; the 8 products of a block add up in 16 bits (|sum| <= 8 * 2 * 15 * 127 = 30480).
template <int NT>
void q4_group(const Problem& p, const QuantizedActivations& a, int64_t g, int64_t t0,
              float out[][kRows]) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[NT];
  for (int i = 0; i < NT; ++i) acc[i] = _mm256_setzero_ps();
  const uint8_t* wg = p.packed + g * p.nb * 128;
  const uint16_t* dg = p.d + g * p.nb * kRows;
  const uint16_t* mg = p.m + g * p.nb * kRows;
  for (int64_t b = 0; b < p.nb; ++b) {
    __m256i sum16[NT];
    for (int i = 0; i < NT; ++i) sum16[i] = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + b * 128 + c * 32));
      const __m256i lo = _mm256_and_si256(raw, low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
      for (int i = 0; i < NT; ++i) {
        const int8_t* qb = a.q.data() + (t0 + i) * p.K + b * kBlock;
        const __m256i plo = _mm256_maddubs_epi16(lo, broadcast4(qb + 4 * c));
        const __m256i phi = _mm256_maddubs_epi16(hi, broadcast4(qb + 16 + 4 * c));
        sum16[i] = _mm256_add_epi16(sum16[i], _mm256_add_epi16(plo, phi));
      }
    }
    const __m256 dv = load_scales(dg + b * kRows);
    const __m256 mv = load_scales(mg + b * kRows);
    for (int i = 0; i < NT; ++i) {
      const int64_t tb = (t0 + i) * p.nb + b;
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum16[i], ones));
      acc[i] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dv, _mm256_set1_ps(a.scale[tb])), acc[i]);
      acc[i] = _mm256_fmadd_ps(mv, _mm256_set1_ps(a.sum[tb]), acc[i]);
    }
  }
  for (int i = 0; i < NT; ++i) _mm256_storeu_ps(out[i], acc[i]);
}

// Q8_0: signed weights, so maddubs takes |w| and the activations carry w's sign; a product
// pair can reach 2 * 127 * 127, so each piece widens to 32 bits before adding.
template <int NT>
void q8_group(const Problem& p, const QuantizedActivations& a, int64_t g, int64_t t0,
              float out[][kRows]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[NT];
  for (int i = 0; i < NT; ++i) acc[i] = _mm256_setzero_ps();
  const uint8_t* wg = p.packed + g * p.nb * 256;
  const uint16_t* dg = p.d + g * p.nb * kRows;
  for (int64_t b = 0; b < p.nb; ++b) {
    __m256i sum32[NT];
    for (int i = 0; i < NT; ++i) sum32[i] = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + b * 256 + c * 32));
      const __m256i magnitude = _mm256_sign_epi8(w, w);
      for (int i = 0; i < NT; ++i) {
        const int8_t* qb = a.q.data() + (t0 + i) * p.K + b * kBlock;
        const __m256i signed_q = _mm256_sign_epi8(broadcast4(qb + 4 * c), w);
        const __m256i pairs = _mm256_maddubs_epi16(magnitude, signed_q);
        sum32[i] = _mm256_add_epi32(sum32[i], _mm256_madd_epi16(pairs, ones));
      }
    }
    const __m256 dv = load_scales(dg + b * kRows);
    for (int i = 0; i < NT; ++i) {
      const int64_t tb = (t0 + i) * p.nb + b;
      const __m256 dot = _mm256_cvtepi32_ps(sum32[i]);
      acc[i] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dv, _mm256_set1_ps(a.scale[tb])), acc[i]);
    }
  }
  for (int i = 0; i < NT; ++i) _mm256_storeu_ps(out[i], acc[i]);
}

template <bool Q8, int NT>
void run_group(const Problem& p, const QuantizedActivations& a, int64_t g, int64_t t0,
               float* y) {
  float tile[NT][kRows];
  if (Q8) {
    q8_group<NT>(p, a, g, t0, tile);
  } else {
    q4_group<NT>(p, a, g, t0, tile);
  }
  const int64_t rows = std::min(kRows, p.O - g * kRows);  // the last group may be padding
  for (int i = 0; i < NT; ++i) std::memcpy(y + (t0 + i) * p.O + g * kRows, tile[i], rows * 4);
}

// AVX-512 with VNNI, where the CPU has it: two row groups side by side in one 512-bit vector
// (lanes 0-7 group g, lanes 8-15 group g + 1) and the byte products summed straight into 32
// bits by vpdpbusd. Each lane computes the same integers and then the same float steps in
// the same order as the AVX2 kernels above, so the results are bit for bit theirs (the tests
// compare the two); there are half as many instructions per weight.
MORA_AVX512 inline __m512i load_pair(const uint8_t* first, const uint8_t* second) {
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(first));
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(second));
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

MORA_AVX512 inline __m512 load_scale_pair(const uint16_t* first, const uint16_t* second) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(first));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(second));
  return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
}

MORA_AVX512 inline __m512i broadcast4_512(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm512_set1_epi32(v);
}

// Q4_1, groups g and g + 1: nibbles (u8) times activations (i8), 4 products per lane and
// instruction; the low and high nibbles sum into separate registers (two dependency chains).
template <int NT>
MORA_AVX512 void q4_pair(const Problem& p, const QuantizedActivations& a, int64_t g, int64_t t0,
                       float out[][2 * kRows]) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[NT];
  for (int i = 0; i < NT; ++i) acc[i] = _mm512_setzero_ps();
  const uint8_t* w0 = p.packed + g * p.nb * 128;
  const uint8_t* w1 = w0 + p.nb * 128;
  const uint16_t* d0 = p.d + g * p.nb * kRows;
  const uint16_t* m0 = p.m + g * p.nb * kRows;
  for (int64_t b = 0; b < p.nb; ++b) {
    __m512i sum_lo[NT], sum_hi[NT];
    for (int i = 0; i < NT; ++i) sum_lo[i] = sum_hi[i] = _mm512_setzero_si512();
    for (int c = 0; c < 4; ++c) {
      const __m512i raw = load_pair(w0 + b * 128 + c * 32, w1 + b * 128 + c * 32);
      const __m512i lo = _mm512_and_si512(raw, low4);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
      for (int i = 0; i < NT; ++i) {
        const int8_t* qb = a.q.data() + (t0 + i) * p.K + b * kBlock;
        sum_lo[i] = _mm512_dpbusd_epi32(sum_lo[i], lo, broadcast4_512(qb + 4 * c));
        sum_hi[i] = _mm512_dpbusd_epi32(sum_hi[i], hi, broadcast4_512(qb + 16 + 4 * c));
      }
    }
    const __m512 dv = load_scale_pair(d0 + b * kRows, d0 + (p.nb + b) * kRows);
    const __m512 mv = load_scale_pair(m0 + b * kRows, m0 + (p.nb + b) * kRows);
    for (int i = 0; i < NT; ++i) {
      const int64_t tb = (t0 + i) * p.nb + b;
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(sum_lo[i], sum_hi[i]));
      acc[i] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dv, _mm512_set1_ps(a.scale[tb])), acc[i]);
      acc[i] = _mm512_fmadd_ps(mv, _mm512_set1_ps(a.sum[tb]), acc[i]);
    }
  }
  for (int i = 0; i < NT; ++i) _mm512_storeu_ps(out[i], acc[i]);
}

// Q8_0, groups g and g + 1: vpdpbusd wants unsigned bytes on one side, so the activations
// go in shifted by 128 (q + 128 in 0..254) and 128 * sum(w) comes off again, in 32 bits.
template <int NT>
MORA_AVX512 void q8_pair(const Problem& p, const QuantizedActivations& a, int64_t g, int64_t t0,
                       float out[][2 * kRows]) {
  const __m512i ones = _mm512_set1_epi8(1);
  const __m512i shift = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[NT];
  for (int i = 0; i < NT; ++i) acc[i] = _mm512_setzero_ps();
  const uint8_t* w0 = p.packed + g * p.nb * 256;
  const uint8_t* w1 = w0 + p.nb * 256;
  const uint16_t* d0 = p.d + g * p.nb * kRows;
  for (int64_t b = 0; b < p.nb; ++b) {
    __m512i weight_sum = _mm512_setzero_si512(), sum[NT];
    for (int i = 0; i < NT; ++i) sum[i] = _mm512_setzero_si512();
    for (int c = 0; c < 8; ++c) {
      const __m512i w = load_pair(w0 + b * 256 + c * 32, w1 + b * 256 + c * 32);
      weight_sum = _mm512_dpbusd_epi32(weight_sum, ones, w);
      for (int i = 0; i < NT; ++i) {
        const int8_t* qb = a.q.data() + (t0 + i) * p.K + b * kBlock;
        const __m512i shifted = _mm512_xor_si512(broadcast4_512(qb + 4 * c), shift);
        sum[i] = _mm512_dpbusd_epi32(sum[i], shifted, w);
      }
    }
    const __m512i offset = _mm512_slli_epi32(weight_sum, 7);
    const __m512 dv = load_scale_pair(d0 + b * kRows, d0 + (p.nb + b) * kRows);
    for (int i = 0; i < NT; ++i) {
      const int64_t tb = (t0 + i) * p.nb + b;
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum[i], offset));
      acc[i] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dv, _mm512_set1_ps(a.scale[tb])), acc[i]);
    }
  }
  for (int i = 0; i < NT; ++i) _mm512_storeu_ps(out[i], acc[i]);
}

template <bool Q8, int NT>
MORA_AVX512 void run_pair(const Problem& p, const QuantizedActivations& a, int64_t g, int64_t t0,
                        float* y) {
  float tile[NT][2 * kRows];
  if (Q8) {
    q8_pair<NT>(p, a, g, t0, tile);
  } else {
    q4_pair<NT>(p, a, g, t0, tile);
  }
  const int64_t rows = std::min(2 * kRows, p.O - g * kRows);  // g + 1 may end in padding
  for (int i = 0; i < NT; ++i) std::memcpy(y + (t0 + i) * p.O + g * kRows, tile[i], rows * 4);
}

// The row groups from `begin` to `end` for every token: in pairs with VNNI, the last odd
// group (and every group without VNNI) by the AVX2 kernel.
template <bool Q8>
void run_groups(const Problem& p, const QuantizedActivations& a, int64_t T, int64_t begin,
                int64_t end, float* out) {
  int64_t g = begin;
  if (mora::use_avx512()) {
    for (; g + 2 <= end; g += 2) {
      int64_t t0 = 0;
      for (; t0 + 4 <= T; t0 += 4) run_pair<Q8, 4>(p, a, g, t0, out);
      for (; t0 < T; ++t0) run_pair<Q8, 1>(p, a, g, t0, out);
    }
  }
  for (; g < end; ++g) {
    int64_t t0 = 0;
    for (; t0 + 4 <= T; t0 += 4) run_group<Q8, 4>(p, a, g, t0, out);
    for (; t0 < T; ++t0) run_group<Q8, 1>(p, a, g, t0, out);
  }
}

template <bool Q8>
at::Tensor product(const at::Tensor& x, const Problem& p) {
  const int64_t T = x.size(0);
  at::Tensor y = at::empty({T, p.O}, x.options());
  if (T == 0 || p.O == 0) return y;
  const QuantizedActivations a = quantize_activations(x.data_ptr<float>(), T, p.K);
  float* out = y.data_ptr<float>();
  const int64_t groups = (p.O + kRows - 1) / kRows;
  // Threads take pairs of groups (a pair's weights, <= 16 * K bytes, stay in L1 while the
  // token tiles pass over them).
  at::parallel_for(0, (groups + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    run_groups<Q8>(p, a, T, 2 * begin, std::min(2 * end, groups), out);
  });
  return y;
}

void check_input(const at::Tensor& x, int64_t K, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, name,
              ": x must be a float32 CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.is_contiguous(), name,
              ": x must be a contiguous [T, K] matrix with K = ", K);
}

void check_scales(const at::Tensor& s, int64_t groups, int64_t nb, const char* name) {
  TORCH_CHECK(s.scalar_type() == at::kHalf && s.is_contiguous() && s.dim() == 3 &&
                  s.size(0) == groups && s.size(1) == nb && s.size(2) == kRows,
              name, " must be contiguous float16 [O8/8, K/32, 8]");
}

Problem problem(const at::Tensor& packed, int64_t pieces, int64_t out_features,
                const at::Tensor& d) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.dim() == 5 && packed.size(2) == pieces && packed.size(3) == kRows &&
                  packed.size(4) == 4,
              "packed must be contiguous uint8 [O8/8, K/32, ", pieces, ", 8, 4]");
  const int64_t groups = packed.size(0);
  TORCH_CHECK(out_features > (groups - 1) * kRows && out_features <= groups * kRows,
              "out_features ", out_features, " does not fit ", groups, " groups of 8 rows");
  check_scales(d, groups, packed.size(1), "d");
  Problem p;
  p.packed = packed.data_ptr<uint8_t>();
  p.d = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  p.m = nullptr;
  p.nb = packed.size(1);
  p.K = p.nb * kBlock;
  p.O = out_features;
  return p;
}

}  // namespace

// y [T, O] = x [T, K] times the Q4_1 weight (8-row interleaved, see above) transposed.
at::Tensor q4_1_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d,
                       const at::Tensor& m, int64_t out_features) {
  Problem p = problem(packed, 4, out_features, d);
  check_scales(m, packed.size(0), p.nb, "m");
  p.m = reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>());
  check_input(x, p.K, "q4_1_linear");
  return product<false>(x, p);
}

// y [T, O] = x [T, K] times the Q8_0 weight (8-row interleaved int8, see above) transposed.
at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d,
                       int64_t out_features) {
  const Problem p = problem(packed, 8, out_features, d);
  check_input(x, p.K, "q8_0_linear");
  return product<true>(x, p);
}
