"""Rotary attention over the engine's batched KV cache, with everything that is the same
for every layer of a forward (rotary tables, masks) built once per forward (`StepInputs`).

On float32 CPU tensors (without gradients) the CPU kernels do the small operations: rotary
in place on q and k together, and a decode step's attention (the kernel HF's path uses
through `decode_attention.py`); everything else (prefill attention, other devices and
dtypes) takes torch's ops and scaled_dot_product_attention with grouped key/value heads.

Shape legend: n = sequences, P = new positions per sequence, C = cached columns before this
forward, L = C + P, H = query heads, KH = key/value heads, d = head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mora_runtime.cpu.build import kernels
from mora_runtime.models.llama.config import LlamaShape


@dataclass(frozen=True)
class StepInputs:
    """What every layer of one forward shares."""

    cos: Tensor  # native: [n, P, d]; else [n, P, 1, d]
    sin: Tensor  # native: [n, P, d]; else [n, P, 1, d] with its first half negated (`rotate`)
    mask: Tensor  # decode: bool [n, L]; prefill: bool [n, 1, P, L]; True = attend
    native: bool  # whether the CPU kernels run the small operations (and decode attention)

    @classmethod
    def build(
        cls,
        rotary: nn.Module,
        hidden: Tensor,  # [n, P, D]
        positions: Tensor,  # [n, P]
        attention_mask: Tensor,  # [n, L] long or bool: 1 for real tokens, 0 for padding
    ) -> StepInputs:
        native = (
            hidden.device.type == "cpu"
            and hidden.dtype == torch.float32
            and not torch.is_grad_enabled()
            and kernels() is not None
        )
        cos, sin = rotary(hidden, positions)  # [n, P, d] each, in hidden's dtype
        if not native:
            half = sin.shape[-1] // 2
            # rotate_half(x) * sin == swap_halves(x) * (sin with its first half negated)
            sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)[:, :, None]
            cos = cos[:, :, None]
        real = attention_mask.bool()  # [n, L]
        width = positions.shape[1]
        decode = width == 1
        if decode:
            mask = real
        else:  # causal within the new positions, every real cached column before them
            length = real.shape[1]
            cached = length - width
            causal = torch.ones(width, length, dtype=torch.bool, device=real.device)
            causal = causal.tril(cached)  # [P, L]
            mask = causal[None, None] & real[:, None, None, :]  # [n, 1, P, L]
            # A padding query row attends nowhere, which SDPA turns into NaN; let it see
            # itself (its output is never read, only kept out of the real rows' way).
            own = torch.eye(width, dtype=torch.bool, device=real.device)
            mask[..., cached:] |= own
        return cls(cos.contiguous(), sin.contiguous(), mask, native)


def rotate(q: Tensor, k: Tensor, step: StepInputs) -> tuple[Tensor, Tensor]:
    """Rotary position embedding of q [n, P, H, d] and k [n, P, KH, d] (HF's
    `apply_rotary_pos_emb`); native: in place."""
    if step.native:
        kernels().rope_(q, k, step.cos, step.sin)
        return q, k
    return _rotate(q, step), _rotate(k, step)


def _rotate(x: Tensor, step: StepInputs) -> Tensor:
    n, positions, heads, dim = x.shape
    swapped = x.view(n, positions, heads, 2, dim // 2).flip(-2).view(n, positions, heads, dim)
    return x * step.cos + swapped * step.sin


def attend(
    q: Tensor,  # [n, P, H, d], rotated
    keys: Tensor,  # [n, KH, L, d] (a view of the cache's buffer)
    values: Tensor,
    step: StepInputs,
    shape: LlamaShape,
) -> Tensor:
    """The attention output [n, P, H * d]."""
    n, width = q.shape[0], q.shape[1]
    decode = width == 1 and step.mask.dim() == 2
    if step.native and decode and keys.stride(-1) == 1 and values.stride(-1) == 1:
        out = kernels().decode_attention(
            q.reshape(n, shape.heads, shape.head_dim).contiguous(),
            keys,
            values,
            step.mask,
            shape.scaling,
        )  # [n, H, d]
        return out.view(n, 1, shape.heads * shape.head_dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2),
        keys,
        values,
        attn_mask=step.mask if step.mask.dim() == 4 else step.mask[:, None, None, :],
        scale=shape.scaling,
        enable_gqa=shape.heads != shape.kv_heads,
    )  # [n, H, P, d]
    return out.transpose(1, 2).reshape(n, width, shape.heads * shape.head_dim)
