"""The fused CPU extension: scores, routing, value update and statistics of one adapted layer
in one call (`ExpertLayerPlan`, csrc/expert_layer.cpp), for CPU float32 inference; the
extension's AVX2 build where the CPU has it, else its portable build (mora_runtime/cpu/build.py).

No tensor op on the way from the layer to the extension: a decode step makes this call in
every adapted layer, and each op would release the GIL, which a server replica's other
threads may then hold for a while (docs/performance.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mora_runtime.cpu import build as cpu_kernels
from mora_runtime.experts.backends.base import AdaptedLayer, ForwardSpec, LayerBackend
from mora_runtime.experts.backends.torch_backend import TorchBackend

# Up to this many tokens the AVX2 build computes the scores with its own kernel (a decode
# step's size); beyond, BLAS is the faster GEMM and the extension calls at::mm.
KERNEL_MAX_TOKENS = 64


class CpuFusedBackend(LayerBackend):
    name = "cpu_fused"
    in_place = True

    def __init__(self, spec: ForwardSpec, plan: Any) -> None:
        super().__init__(spec)
        self._plan = plan  # the extension's ExpertLayerPlan for this forward
        self._fallback: TorchBackend | None = None

    @classmethod
    def available(cls) -> bool:
        return cpu_kernels.layer_kernels() is not None

    @classmethod
    def prepare(cls, spec: ForwardSpec) -> CpuFusedBackend | str:
        if spec.device.type != "cpu" or spec.dtype != torch.float32:
            return "CPU float32 experts only"
        if spec.training or spec.needs_grad or spec.trainable is not None:
            return "inference only (no gradients, no pruning-free training)"
        compiled = cpu_kernels.layer_kernels()
        if compiled is None:
            return "the CPU extension could not be built here (a C++ compiler with OpenMP)"
        layout = spec.layout
        assert layout is not None
        valid = spec.context.valid_mask(layout) if spec.context is not None else None
        plan = compiled.ExpertLayerPlan(
            layout.num_tokens,
            spec.routing.top_k,
            spec.routing.threshold,
            spec.routing.tau,
            spec.slot_scale.contiguous(),
            KERNEL_MAX_TOKENS,
            None if layout.mask is None else layout.mask.contiguous(),
            layout.seq if layout.num_sequences > 1 else None,
            layout.top_k,
            layout.threshold,
            valid,
        )
        # Every layer of the forward has N slots: a budget over the kernel's limit is
        # refused once here, before any layer records statistics.
        if not plan.accepts(spec.num_slots):
            return "a token's top_k is over the extension's limit"
        return cls(spec, plan)

    def apply(self, x: Tensor, y: Tensor, layer: AdaptedLayer) -> Tensor:
        if x.dtype != torch.float32 or y.dtype != torch.float32 or not y.is_contiguous():
            # A model whose activations are not float32 around float32 experts: this
            # layer takes the tensor path (which casts), the others stay here.
            if self._fallback is None:
                self._fallback = TorchBackend(self.spec)
            return self._fallback.apply(x, y, layer)
        A, B, present, active, row, hits = self.layer_arguments(layer)
        if not self._plan.apply(x, A, B, y, present, active, row, hits):
            raise RuntimeError("ExpertLayerPlan refused a layer it had accepted")
        return y

    @property
    def plan(self) -> Any:
        """The extension's ExpertLayerPlan of this forward (a whole-layer call takes it)."""
        return self._plan

    def layer_arguments(self, layer: AdaptedLayer) -> tuple:
        """What `ExpertLayerPlan.apply` takes of `layer` besides x and y: A, B, present,
        active, active_row, hits. Each call takes the layer's row of the recorder, once per
        layer and forward."""
        A, B, present = layer.weights(self.spec.num_slots)
        spec = self.spec
        active, row, hits = (
            spec.context.recording_buffers(layer.kind, spec.layout)
            if spec.records
            else (None, 0, None)
        )
        return A, B, present, active, row, hits
