"""The Triton backend: CUDA inference through one fused routing-and-update kernel per layer
(`triton_kernel.py`), after one torch product for the scores.

Per layer: z = x A^T (torch), then one launch over (tokens, output blocks) that does the
norm, signed top-k, softmax, threshold, gather of the kept value rows and the float32
accumulation into the base output, and writes the statistics the forward context collects
(the same [L, T] active counts and [S, N] hits the other backends fill). Everything a layer
reads of the forward (token -> sequence, visible-slot masks, per-sequence budgets and
thresholds, valid tokens) is a device tensor of the layout built once per forward, and the
largest budget is worked out at `prepare` from host values, so a layer's call reads nothing
back from the device.

On a machine without CUDA it runs only under TRITON_INTERPRET=1 (the CPU tests); the
selector's "auto" considers it for CUDA forwards only. A launch that fails (the kernel does
not compile for this GPU or this triton) is logged once, that call is served by the torch
backend, and `prepare` refuses from then on: the process keeps serving on the tensor path.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, ClassVar

import torch
from torch import Tensor

from mora_runtime.experts.backends.base import AdaptedLayer, ForwardSpec, LayerBackend
from mora_runtime.experts.backends.torch_backend import TorchBackend, budget_bound
from mora_runtime.experts.routing import effective_top_k

logger = logging.getLogger(__name__)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Output columns per program: wide enough to amortise each token's routing (which every
# output block of the token repeats), narrow enough to give a decode step many programs.
MAX_BLOCK_O = 512


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(LayerBackend):
    name = "triton"
    # Why this process stopped using the kernel (a failed launch), or None.
    disabled: ClassVar[str | None] = None

    def __init__(self, spec: ForwardSpec, kernel: Any, k_max: int, meta: dict[str, Any]) -> None:
        super().__init__(spec)
        self._kernel = kernel
        self._k_max = k_max  # the largest effective budget of any token
        self._meta = meta  # the layout's device tensors, in the kernel's dtypes

    @classmethod
    def available(cls) -> bool:
        if importlib.util.find_spec("triton") is None:
            return False
        return torch.cuda.is_available() or _interpreting()

    @classmethod
    def prepare(cls, spec: ForwardSpec) -> TritonBackend | str:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if cls.disabled is not None:
            return f"disabled in this process after a failed launch ({cls.disabled})"
        if spec.device.type != "cuda" and not _interpreting():
            return "CUDA tensors only (or TRITON_INTERPRET=1)"
        if spec.training or spec.needs_grad or spec.trainable is not None:
            return "inference only (no gradients, no pruning-free training)"
        if spec.dtype not in DTYPES:
            return "float32, float16 or bfloat16 experts only"
        layout = spec.layout
        assert layout is not None  # only the trainable path has none
        from mora_runtime.experts.backends import triton_kernel

        context = spec.context
        valid = context.valid_mask(layout) if context is not None else None
        meta = {
            "seq": layout.seq,
            "mask": None if layout.mask is None else layout.mask.contiguous().view(torch.uint8),
            "top_k": layout.top_k,
            "threshold": layout.threshold,
            "valid": None if valid is None else valid.view(torch.uint8),
        }
        # The most max passes any token needs (`budget_bound`: host values).
        return cls(spec, triton_kernel.compiled(), budget_bound(spec), meta)

    def apply(self, x: Tensor, y: Tensor, layer: AdaptedLayer) -> Tensor:
        try:
            return self._launch(x, y, layer)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # a kernel that cannot compile or launch here
            TritonBackend.disabled = f"{type(error).__name__}: {error}"[:300]
            logger.exception("Triton kernel failed; serving with the torch backend from now on")
            return TorchBackend.prepare(self.spec).apply(x, y, layer)

    def _launch(self, x: Tensor, y: Tensor, layer: AdaptedLayer) -> Tensor:
        spec, layout, meta = self.spec, self.spec.layout, self._meta
        assert layout is not None
        A, B, present = layer.weights(spec.num_slots)  # [N, D], [N, O], [N] | None
        x2 = x.reshape(-1, x.shape[-1])  # [T, D]
        if A.dtype != x2.dtype:
            A, B = A.to(x2.dtype), B.to(x2.dtype)
        num_tokens, (num_slots, out_features) = x2.shape[0], B.shape
        if num_tokens == 0:
            return y
        if B.stride(1) != 1:
            B = B.contiguous()
        z = torch.mm(x2, A.t())  # [T, N]: scores in x's dtype, as the tensor path
        y2 = y.reshape(-1, out_features)  # [T, O]
        if y2.stride(1) != 1:
            y2 = y2.contiguous()
        out = torch.empty(num_tokens, out_features, dtype=y.dtype, device=y.device)
        active, row, hits = (
            spec.context.recording_buffers(layer.kind, layout) if spec.records else (None, 0, None)
        )
        mask = meta["mask"]
        block_n = _next_power_of_2(num_slots)
        block_o = min(_next_power_of_2(out_features), MAX_BLOCK_O)
        grid = (num_tokens, -(-out_features // block_o))
        # Pointers the kernel does not read (their HAS_* flag is off) still need an argument.
        self._kernel[grid](
            z,
            B,
            y2,
            out,
            spec.slot_scale,
            meta["seq"],
            z if mask is None else mask,
            z if present is None else present.view(torch.uint8),
            z if meta["top_k"] is None else meta["top_k"],
            z if meta["threshold"] is None else meta["threshold"],
            z if meta["valid"] is None else meta["valid"],
            z if active is None else active,
            z if hits is None else hits,
            num_slots,
            out_features,
            z.stride(0),
            B.stride(0),
            y2.stride(0),
            out.stride(0),
            0 if mask is None or mask.shape[0] == 1 else mask.stride(0),
            0 if hits is None else hits.stride(0),
            0 if active is None else row * active.stride(0),
            effective_top_k(spec.routing.top_k, num_slots),
            float(spec.routing.tau),
            float(spec.routing.threshold),
            K_MAX=self._k_max,
            BLOCK_N=block_n,
            BLOCK_O=block_o,
            HAS_MASK=mask is not None,
            HAS_PRESENT=present is not None,
            HAS_TOP_K=meta["top_k"] is not None,
            HAS_THRESHOLD=meta["threshold"] is not None,
            HAS_VALID=meta["valid"] is not None,
            RECORD=active is not None,
            num_warps=4 if block_n <= 2048 else 8,
        )
        return out.reshape(y.shape)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
