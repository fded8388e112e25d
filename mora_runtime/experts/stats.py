"""Routing and timing statistics as plain dataclasses (no metrics library here).

The serving layer turns these into Prometheus metrics and response fields; the runtime only
counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SequenceRouting:
    """What one sequence's tokens activated, summed over every adapted layer.

    `observations` counts (token, layer) pairs; `active_ranks` sums the experts active in
    each pair, so `active_ranks / observations` is the mean ranks a token activates per layer.
    `set_activations` maps expert-set name to how many (token, layer, expert) activations it
    received.
    """

    observations: int = 0
    active_ranks: int = 0
    set_activations: Mapping[str, int] = field(default_factory=dict)

    @property
    def mean_active_ranks(self) -> float:
        return self.active_ranks / self.observations if self.observations else 0.0

    def set_shares(self) -> dict[str, float]:
        total = sum(self.set_activations.values())
        if not total:
            return {}
        return {name: count / total for name, count in sorted(self.set_activations.items())}

    def merge(self, other: SequenceRouting) -> SequenceRouting:
        sets = dict(self.set_activations)
        for name, count in other.set_activations.items():
            sets[name] = sets.get(name, 0) + count
        return SequenceRouting(
            self.observations + other.observations, self.active_ranks + other.active_ranks, sets
        )


@dataclass(frozen=True)
class StepRouting:
    """Routing of one forward pass: per sequence, plus per-token means per module kind.

    `per_token[kind]` holds, for every (non-padding) token of the forward, the mean number of
    active experts over the layers of that module kind (e.g. "q_proj"): the distribution
    operators watch as ranks activated per token.
    """

    sequences: tuple[SequenceRouting, ...]
    per_token: Mapping[str, tuple[float, ...]]

    def total(self) -> SequenceRouting:
        out = SequenceRouting()
        for seq in self.sequences:
            out = out.merge(seq)
        return out


@dataclass(frozen=True)
class StepTiming:
    """Wall-clock of one engine step and what it processed."""

    seconds: float
    prefill_tokens: int
    decode_tokens: int
    running: int
    waiting: int
