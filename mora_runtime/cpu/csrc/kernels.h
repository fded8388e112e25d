// The AVX2 build's kernels, declared once for the bindings and for the calls that chain
// them (decoder_layer.cpp). Semantics are in each kernel's own file.
#pragma once

#include <torch/extension.h>

at::Tensor q4_1_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d,
                       const at::Tensor& m, int64_t out_features);
at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d,
                       int64_t out_features);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& mask, double scale);
at::Tensor expert_scores(const at::Tensor& x, const at::Tensor& A);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight,
                         double eps);
void rope_(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);
void bind_decoder_layer(pybind11::module& module);
