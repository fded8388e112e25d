"""The compact forward of a Llama-family causal LM (Llama, SmolLM2, Qwen2, Mistral).

The same modules and weights as the HF model it is built from (shared, not copied), the
same arithmetic, less Python between the products: q/k/v and gate/up run as fused products
(projections.py), rotary and masks are built once per forward and applied to q and k
together (attention.py), norms are one kernel call (or torch's fused RMSNorm), and the
per-layer path is a flat loop instead of HF's module tree and keyword plumbing. MoRA's
adapted modules keep their wrappers: a wrapped o_proj/down_proj is called as it is, a
wrapped fused member gets its delta from the same layer backend (projections.py). In a
decode step on int4 weights, a layer to which no adapted product adds a delta runs in one
C++ call (native.py), with the same result bit for bit.

Only for inference through the engine's batched KV cache (`BatchKVCache`); training and
`generate` keep using the HF model itself.

Shape legend: n = sequences, P = new positions, L = cache columns after this forward,
D = hidden size, V = vocabulary, H/KH/d as in attention.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mora_runtime.cpu.build import kernels
from mora_runtime.experts.backends.base import LayerBackend
from mora_runtime.experts.backends.cpu_fused import CpuFusedBackend
from mora_runtime.experts.backends.select import forward_plan
from mora_runtime.experts.patching import MoRALinear
from mora_runtime.models.llama.attention import StepInputs, attend, rotate
from mora_runtime.models.llama.config import LlamaShape, unsupported_reason
from mora_runtime.models.llama.native import native_layer
from mora_runtime.models.llama.projections import FusedProjection, products

logger = logging.getLogger(__name__)


@dataclass
class _Block:
    """One decoder layer's fused products (its other modules are read from the layer)."""

    layer: nn.Module
    qkv: FusedProjection
    gate_up: FusedProjection
    native: Any | None  # the whole layer's decode step in one C++ call (`native_layer`)


class CompactLlama:
    """`compact(ids, mask, positions, cache, logits_to_keep)` -> logits, as the HF model's
    forward with `cache=` and `logits_to_keep=` returns them."""

    def __init__(self, model: nn.Module, whole_layers: bool = True) -> None:
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
            native = None
            if whole_layers:
                native = native_layer(layer, qkv.module, gate_up.module, self.shape)
            self.blocks.append(_Block(layer, qkv, gate_up, native))

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
        whole, backend = self._whole_layers(hidden, step, cache)
        # Each layer's output is added to the residual stream together with the norm after
        # it (`_add_norm`): by the next layer, or by the final norm.
        pending: Tensor | None = None
        for index, block in enumerate(self.blocks):
            kv = cache.layers[index]
            call = _native_arguments(block, backend) if whole and block.native is not None else None
            if call is None:
                pending = self._layer(block, kv, hidden, pending, step)
                continue
            keys, values = kv.extend(1)
            pending = block.native.forward_(
                hidden, pending, keys, values, step.cos, step.sin, step.mask, *call
            )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:].contiguous()
            pending = pending[:, -logits_to_keep:]
        return self.model.lm_head(_add_norm(hidden, pending, inner.norm, step.native))

    def _whole_layers(
        self, hidden: Tensor, step: StepInputs, cache
    ) -> tuple[bool, LayerBackend | None]:
        """Whether this forward may run layers in one C++ call each (`native_layer`: a
        decode step on the CPU kernels' dtype), and the layer backend its adapted products
        call (None where none adds anything: no pool, an empty one, no visible expert)."""
        decode = hidden.shape[1] == 1 and step.mask.dim() == 2
        if not (step.native and decode and all(kv.is_initialized for kv in cache.layers)):
            return False, None
        pool = getattr(self.model, "mora_pool", None)
        # One backend for every adapted product of a forward (forward_plan's own contract).
        return True, None if pool is None else forward_plan(pool, hidden)

    def _layer(
        self, block: _Block, kv, hidden: Tensor, pending: Tensor | None, step: StepInputs
    ) -> Tensor:
        """One decoder layer op by op: adds `pending` to hidden, returns the layer's output."""
        layer = block.layer
        x = _add_norm(hidden, pending, layer.input_layernorm, step.native)
        attention = self._attention(block, kv, x, step)
        x = _add_norm(hidden, attention, layer.post_attention_layernorm, step.native)
        return self._mlp(block, x, step)

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


def _native_arguments(block: _Block, backend: LayerBackend | None) -> tuple[Any, list] | None:
    """The (plan, adapters) a whole-layer call of `block` takes in this forward, or None
    where the layer runs op by op: adapted products add their deltas from C++ only through
    the cpu_fused backend's plan. Read from the modules as they are now (patching may come
    and go after the compact forward is built)."""
    if backend is None:  # nothing adds a delta: no need to look at the modules
        return None, []
    members = products(block.layer)
    adapted = [isinstance(m, MoRALinear) for m in members]
    if not any(adapted):
        return None, []
    if not isinstance(backend, CpuFusedBackend):
        return None
    return backend.plan, [
        backend.layer_arguments(m._layer) if wrapped else None
        for m, wrapped in zip(members, adapted, strict=True)
    ]


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


def compact_forward(model: nn.Module, whole_layers: bool = True) -> CompactLlama | None:
    """The compact forward of `model`, or None where only HF's forward can run it."""
    try:
        return CompactLlama(model, whole_layers)
    except ValueError as reason:
        logger.info("%s", reason)
        return None
