// The Python module of the CPU kernels (built by mora_runtime/cpu/build.py). Its portable
// build (no AVX2) has the layer call alone.
#include <torch/extension.h>

#ifdef __AVX2__
#include "avx512.h"
#include "kernels.h"
#endif
void bind_expert_layer(pybind11::module& module);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
#ifdef __AVX2__
  module.def("q4_1_linear", &q4_1_linear, "x @ dequant(Q4_1 weight).T, 8-bit activations");
  module.def("q8_0_linear", &q8_0_linear, "x @ dequant(Q8_0 weight).T, 8-bit activations");
  module.def(
      "set_avx512", [](bool enabled) { return mora::avx512_allowed.exchange(enabled); },
      "whether kernels may take their AVX-512 paths; returns the previous setting");
  module.def("avx512_available", &mora::cpu_has_avx512, "whether this CPU has them");
  module.def("decode_attention", &decode_attention,
             "one query token per sequence against its cached keys and values");
  module.def("expert_scores", &expert_scores, "x [T, D] @ A [N, D]^T for small T");
  module.def("rms_norm", &rms_norm, "Llama's RMSNorm of the rows of x");
  module.def("add_rms_norm_", &add_rms_norm_, "x += delta in place, then RMSNorm of x");
  module.def("rope_", &rope_, "rotary position embedding of q and k, in place");
  module.def("silu_mul", &silu_mul, "silu(gate) * up");
  bind_decoder_layer(module);  // DecoderLayer: a whole decode step of one layer
#endif
  bind_expert_layer(module);  // ExpertLayerPlan: scores + routing + update of a layer
}
