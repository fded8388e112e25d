"""The one home of the routing defaults (docs/spec.md: k, tau, delta) per model kind.

Every other place that needs a default budget (the pool's `RoutingConfig`, the server config,
the trainer, PEFT import, the benchmarks and the load test) reads it from here. The module is
torch-free on purpose: the server config (serving/config.py) and the torch-free HTTP surface
(serving/http) import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class RoutingDefaults:
    """One model kind's default routing budget: top-k ranks per token, softmax temperature
    tau and the pruning threshold delta (the fields of experts/slots.py's RoutingConfig)."""

    top_k: int
    tau: float
    threshold: float


# Keyed by an expert set's model_kind (expert_sets/format.py MODEL_KINDS). The paper authors'
# settings (docs/spec.md): r = k = 8 for causal LMs, r = k = 16 with a sharper softmax for CLIP.
ROUTING_DEFAULTS: Mapping[str, RoutingDefaults] = MappingProxyType(
    {
        "causal_lm": RoutingDefaults(top_k=8, tau=0.03, threshold=0.2),
        "clip": RoutingDefaults(top_k=16, tau=0.01, threshold=0.2),
    }
)

LM_ROUTING = ROUTING_DEFAULTS["causal_lm"]
CLIP_ROUTING = ROUTING_DEFAULTS["clip"]
