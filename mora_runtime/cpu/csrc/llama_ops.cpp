// The small per-layer operations of a Llama-family decoder (mora_runtime/models/llama), one
// call each on float32 CPU tensors.
//
// Why: at decode sizes each of these is a few thousand flops, and torch spends far longer
// setting up its composite versions (RMSNorm alone is a cast, pow, mean, add, rsqrt and
// two products, each allocating) than computing them.
//
//   rms_norm(x [T, D], w [D], eps) = w * x / sqrt(mean(x^2) + eps)      (HF's LlamaRMSNorm)
//   add_rms_norm_(x, delta, w, eps): x += delta in place (the residual), then rms_norm(x)
//   rope_(q, k, cos, sin): in place on q [n, P, H, d] and k [n, P, KH, d] (unit stride along
//       d), with the tables cos, sin [n, P, d] of HF's rotary embedding:
//       x[i] <- x[i] cos[i] - x[i + d/2] sin[i],  x[i + d/2] <- x[i + d/2] cos[i + d/2] + x[i] sin[i + d/2]
//   silu_mul(gate, up [T, F], unit stride along F) = silu(gate) * up, contiguous [T, F]
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>

namespace {

// Rows (heads for rotary) below which a call runs on one thread: a decode step's few
// thousand elements take less time than waking the pool's other threads.
constexpr int64_t kSerialRows = 64;
constexpr int64_t kSerialHeads = 1024;

void check_f32_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name,
              " must be a float32 CPU tensor");
}

// Rotates one head's row in place (see the file's comment).
inline void rotate_row(float* x, const float* c, const float* s, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i];
    const float b = x[i + half];
    x[i] = a * c[i] - b * s[i];
    x[i + half] = b * c[i + half] + a * s[i + half];
  }
}

void rope_heads(at::Tensor& x, const float* cos, const float* sin, int64_t n, int64_t p) {
  const int64_t heads = x.size(2), dim = x.size(3), half = dim / 2;
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
  float* base = x.data_ptr<float>();
  at::parallel_for(0, n * p * heads, kSerialHeads, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i % heads, token = i / heads, row = token / p, pos = token % p;
      float* v = base + row * s0 + pos * s1 + h * s2;
      const int64_t table = token * dim;
      rotate_row(v, cos + table, sin + table, half);
    }
  });
}

}  // namespace

namespace {

at::Tensor norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps,
                     const at::Tensor* delta) {
  check_f32_cpu(x, "x");
  check_f32_cpu(weight, "weight");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "x and weight must be contiguous");
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  TORCH_CHECK(weight.numel() == dim, "weight must have x's last size");
  if (delta != nullptr) {
    check_f32_cpu(*delta, "delta");
    TORCH_CHECK(delta->is_contiguous() && delta->sizes() == x.sizes(),
                "delta must be contiguous and shaped like x");
  }
  at::Tensor out = at::empty_like(x);
  float* in = x.data_ptr<float>();
  const float* add = delta != nullptr ? delta->data_ptr<float>() : nullptr;
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, kSerialRows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* xr = in + r * dim;
      float* orow = o + r * dim;
      if (add != nullptr) {
        const float* dr = add + r * dim;
        for (int64_t i = 0; i < dim; ++i) xr[i] += dr[i];
      }
      float sum = 0.0f;
      for (int64_t i = 0; i < dim; ++i) sum += xr[i] * xr[i];
      const float scale = 1.0f / std::sqrt(sum / static_cast<float>(dim) + static_cast<float>(eps));
      for (int64_t i = 0; i < dim; ++i) orow[i] = w[i] * (xr[i] * scale);
    }
  });
  return out;
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return norm_rows(x, weight, eps, nullptr);
}

at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight,
                         double eps) {
  return norm_rows(x, weight, eps, &delta);
}

void rope_(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  for (const at::Tensor* t : {&q, &k}) {
    check_f32_cpu(*t, "q and k");
    TORCH_CHECK(t->dim() == 4 && t->stride(3) == 1 && t->size(3) % 2 == 0,
                "q and k must be [n, P, heads, d] with unit stride along an even d");
  }
  check_f32_cpu(cos, "cos");
  check_f32_cpu(sin, "sin");
  const int64_t n = q.size(0), p = q.size(1), dim = q.size(3);
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == n * p * dim &&
                  sin.numel() == n * p * dim && k.size(0) == n && k.size(1) == p &&
                  k.size(3) == dim,
              "cos and sin must be contiguous [n, P, d] matching q and k");
  rope_heads(q, cos.data_ptr<float>(), sin.data_ptr<float>(), n, p);
  rope_heads(k, cos.data_ptr<float>(), sin.data_ptr<float>(), n, p);
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  check_f32_cpu(gate, "gate");
  check_f32_cpu(up, "up");
  TORCH_CHECK(gate.dim() == 2 && gate.sizes() == up.sizes() && gate.stride(1) == 1 &&
                  up.stride(1) == 1,
              "gate and up must be [T, F] with unit stride along F");
  const int64_t rows = gate.size(0), width = gate.size(1);
  const int64_t gate_stride = gate.stride(0), up_stride = up.stride(0);
  at::Tensor out = at::empty({rows, width}, gate.options());
  const float* g = gate.data_ptr<float>();
  const float* u = up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, kSerialRows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gr = g + r * gate_stride;
      const float* ur = u + r * up_stride;
      float* orow = o + r * width;
      for (int64_t i = 0; i < width; ++i) orow[i] = gr[i] / (1.0f + std::exp(-gr[i])) * ur[i];
    }
  });
  return out;
}
