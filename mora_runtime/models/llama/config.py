"""Which Hugging Face causal LMs the compact forward runs, and their shapes.

The compact forward (model.py) takes the modules of a loaded HF model as they are (its
embedding, norms, projections, possibly int4 or wrapped by MoRA) and replaces only the
Python that connects them. It supports the Llama family's decoder: pre-norm RMSNorm blocks,
rotary attention with grouped key/value heads, a SiLU-gated MLP, and nothing else in the
block (no sliding window, no q/k norms, no attention sinks). Anything else keeps HF's own
forward, which serves every causal LM.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Model types whose decoder is exactly the block above (when the checks below pass).
SUPPORTED_TYPES = ("llama", "qwen2", "mistral")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaShape:
    """The sizes the compact forward needs, read once from the HF config."""

    num_layers: int
    hidden: int
    heads: int  # query heads H
    kv_heads: int  # key/value heads KH (H is a multiple of it)
    head_dim: int  # d
    eps: float  # RMSNorm's epsilon
    scaling: float  # attention's score scale

    @classmethod
    def of(cls, model: nn.Module) -> LlamaShape:
        config = model.config.get_text_config()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        attention = model.model.layers[0].self_attn
        return cls(
            num_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            eps=float(config.rms_norm_eps),
            scaling=float(getattr(attention, "scaling", head_dim**-0.5)),
        )


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the compact forward cannot run `model` (None: it can)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        return f"model type {model_type!r} is not one of {', '.join(SUPPORTED_TYPES)}"
    text = config.get_text_config()
    if getattr(text, "hidden_act", "silu") != "silu":
        return f"activation {text.hidden_act!r} is not silu"
    if getattr(text, "sliding_window", None) is not None and (
        model_type != "qwen2" or getattr(text, "use_sliding_window", False)
    ):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, name):
            return f"the model has no model.{name}"
    if not hasattr(model, "lm_head"):
        return "the model has no lm_head"
    for layer in inner.layers:
        attention, mlp = layer.self_attn, layer.mlp
        if any(not hasattr(attention, n) for n in _ATTENTION):
            return "an attention block without q/k/v/o projections"
        if any(hasattr(attention, n) for n in ("q_norm", "k_norm", "sinks")):
            return "attention with q/k norms or sinks"
        if any(not hasattr(mlp, n) for n in _MLP):
            return "an MLP without gate/up/down projections"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon"):
                return f"a norm that is not RMSNorm ({type(norm).__name__})"
    return None
