"""The pieces of an `ExpertPool` (mora_runtime.experts.pool): its errors, routing settings, the
bookkeeping of loaded and staged sets, snapshots, and one layer's slot buffers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mora_runtime.experts.defaults import LM_ROUTING


class PoolError(ValueError):
    """A pool mutation that cannot be applied (the pool is left unchanged)."""


@dataclass(frozen=True)
class RoutingConfig:
    """Pool-wide routing settings (docs/spec.md: k, tau, delta); defaults: a causal LM's
    (mora_runtime/experts/defaults.py)."""

    top_k: int = LM_ROUTING.top_k
    tau: float = LM_ROUTING.tau
    threshold: float = LM_ROUTING.threshold


@dataclass(frozen=True)
class ExpertSetEntry:
    """Bookkeeping of one loaded expert set: its id and where its experts live."""

    name: str
    slot_start: int
    rank: int
    scale: float
    version_added: int
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def slots(self) -> range:
        return range(self.slot_start, self.slot_start + self.rank)


@dataclass(frozen=True)
class StagedSet:
    """A set checked and converted for one pool (`ExpertPool.stage_set`): installing it
    (`ExpertPool.apply`) only copies these tensors into free slots, so nothing that can
    fail on the set's contents is left for that step."""

    name: str
    rank: int
    scale: float
    tensors: Mapping[str, tuple[Tensor, Tensor]]  # on the pool's device, in its dtype
    meta: Mapping[str, Any]
    device: torch.device
    dtype: torch.dtype


@dataclass(frozen=True)
class PoolSnapshot:
    """What one request sees for all of its tokens: a version and its visible slots."""

    version: int
    slots: tuple[int, ...]
    sets: tuple[ExpertSetEntry, ...]

    @property
    def num_experts(self) -> int:
        return len(self.slots)

    def mask(self, num_slots: int, device: torch.device | str = "cpu") -> Tensor:
        """[N] bool: the visible slots among the first `num_slots`."""
        out = torch.zeros(num_slots, dtype=torch.bool, device=device)
        if self.slots:
            out[torch.tensor(self.slots, dtype=torch.long, device=device)] = True
        return out


class PoolLayer:
    """Slot buffers of one adapted layer; rows past the high-water mark are zero."""

    def __init__(
        self, in_features: int, out_features: int, capacity: int, *, device, dtype, path: str = ""
    ):
        self.path = path  # module path of the adapted layer
        self.kind = path.rsplit(".", 1)[-1]  # bounded statistics label, e.g. "q_proj"
        self.in_features = in_features
        self.out_features = out_features
        self.A = torch.zeros(capacity, in_features, device=device, dtype=dtype)  # [C, D]
        self.B = torch.zeros(capacity, out_features, device=device, dtype=dtype)  # [C, O]
        # [C] bool: slots whose set adapts this layer (a set may skip some layers, e.g. a
        # PEFT adapter on q/v only); absent slots are hidden here, not scored as zeros.
        self.present = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.absent_slots = 0
        self._views: tuple[int, Tensor, Tensor, Tensor, Tensor] | None = None

    def views(self, num_slots: int) -> tuple[Tensor, Tensor, Tensor]:
        """(A [N, D], B [N, O], present [N]) over the first N slots; cached, since every
        forward asks for them in every layer (views share the buffers' storage, so writes
        into slots show through; only a reallocation makes new ones)."""
        cached = self._views
        if cached is None or cached[0] != num_slots or cached[1] is not self.A:
            A, B, present = self.A[:num_slots], self.B[:num_slots], self.present[:num_slots]
            cached = self._views = (num_slots, self.A, A, B, present)
        return cached[2], cached[3], cached[4]

    def weights(self, num_slots: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """`views`, with present None when this layer has every loaded slot (the usual case:
        only a set that skips some layers makes any slot absent)."""
        A, B, present = self.views(num_slots)
        return A, B, (present if self.absent_slots else None)

    def grow(self, capacity: int) -> None:
        old = self.A.shape[0]
        A = self.A.new_zeros(capacity, self.in_features)
        B = self.B.new_zeros(capacity, self.out_features)
        A[:old] = self.A
        B[:old] = self.B
        present = self.present.new_zeros(capacity)
        present[:old] = self.present
        self.A, self.B, self.present = A, B, present

    def to(self, device, dtype) -> None:
        self.A = self.A.to(device=device, dtype=dtype)
        self.B = self.B.to(device=device, dtype=dtype)
        self.present = self.present.to(device=device)
