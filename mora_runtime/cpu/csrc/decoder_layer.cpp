// One decoder layer of a Llama-family model for a decode step (one new token per sequence),
// in one call: the kernels the compact forward (mora_runtime/models/llama) calls one by one
// from Python, chained here in the same order on the same tensors, so the result is the same
// bit for bit.
//
// Why: at one sequence a layer's arithmetic takes less time than the Python between its
// eleven kernel calls (module calls, views, splits, the cache write).
//
// Semantics, for the residual stream h [n, 1, D] and the previous layer's output `pending`
// (none for the first layer):
//   h += pending;                      x = rms_norm(h, input_norm)
//   q, k, v = split(qkv(x));           q, k = rope(q, k, cos, sin)
//   keys[:, :, L-1] = k; values[:, :, L-1] = v   (the new column of the engine's cache)
//   a = attention(q, keys, values, mask)
//   h += o(a);                         x = rms_norm(h, post_norm)
//   returns down(silu(gate(x)) * up(x))  [n, 1, D], the next layer's `pending`
// with every product an int4 (Q4_1) one (quant_gemm.cpp), plus its bias where it has one.
// Given the forward's ExpertLayerPlan (expert_layer.h), each adapted product (`adapters`,
// in the order q, k, v, o, gate, up, down) then gets its MoRA delta added in place, with its
// own input, as its layer backend call (cpu_fused.py) adds it in the op-by-op forward.
//
// Shape legend: n = sequences, D = hidden size, H / KH = query / key-value heads, d = head
// dim, L = cache columns including the new one, F = the MLP's width.
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "expert_layer.h"
#include "kernels.h"

namespace {

// One adapted product's arguments to ExpertLayerPlan::apply: A, B, present, active,
// active_row, hits (cpu_fused.py's `layer_arguments`).
using Adapter = std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>,
                           std::optional<at::Tensor>, int64_t, std::optional<at::Tensor>>;
using Adapters = std::vector<std::optional<Adapter>>;
enum Product { kQ, kK, kV, kO, kGate, kUp, kDown, kProducts };

// y += the MoRA delta of product `which` for input x (y: a view of a product's output,
// written back if it had to be made contiguous).
void add_delta(mora::ExpertLayerPlan* plan, const Adapters& adapters, Product which,
               const at::Tensor& x, at::Tensor y) {
  if (plan == nullptr || !adapters[which]) return;
  const auto& [A, B, present, active, row, hits] = *adapters[which];
  at::Tensor out = y.is_contiguous() ? y : y.contiguous();
  TORCH_CHECK(plan->apply(x, A, B, out, present, active, row, hits),
              "ExpertLayerPlan refused a layer it had accepted");
  if (!out.is_same(y)) y.copy_(out);
}

// One int4 product's weights, as Q4Linear (mora_runtime/models/quantize.py) holds them.
struct Q4Weights {
  at::Tensor packed, d, m;
  int64_t out_features;
  std::optional<at::Tensor> bias;

  at::Tensor apply(const at::Tensor& x) const {
    at::Tensor y = q4_1_linear(x, packed, d, m, out_features);
    if (bias) y.add_(*bias);
    return y;
  }
};

class DecoderLayer {
 public:
  DecoderLayer(at::Tensor input_norm, double input_eps, at::Tensor post_norm, double post_eps,
               Q4Weights qkv, Q4Weights o, Q4Weights gate_up, Q4Weights down, int64_t heads,
               int64_t kv_heads, int64_t head_dim, double scaling)
      : input_norm_(std::move(input_norm)),
        post_norm_(std::move(post_norm)),
        input_eps_(input_eps),
        post_eps_(post_eps),
        qkv_(std::move(qkv)),
        o_(std::move(o)),
        gate_up_(std::move(gate_up)),
        down_(std::move(down)),
        heads_(heads),
        kv_heads_(kv_heads),
        head_dim_(head_dim),
        scaling_(scaling) {
    TORCH_CHECK(qkv_.out_features == (heads + 2 * kv_heads) * head_dim,
                "qkv must have (H + 2 KH) d outputs");
    TORCH_CHECK(gate_up_.out_features % 2 == 0, "gate_up must stack two equal products");
  }

  at::Tensor forward_(at::Tensor& hidden, const std::optional<at::Tensor>& pending,
                      const at::Tensor& keys, const at::Tensor& values, const at::Tensor& cos,
                      const at::Tensor& sin, const at::Tensor& mask,
                      mora::ExpertLayerPlan* plan, const Adapters& adapters) const {
    TORCH_CHECK(hidden.dim() == 3 && hidden.size(1) == 1 && hidden.is_contiguous(),
                "hidden must be a contiguous [n, 1, D] decode step");
    TORCH_CHECK(plan == nullptr || adapters.size() == kProducts,
                "adapters must have one entry (or None) per product");
    const int64_t n = hidden.size(0), D = hidden.size(2), d = head_dim_;
    const int64_t L = keys.size(2);
    TORCH_CHECK(keys.dim() == 4 && keys.size(0) == n && keys.size(1) == kv_heads_ &&
                    keys.size(3) == d && values.sizes() == keys.sizes(),
                "keys and values must be [n, KH, L, d]");
    at::Tensor h = hidden.view({n, D});
    at::Tensor x = pending ? add_rms_norm_(h, pending->view({n, D}), input_norm_, input_eps_)
                           : rms_norm(h, input_norm_, input_eps_);
    const at::Tensor qkv = qkv_.apply(x);  // [n, (H + 2 KH) d]
    const at::Tensor q_out = qkv.narrow(1, 0, heads_ * d);
    const at::Tensor k_out = qkv.narrow(1, heads_ * d, kv_heads_ * d);
    const at::Tensor v = qkv.narrow(1, (heads_ + kv_heads_) * d, kv_heads_ * d);
    add_delta(plan, adapters, kQ, x, q_out);
    add_delta(plan, adapters, kK, x, k_out);
    add_delta(plan, adapters, kV, x, v);
    at::Tensor q = q_out.view({n, 1, heads_, d});
    at::Tensor k = k_out.view({n, 1, kv_heads_, d});
    rope_(q, k, cos, sin);
    keys.select(2, L - 1).copy_(k.view({n, kv_heads_, d}));
    values.select(2, L - 1).copy_(v.view({n, kv_heads_, d}));
    const at::Tensor attended =
        decode_attention(q.reshape({n, heads_, d}).contiguous(), keys, values, mask, scaling_);
    const at::Tensor attended_rows = attended.view({n, heads_ * d});
    const at::Tensor o = o_.apply(attended_rows);
    add_delta(plan, adapters, kO, attended_rows, o);
    x = add_rms_norm_(h, o, post_norm_, post_eps_);
    const at::Tensor gate_up = gate_up_.apply(x);  // [n, 2 F]
    const int64_t F = gate_up.size(1) / 2;
    const at::Tensor gate = gate_up.narrow(1, 0, F), up = gate_up.narrow(1, F, F);
    add_delta(plan, adapters, kGate, x, gate);
    add_delta(plan, adapters, kUp, x, up);
    const at::Tensor act = silu_mul(gate, up);
    const at::Tensor down = down_.apply(act);
    add_delta(plan, adapters, kDown, act, down);
    return down.view({n, 1, D});
  }

 private:
  at::Tensor input_norm_, post_norm_;
  double input_eps_, post_eps_;
  Q4Weights qkv_, o_, gate_up_, down_;
  int64_t heads_, kv_heads_, head_dim_;
  double scaling_;
};

}  // namespace

void bind_decoder_layer(pybind11::module& module) {
  namespace py = pybind11;
  py::class_<Q4Weights>(module, "Q4Weights", py::module_local())
      .def(py::init([](at::Tensor packed, at::Tensor d, at::Tensor m, int64_t out_features,
                       std::optional<at::Tensor> bias) {
             return Q4Weights{std::move(packed), std::move(d), std::move(m), out_features,
                              std::move(bias)};
           }),
           py::arg("packed"), py::arg("d"), py::arg("m"), py::arg("out_features"),
           py::arg("bias"));
  py::class_<DecoderLayer>(module, "DecoderLayer", py::module_local())
      .def(py::init<at::Tensor, double, at::Tensor, double, Q4Weights, Q4Weights, Q4Weights,
                    Q4Weights, int64_t, int64_t, int64_t, double>(),
           py::arg("input_norm"), py::arg("input_eps"), py::arg("post_norm"),
           py::arg("post_eps"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"),
           py::arg("down"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
           py::arg("scaling"))
      // The GIL is kept, as for the decode-sized expert layer calls (expert_layer.cpp).
      .def("forward_", &DecoderLayer::forward_, py::arg("hidden"), py::arg("pending"),
           py::arg("keys"), py::arg("values"), py::arg("cos"), py::arg("sin"), py::arg("mask"),
           py::arg("plan"), py::arg("adapters"));
}
