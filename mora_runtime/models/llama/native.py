"""A decoder layer's decode step in one C++ call (`csrc/decoder_layer.cpp`).

The compact forward runs a layer as eleven kernel calls with Python between them; at one
sequence that Python takes longer than the layer's arithmetic. Where every product of a
layer is int4 (`Q4Linear`, the default CPU weights) and the CPU kernels are built, the same
kernels are chained in C++ instead, on the same tensors in the same order, so the logits do
not change by a bit (tests/models/test_llama_native.py). The layer object holds references
to the model's own weights (nothing is copied).

The compact forward calls it for decode steps only, and only for layers whose products add
no MoRA delta in that forward (an empty pool, no visible expert, or a layer MoRA does not
adapt): an adapted product's delta needs its layer backend between the products.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mora_runtime.cpu.build import kernels
from mora_runtime.models.llama.config import LlamaShape
from mora_runtime.models.llama.projections import base
from mora_runtime.models.quantize import Q4Linear


def native_layer(
    layer: nn.Module,
    qkv: nn.Module | None,  # the fused q/k/v product
    gate_up: nn.Module | None,  # the fused gate/up product
    shape: LlamaShape,
) -> Any | None:
    """The layer's `DecoderLayer` (`forward_(hidden, pending, keys, values, cos, sin,
    mask)` -> the layer's output), or None where it cannot run the layer."""
    native = kernels()
    if native is None:
        return None
    modules = (qkv, base(layer.self_attn.o_proj), gate_up, base(layer.mlp.down_proj))
    if not all(type(module) is Q4Linear for module in modules):
        return None  # float weights: the products are torch's, called from Python anyway
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if any(norm.weight.dtype != torch.float32 for norm in norms) or shape.head_dim % 8:
        return None  # what the norm and attention kernels require
    weights = [
        native.Q4Weights(m.packed, m.d, m.m, m.out_features, m.bias)
        for m in modules  # type: ignore[union-attr]
    ]
    return native.DecoderLayer(
        norms[0].weight.detach(),
        norms[0].variance_epsilon,
        norms[1].weight.detach(),
        norms[1].variance_epsilon,
        *weights,
        shape.heads,
        shape.kv_heads,
        shape.head_dim,
        shape.scaling,
    )
