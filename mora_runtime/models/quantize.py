"""Block-quantised linear layers for CPU serving (`weights: int4`).

A decode step of a small LM on a CPU is bound by reading the weights: SmolLM2-135M in
float32 is 540 MB per step. Its bundled GGUF is 4-bit already (Q4_1: per block of 32 inputs
a scale d and a minimum m, w = d * n + m with n in 0..15; the output layer Q8_0), so the
float32 copy set-up writes is that grid at 8x the size. `Q4Linear` stores it back on the
GGUF's grid and `Q8Linear` does the same for the output layer; re-quantising the float32
copy finds the very same grid (each block's minimum maps to 0 and its maximum to 15, resp.
+-127), with the GGUF's float16 scales, so the weights are exactly the GGUF's (a float
checkpoint quantised to int4 gets its scales rounded to float16 the same way). Both keep them
interleaved by groups of 8 output rows (`_to_groups`), the layout that lets the kernel
compute 8 outputs per vector without horizontal sums, faster than row-major GGUF blocks
at decode sizes (docs/performance.md).

The products run in csrc/quant_gemm.cpp: activations are quantised per block of 32 to 8
bits on the fly and multiplied with integer dot products, as llama.cpp does for these
formats. Norms, attention, the KV cache, the residual stream and the MoRA experts stay
float32. `benchmarks/decode.py` measures what the 8-bit activations cost in accuracy.

The layers keep the float weight they were made from (the same tensor: no copy) for inputs
with more than one position per row, a prompt's prefill: there the integer kernel is
compute-bound and float32 GEMM is faster, while a decode step (one position per sequence) is
bound by reading weights, where 4 bits win. The choice depends on the input's shape only,
never on what else is in the batch, so a request gets the same arithmetic whatever it is
batched with, and HF `generate` on the same model makes the same choice. The kernels need
x86-64 with AVX2 and FMA; elsewhere, and on CUDA, models keep float weights.

Shape legend: T = tokens, O = out features, K = in features, G = K / 32 blocks.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor, nn

from mora_runtime.cpu.build import kernels

logger = logging.getLogger(__name__)

WeightFormat = Literal["auto", "float", "int4"]
BLOCK = 32


# --- the kernels ---------------------------------------------------------------------------------


def int4_supported(device: torch.device | str = "cpu") -> bool:
    """Whether `int4` weights can be served on `device` (a CPU with the kernels built)."""
    return torch.device(device).type == "cpu" and kernels() is not None


# --- packing -------------------------------------------------------------------------------------


def _float16_grid(scales: Tensor) -> Tensor:
    """`scales` rounded to float16 (GGUF stores them so), kept as float32 values."""
    rounded = scales.half()
    if not torch.isfinite(rounded).all():
        raise ValueError("a block's scale or minimum is beyond float16's range")
    return rounded.float()


def pack_q4_1(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[O, K] float -> (nibbles [O, K/2] uint8, d [O, G], m [O, G]) in GGUF's Q4_1 layout:
    byte j of a block holds input j (low nibble) and input j + 16 (high nibble). d and m are
    float16 values (as float32), as in a GGUF: weights from a Q4_1 GGUF come back exactly."""
    out_features, in_features = weight.shape
    blocks = weight.detach().float().reshape(out_features, in_features // BLOCK, BLOCK)
    minimum = _float16_grid(blocks.amin(dim=-1))  # [O, G]
    d = _float16_grid((blocks.amax(dim=-1) - minimum) / 15)
    safe = torch.where(d > 0, d, torch.ones_like(d))  # a constant block: every n is 0
    n = torch.round((blocks - minimum[..., None]) / safe[..., None]).clamp(0, 15).to(torch.uint8)
    nibbles = n[..., :16] | (n[..., 16:] << 4)  # [O, G, 16]
    return nibbles.reshape(out_features, in_features // 2).contiguous(), d, minimum


def unpack_q4_1(nibbles: Tensor, d: Tensor, m: Tensor) -> Tensor:
    """The [O, K] float32 weight a Q4_1 layer multiplies by."""
    blocks = nibbles.reshape(*d.shape, 16)
    n = torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).float()  # [O, G, 32]
    return (n * d[..., None] + m[..., None]).reshape(d.shape[0], -1)


def pack_q8_0(weight: Tensor) -> tuple[Tensor, Tensor]:
    """[O, K] float -> (w8 [O, K] int8, d [O, G]) in GGUF's Q8_0 form: w = d * w8, d a
    float16 value (as float32)."""
    out_features, in_features = weight.shape
    blocks = weight.detach().float().reshape(out_features, in_features // BLOCK, BLOCK)
    d = _float16_grid(blocks.abs().amax(dim=-1) / 127)  # [O, G]
    safe = torch.where(d > 0, d, torch.ones_like(d))
    w8 = torch.round(blocks / safe[..., None]).clamp(-127, 127).to(torch.int8)
    return w8.reshape(out_features, in_features).contiguous(), d


def unpack_q8_0(w8: Tensor, d: Tensor) -> Tensor:
    return (w8.reshape(*d.shape, BLOCK).float() * d[..., None]).reshape(w8.shape)


ROWS = 8  # output rows per interleaved group of the kernels' layout


def _to_groups(t: Tensor, pieces: int) -> Tensor:
    """[O, G * pieces * 4] bytes or [O, G] scales -> the kernels' 8-row interleaved layout,
    [O8/8, G, pieces, 8, 4] resp. [O8/8, G, 8] (O padded to a multiple of 8 with zeros)."""
    rows = -(-t.shape[0] // ROWS) * ROWS
    padded = torch.nn.functional.pad(t, (0, 0, 0, rows - t.shape[0]))
    if pieces == 0:  # scales: [O8/8, 8, G] -> [O8/8, G, 8]
        return padded.reshape(rows // ROWS, ROWS, -1).transpose(1, 2).contiguous()
    grouped = padded.reshape(rows // ROWS, ROWS, -1, pieces, 4)  # [O8/8, 8, G, pieces, 4]
    return grouped.permute(0, 2, 3, 1, 4).contiguous()


def _from_groups(t: Tensor, out_features: int) -> Tensor:
    """The inverse of `_to_groups`: [O, ...] rows in their original order."""
    if t.dim() == 3:  # scales
        return t.transpose(1, 2).reshape(-1, t.shape[1])[:out_features]
    return t.permute(0, 3, 1, 2, 4).reshape(-1, t.shape[1] * t.shape[2] * 4)[:out_features]


def quantize_activations(x: Tensor) -> Tensor:
    """What the kernels multiply by: x [T, K] rounded to 8 bits per block of 32 (float32)."""
    blocks = x.float().reshape(x.shape[0], -1, BLOCK)  # [T, G, 32]
    s = blocks.abs().amax(dim=-1, keepdim=True) / 127
    q = torch.round(blocks / torch.where(s > 0, s, torch.ones_like(s)))
    return (q * s).reshape(x.shape)


# --- layers --------------------------------------------------------------------------------------


class QuantizedLinear(nn.Module):
    """Shared by the quantised layers: shapes, the float weight and bias, the prefill path.

    Keeping `weight` also keeps the base model's fingerprint (expert_set.base_fingerprint):
    expert sets learned on the float checkpoint load onto the quantised one."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.in_features % BLOCK:
            raise ValueError(f"in_features must be a multiple of {BLOCK}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.register_buffer("weight", linear.weight.detach())  # for prefill (see above)
        self.register_buffer("bias", linear.bias.detach() if linear.bias is not None else None)
        self.prefill_float = True

    @staticmethod
    def accepts(linear: nn.Module) -> bool:
        return type(linear) is nn.Linear and linear.in_features % BLOCK == 0

    def forward(self, x: Tensor) -> Tensor:
        # [..., positions, K] with more than one position per row: a prompt's prefill.
        if self.prefill_float and x.dim() >= 2 and x.shape[-2] > 1:
            return nn.functional.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, self.in_features)  # [T, K]
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        y = self._product(x2)  # [T, O] float32
        if x.dtype != torch.float32:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def _product(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def dequantized(self) -> Tensor:
        """[O, K] float32: the weight the kernel multiplies by."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Q4Linear(QuantizedLinear):
    """Semantics: y = x W^T + b with W[o, 32 g + j] = d[o, g] * n + m[o, g], n in 0..15,
    x quantised to 8 bits per block of 32 (`quantize_activations`)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        nibbles, d, m = pack_q4_1(linear.weight)
        self.register_buffer("packed", _to_groups(nibbles, pieces=4))  # [O8/8, G, 4, 8, 4]
        # float16, as the kernel reads them: [O8/8, G, 8]
        self.register_buffer("d", _to_groups(d, pieces=0).half())
        self.register_buffer("m", _to_groups(m, pieces=0).half())

    def _product(self, x: Tensor) -> Tensor:
        return kernels().q4_1_linear(x, self.packed, self.d, self.m, self.out_features)

    def dequantized(self) -> Tensor:
        nibbles = _from_groups(self.packed, self.out_features)
        d, m = (_from_groups(t, self.out_features).float() for t in (self.d, self.m))
        return unpack_q4_1(nibbles, d, m)


class Q8Linear(QuantizedLinear):
    """Semantics: y = x W^T + b with W[o, 32 g + j] = d[o, g] * w8, w8 in -127..127,
    x quantised to 8 bits per block of 32."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        w8, d = pack_q8_0(linear.weight)
        bytes_ = w8.view(torch.uint8)  # the kernel reads the int8 values from raw bytes
        self.register_buffer("packed", _to_groups(bytes_, pieces=8))  # [O8/8, G, 8, 8, 4]
        self.register_buffer("d", _to_groups(d, pieces=0).half())  # [O8/8, G, 8] float16

    def _product(self, x: Tensor) -> Tensor:
        return kernels().q8_0_linear(x, self.packed, self.d, self.out_features)

    def dequantized(self) -> Tensor:
        w8 = _from_groups(self.packed, self.out_features).contiguous().view(torch.int8)
        return unpack_q8_0(w8, _from_groups(self.d, self.out_features).float())


def set_prefill_float(model: nn.Module, enabled: bool) -> None:
    """Whether the quantised layers of `model` use their float weights for prefill (default);
    off, every input takes the quantised kernels (to measure them, e.g. in benchmarks)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.prefill_float = enabled


def quantize_model(model: nn.Module) -> dict[str, int]:
    """Replace the model's linears in place: blocks -> Q4Linear, output head -> Q8Linear.

    The input embedding stays float (an embedding lookup reads one row per token). Layers the
    kernels cannot take (K not a multiple of 32, scales beyond float16) keep their float
    weights. Returns counts
    per kind. Must run before `patching.patch_model`.
    """
    if not int4_supported():
        raise RuntimeError("the quantised kernels need an x86-64 CPU with AVX2 and FMA")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    counts = {"q4_1": 0, "q8_0": 0, "float": 0}
    for path, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        if not QuantizedLinear.accepts(module):
            counts["float"] += 1
            continue
        kind = "q8_0" if module is head else "q4_1"
        try:
            replacement = Q8Linear(module) if kind == "q8_0" else Q4Linear(module)
        except ValueError as reason:  # scales beyond float16: this layer keeps its weights
            logger.warning("%s stays float: %s", path, reason)
            counts["float"] += 1
            continue
        counts[kind] += 1
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, replacement)
    logger.info(
        "quantised %d linears to Q4_1 and %d to Q8_0; %d stay float",
        counts["q4_1"],
        counts["q8_0"],
        counts["float"],
    )
    return counts
