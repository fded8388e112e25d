"""The compact forward of a Llama-family causal LM (Llama, SmolLM2, Qwen2, Mistral).

The same modules and weights as the HF model it is built from (shared, not copied), the
same arithmetic, less Python between the products: q/k/v and gate/up run as fused products
(projections.py), rotary and masks are built once per forward and applied to q and k
together (attention.py), norms are torch's fused RMSNorm, and the per-layer path is a flat
loop instead of HF's module tree and keyword plumbing. MoRA's adapted modules keep their
wrappers: a wrapped o_proj/down_proj is called as it is, a wrapped fused member gets its
delta from the same layer backend (projections.py).

Only for inference through the engine's batched KV cache (`BatchKVCache`); training and
`generate` keep using the HF model itself.

Shape legend: n = sequences, P = new positions, L = cache columns after this forward,
D = hidden size, V = vocabulary, H/KH/d as in attention.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mora_runtime.cpu.build import kernels
from mora_runtime.models.llama.attention import StepInputs, attend, rotate
from mora_runtime.models.llama.config import LlamaShape, unsupported_reason
from mora_runtime.models.llama.projections import FusedProjection

logger = logging.getLogger(__name__)


@dataclass
class _Block:
    """One decoder layer's fused products (its other modules are read from the layer)."""

    layer: nn.Module
    qkv: FusedProjection
    gate_up: FusedProjection


class CompactLlama:
    """`compact(ids, mask, positions, cache, logits_to_keep)` -> logits, as the HF model's
    forward with `cache=` and `logits_to_keep=` returns them."""

    def __init__(self, model: nn.Module) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the compact forward cannot run this model: {reason}")
        self.model = model
        self.shape = LlamaShape.of(model)
        self.blocks = []
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            qkv = FusedProjection([attention.q_proj, attention.k_proj, attention.v_proj])
            gate_up = FusedProjection([mlp.gate_proj, mlp.up_proj])
            for fused in (qkv, gate_up):
                if fused.reason is not None:
                    raise ValueError(f"the compact forward cannot fuse: {fused.reason}")
            self.blocks.append(_Block(layer, qkv, gate_up))

    def __call__(
        self,
        ids: Tensor,  # [n, P]
        mask: Tensor,  # [n, L] 1 for real tokens, 0 for padding
        positions: Tensor,  # [n, P]
        cache,  # BatchKVCache
        logits_to_keep: int = 0,  # 0: every position, k: the last k
    ) -> Tensor:
        inner = self.model.model
        hidden = inner.embed_tokens(ids)  # [n, P, D], the residual stream
        step = StepInputs.build(inner.rotary_emb, hidden, positions, mask)
        # Each residual add is done together with the norm after it (`_add_norm`).
        x = _add_norm(hidden, None, self.blocks[0].layer.input_layernorm, step.native)
        for index, block in enumerate(self.blocks):
            layer = block.layer
            attention = self._attention(block, cache.layers[index], x, step)
            x = _add_norm(hidden, attention, layer.post_attention_layernorm, step.native)
            mlp = self._mlp(block, x, step)
            if index + 1 < len(self.blocks):
                norm = self.blocks[index + 1].layer.input_layernorm
                x = _add_norm(hidden, mlp, norm, step.native)
        if logits_to_keep:
            hidden, mlp = hidden[:, -logits_to_keep:].contiguous(), mlp[:, -logits_to_keep:]
        return self.model.lm_head(_add_norm(hidden, mlp, inner.norm, step.native))

    def _attention(self, block: _Block, kv, x: Tensor, step: StepInputs) -> Tensor:
        """The attention block's output [n, P, D] for its normed input x."""
        shape, attention = self.shape, block.layer.self_attn
        n, width = x.shape[0], x.shape[1]
        q, k, v = block.qkv(x, (attention.q_proj, attention.k_proj, attention.v_proj))
        q, k = rotate(
            q.view(n, width, shape.heads, shape.head_dim),
            k.view(n, width, shape.kv_heads, shape.head_dim),
            step,
        )
        v = v.view(n, width, shape.kv_heads, shape.head_dim)
        keys, values = kv.update(k.transpose(1, 2), v.transpose(1, 2))  # [n, KH, L, d]
        return attention.o_proj(attend(q, keys, values, step, shape))

    def _mlp(self, block: _Block, x: Tensor, step: StepInputs) -> Tensor:
        """The MLP's output [n, P, D] for its normed input x."""
        mlp = block.layer.mlp
        gate, up = block.gate_up(x, (mlp.gate_proj, mlp.up_proj))
        if step.native:
            size = gate.shape[-1]
            act = kernels().silu_mul(gate.reshape(-1, size), up.reshape(-1, size))
            return mlp.down_proj(act.view(*x.shape[:-1], size))
        return mlp.down_proj(nn.functional.silu(gate) * up)


def _add_norm(hidden: Tensor, delta: Tensor | None, norm: nn.Module, native: bool) -> Tensor:
    """hidden += delta in place (the residual add; none with delta None), then `norm` of it."""
    if native:
        if delta is None:
            return kernels().rms_norm(hidden, norm.weight, norm.variance_epsilon)
        return kernels().add_rms_norm_(
            hidden, delta.contiguous(), norm.weight, norm.variance_epsilon
        )
    if delta is not None:
        hidden += delta
    if hidden.dtype == torch.float32:
        return nn.functional.rms_norm(
            hidden, (hidden.shape[-1],), norm.weight, norm.variance_epsilon
        )
    return norm(hidden)  # HF's: in float32, rounded back before the weight


def compact_forward(model: nn.Module) -> CompactLlama | None:
    """The compact forward of `model`, or None where only HF's forward can run it."""
    try:
        return CompactLlama(model)
    except ValueError as reason:
        logger.info("%s", reason)
        return None
