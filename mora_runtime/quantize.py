"""Weight-only quantised linear layers for CPU serving (`weights: int4`).

A decode step of a small LM on a CPU is bound by reading the weights: SmolLM2-135M in
float32 is 540 MB per token for a batch of one. Its bundled GGUF is 4-bit already (Q4_1:
per block of 32 inputs a scale and a minimum), so the float32 copy set-up makes is that
4-bit grid written out at 8x the size. `Int4Linear` stores it back as 4-bit integers in
groups of 32 along the input, asymmetric (scale + minimum), which reproduces a Q4_1 grid
exactly (up to the bfloat16 precision of its scales), and multiplies with torch's CPU int4
kernel. The output layer (Q8_0 in the GGUF) becomes `Int8Linear`: per-output-channel int8.

Both kernels take bfloat16 activations (their float32 paths are not vectorised): inputs are
rounded to bfloat16 for the product and outputs come back in the model's dtype, so
norms, attention, the KV cache, the residual stream and the MoRA experts stay float32.
What that costs in accuracy is measured by `benchmarks/engine.py`.

The quantised layers keep the float weight they were made from (the same tensor, no copy)
and use it for inputs of more than one position per row: a prompt's prefill. The int4
kernel is compute-bound there (1.6-2.4x slower than float32 GEMM for 35-560 prompt tokens
on this machine), while decoding (one position per sequence) is bound by reading weights,
where 4 bits win. The choice depends on the input's shape only, never on what else is in
the batch, so a request's tokens come out the same whatever it is batched with, and HF
`generate` on the same model makes the same choice.

Only for the CPU: CUDA serves the model's own dtype (bfloat16 by default).

Shape legend: O = out features, K = in features, G = K / group size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

WeightFormat = Literal["auto", "float", "int4"]
GROUP_SIZE = 32
_COMPUTE_DTYPE = torch.bfloat16
_INT4_OUT_MULTIPLE = 16  # the packing kernel's requirement on O


def int4_supported(device: torch.device | str = "cpu") -> bool:
    """Whether torch here has the CPU int4/int8 weight-only kernels (and `device` is a CPU)."""
    return (
        torch.device(device).type == "cpu"
        and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        and hasattr(torch.ops.aten, "_weight_int8pack_mm")
    )


class QuantizedLinear(nn.Module):
    """Shared by the quantised layers: shapes, the float weight and bias, the prefill path.

    Keeping `weight` also keeps the base model's fingerprint (expert_set.base_fingerprint):
    expert sets learned on the float checkpoint load onto the quantised one."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("weight", weight)  # the float weight, for prefill (see above)
        self.register_buffer("bias", linear.bias.detach() if linear.bias is not None else None)
        self.prefill_float = True

    def _use_float(self, x: Tensor) -> bool:
        # [..., positions, K] with more than one position per row: a prompt's prefill.
        return self.prefill_float and x.dim() >= 2 and x.shape[-2] > 1

    def _float_forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def _finish(self, y: Tensor, x: Tensor) -> Tensor:
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int4Linear(QuantizedLinear):
    """Semantics: y = x W^T + b, W[o, g*32 + j] = scale[g, o] * q + minimum[g, o], q in 0..15.

    packed: torch's int4 layout of q; scales_zeros [G, O, 2] bf16 holds (scale, minimum +
    8 * scale), the kernel's form of the same affine map.
    """

    def __init__(self, linear: nn.Linear, group_size: int = GROUP_SIZE) -> None:
        super().__init__(linear)
        self.group_size = group_size
        q, scale, minimum = quantize_int4(linear.weight.detach().float(), group_size)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        zeros = minimum + 8 * scale
        scales_zeros = torch.stack([scale.t(), zeros.t()], dim=-1)  # [G, O, 2]
        self.register_buffer("scales_zeros", scales_zeros.to(_COMPUTE_DTYPE).contiguous())

    @staticmethod
    def accepts(linear: nn.Module, group_size: int = GROUP_SIZE) -> bool:
        return (
            type(linear) is nn.Linear
            and linear.in_features % group_size == 0
            and linear.out_features % _INT4_OUT_MULTIPLE == 0
        )

    def forward(self, x: Tensor) -> Tensor:
        if self._use_float(x):
            return self._float_forward(x)
        x2 = x.reshape(-1, self.in_features).to(_COMPUTE_DTYPE)  # [T, K]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.packed, self.group_size, self.scales_zeros
        )  # [T, O]
        return self._finish(y, x)

    def dequantized(self) -> Tensor:
        """[O, K] float32: the weight the kernel multiplies by (for tests and checks)."""
        eye = torch.eye(self.in_features, dtype=_COMPUTE_DTYPE)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.packed, self.group_size, self.scales_zeros
        )  # [K, O]
        return out.float().t().contiguous()


class Int8Linear(QuantizedLinear):
    """Semantics: y = x W^T + b, W[o, k] = scale[o] * q[o, k], q in -127..127."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127  # [O]
        q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)  # [O, K]
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scale.to(_COMPUTE_DTYPE))

    @staticmethod
    def accepts(linear: nn.Module) -> bool:
        return type(linear) is nn.Linear

    def forward(self, x: Tensor) -> Tensor:
        if self._use_float(x):
            return self._float_forward(x)
        x2 = x.reshape(-1, self.in_features).to(_COMPUTE_DTYPE)  # [T, K]
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)  # [T, O]
        return self._finish(y, x)


def set_prefill_float(model: nn.Module, enabled: bool) -> None:
    """Whether the quantised layers of `model` use their float weights for prefill (default);
    off, every input takes the quantised kernels (to measure them, e.g. in benchmarks)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.prefill_float = enabled


def quantize_int4(weight: Tensor, group_size: int = GROUP_SIZE) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit groups along K: (q [O, K] int32 in 0..15, scale [O, G], min [O, G]).

    A weight already on a 16-level grid per group (a dequantised Q4_1 GGUF) comes back to
    the same grid: its minimum maps to 0 and its maximum to 15."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // group_size, group_size)  # [O, G, 32]
    minimum = groups.amin(dim=-1)  # [O, G]
    scale = (groups.amax(dim=-1) - minimum) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: q = 0
    q = torch.round((groups - minimum[..., None]) / scale[..., None]).clamp(0, 15)
    return q.reshape(out_features, in_features).to(torch.int32), scale, minimum


def quantize_model(model: nn.Module, *, skip: Iterable[str] = ()) -> dict[str, int]:
    """Replace the model's linears in place: blocks -> Int4Linear, output head -> Int8Linear.

    The input embedding stays float (an embedding lookup reads one row per token). Layers the
    int4 kernel cannot take (shapes) keep their float weights. Returns counts per kind.
    Must run before `patching.patch_model`.
    """
    if not int4_supported():
        raise RuntimeError(f"torch {torch.__version__} lacks the CPU int4/int8 weight kernels")
    skipped = set(skip)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    counts = {"int4": 0, "int8": 0, "float": 0}
    for path, module in list(model.named_modules()):
        if path in skipped or not isinstance(module, nn.Linear):
            continue
        if module is head:
            replacement: nn.Module = Int8Linear(module)
            counts["int8"] += 1
        elif Int4Linear.accepts(module):
            replacement = Int4Linear(module)
            counts["int4"] += 1
        else:
            counts["float"] += 1
            continue
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, replacement)
    logger.info(
        "quantised %d linears to int4 and %d to int8; %d stay float",
        counts["int4"],
        counts["int8"],
        counts["float"],
    )
    return counts
