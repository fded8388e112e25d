"""Decode-step attention on the CPU as a transformers attention implementation.

`install(model)` switches a model to `mora_cpu`: a forward with one query token per
sequence (a decode step) on float32 CPU tensors goes to csrc/decode_attention.cpp, every
other call (prefill, training with gradients, other devices and dtypes) to transformers'
own SDPA path, with SDPA's masks. At one query token per sequence the arithmetic is tiny
and torch's SDPA spends most of a call on set-up, which the kernel skips (figures in
docs/performance.md). Installed where int4 weights are (`lm.load_causal_lm`), so an engine
and `generate` on the same model share the kernel.

Shape legend: B = sequences, H = query heads, KH = key/value heads, L = cached columns,
d = head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mora_runtime.cpu.build import kernels

NAME = "mora_cpu"
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "position_bias")


def _takes(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, dropout: float, kwargs: dict
) -> bool:
    """Whether the kernel computes this call (else SDPA does)."""
    if query.shape[2] != 1 or dropout or torch.is_grad_enabled():
        return False
    tensors = (query, key, value)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.shape[-1] % 8:
        return False
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        return False
    if any(kwargs.get(name) is not None for name in _UNSUPPORTED_KWARGS):
        return False
    return mask is None or (mask.dtype == torch.bool and mask.shape[-2] == 1)


def attention_forward(
    module: nn.Module,
    query: Tensor,  # [B, H, 1, d]
    key: Tensor,  # [B, KH, L, d]
    value: Tensor,
    attention_mask: Tensor | None,  # bool [B or 1, 1, 1, L], True = attend
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    compiled = kernels()
    if compiled is None or not _takes(query, key, value, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, _, dim = query.shape
    if attention_mask is None:
        mask = torch.empty(0, dtype=torch.bool)
    else:  # [B, L]: the same for every head
        mask = attention_mask.expand(batch, -1, -1, -1).reshape(batch, -1).contiguous()
    scale = dim**-0.5 if scaling is None else scaling
    out = compiled.decode_attention(
        query.reshape(batch, heads, dim).contiguous(), key, value, mask, scale
    )  # [B, H, d]
    return out.view(batch, 1, heads, dim), None  # transformers' [B, q, H, d]


def register() -> None:
    """Make `NAME` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def install(model: nn.Module) -> bool:
    """Switch `model` (loaded with SDPA attention) to `NAME`; False where the kernels are
    unavailable or the model uses other attention, and nothing changes."""
    config = getattr(model, "config", None)
    if kernels() is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    return True
