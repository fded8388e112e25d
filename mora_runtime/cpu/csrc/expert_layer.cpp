// The Python binding of ExpertLayerPlan (expert_layer.h, where its semantics are).
#include "expert_layer.h"

using mora::ExpertLayerPlan;

void bind_expert_layer(pybind11::module& module) {
  namespace py = pybind11;
  // module_local: the AVX2 and the portable build may both be loaded in one process.
  py::class_<ExpertLayerPlan>(module, "ExpertLayerPlan", py::module_local())
      .def(py::init<int64_t, int64_t, double, double, at::Tensor, int64_t,
                    std::optional<at::Tensor>, std::optional<at::Tensor>,
                    std::optional<at::Tensor>, std::optional<at::Tensor>,
                    std::optional<at::Tensor>>(),
           py::arg("num_tokens"), py::arg("top_k"), py::arg("threshold"), py::arg("tau"),
           py::arg("slot_scale"), py::arg("kernel_max_tokens"), py::arg("mask"),
           py::arg("seq"), py::arg("seq_top_k"), py::arg("seq_threshold"), py::arg("valid"))
      .def("accepts", &ExpertLayerPlan::accepts)
      // The GIL is kept for decode-sized calls, which are short: each release hands it to
      // whichever thread waits (a server replica's event loop), and taking it back waits for
      // that thread, once per adapted layer. Prefill-sized calls release it.
      .def(
          "apply",
          [](ExpertLayerPlan& plan, const at::Tensor& x, const at::Tensor& A,
             const at::Tensor& B, at::Tensor y, const std::optional<at::Tensor>& present,
             const std::optional<at::Tensor>& active, int64_t active_row,
             const std::optional<at::Tensor>& hits) {
            if (!plan.releases_gil()) {
              return plan.apply(x, A, B, y, present, active, active_row, hits);
            }
            py::gil_scoped_release release;
            return plan.apply(x, A, B, y, present, active, active_row, hits);
          },
          py::arg("x"), py::arg("A"), py::arg("B"), py::arg("y"), py::arg("present"),
          py::arg("active"), py::arg("active_row"), py::arg("hits"));
}
