"""ExpertPool: the growing set of rank-1 experts of one patched model.

Every adapted layer owns preallocated slot buffers (`A [capacity, D]`, `B [capacity, O]`),
in the manner of vLLM's adapter slots. An expert set of rank r occupies the same slot range
in every layer, so a pool *version* is just a set of visible slots, shared by all layers.

Growth and retirement never touch a slot that a live snapshot can see: loading appends into
free slots (growing the buffers first if needed), retiring hides a set from new versions
and frees its slots only once no snapshot taken before the retirement is alive. Callers
serialise mutations against forward passes (the engine applies them between steps), which
is why buffers may be reallocated here without locks of their own.

Shape legend: N = slots allocated so far (high-water mark), C = capacity, D/O = layer sizes.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


class PoolError(ValueError):
    """A pool mutation that cannot be applied (the pool is left unchanged)."""


@dataclass(frozen=True)
class RoutingConfig:
    """Pool-wide routing settings (MORA_SPEC.md: k, tau, delta)."""

    top_k: int = 8
    tau: float = 0.03
    threshold: float = 0.2


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

    def set_of_slot(self) -> dict[int, str]:
        return {slot: entry.name for entry in self.sets for slot in entry.slots}


class PoolLayer:
    """Slot buffers of one adapted layer; rows past the high-water mark are zero."""

    def __init__(self, in_features: int, out_features: int, capacity: int, *, device, dtype):
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


class ExpertPool:
    """Append-only pool of rank-1 experts over a fixed set of adapted layers."""

    def __init__(
        self,
        layer_shapes: Mapping[str, tuple[int, int]],
        *,
        capacity: int = 64,
        routing: RoutingConfig | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if capacity < 1:
            raise PoolError("capacity must be at least 1")
        self.routing = routing or RoutingConfig()
        self.device = torch.device(device)
        self.dtype = dtype
        self.layers: dict[str, PoolLayer] = {
            path: PoolLayer(d, o, capacity, device=self.device, dtype=dtype)
            for path, (d, o) in layer_shapes.items()
        }
        self._capacity = capacity
        self._high_water = 0
        self._slot_scale = torch.zeros(capacity, device=self.device, dtype=dtype)  # [C]
        self._sets: dict[str, ExpertSetEntry] = {}
        self._version = 0
        self._free: list[tuple[int, int]] = []  # (start, length) ranges ready for reuse
        # Slots of retired sets wait here until no snapshot older than the retirement lives.
        self._retired: list[tuple[int, ExpertSetEntry]] = []
        self._live = Counter[int]()
        self._lock = threading.RLock()
        self._latest = PoolSnapshot(0, (), ())
        self.trainable: dict[str, tuple[Tensor, Tensor]] | None = None
        self.trainable_scale = 1.0

    # ----------------------------------------------------------------- read side
    @property
    def version(self) -> int:
        return self._version

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def num_slots(self) -> int:
        """High-water mark N: forward passes score slots [0, N)."""
        return self._high_water

    @property
    def num_experts(self) -> int:
        return self._latest.num_experts

    @property
    def slot_scale(self) -> Tensor:
        return self._slot_scale[: self._high_water]  # [N]

    def sets(self) -> tuple[ExpertSetEntry, ...]:
        return self._latest.sets

    def latest(self) -> PoolSnapshot:
        """The current version without pinning it (for one-off forwards and tests)."""
        return self._latest

    def acquire(self) -> PoolSnapshot:
        """Pin the current version for a request; pair with `release`."""
        with self._lock:
            snap = self._latest
            self._live[snap.version] += 1
            return snap

    def release(self, snapshot: PoolSnapshot) -> None:
        with self._lock:
            self._live[snapshot.version] -= 1
            if self._live[snapshot.version] <= 0:
                del self._live[snapshot.version]
            self._reclaim()

    def live_versions(self) -> dict[int, int]:
        return dict(self._live)

    # ---------------------------------------------------------------- write side
    def add_set(
        self,
        name: str,
        tensors: Mapping[str, tuple[Tensor, Tensor]],
        *,
        scale: float = 1.0,
        meta: Mapping[str, Any] | None = None,
    ) -> PoolSnapshot:
        """Append an expert set (module path -> (A [r, D], B [r, O])); returns the new version.

        The set may adapt a subset of the pool's layers; it is absent from the others.

        Validates everything first: on any error the pool is unchanged.
        """
        with self._lock:
            if name in self._sets:
                raise PoolError(f"expert set {name!r} is already loaded")
            rank = self._check_tensors(name, tensors)
            start = self._allocate(rank)
            for path, layer in self.layers.items():
                if path not in tensors:
                    layer.absent_slots += rank
                    continue
                A, B = tensors[path]
                layer.A[start : start + rank] = A.to(device=self.device, dtype=self.dtype)
                layer.B[start : start + rank] = B.to(device=self.device, dtype=self.dtype)
                layer.present[start : start + rank] = True
            self._slot_scale[start : start + rank] = scale
            entry = ExpertSetEntry(name, start, rank, float(scale), self._version + 1, meta or {})
            self._sets[name] = entry
            return self._publish()

    def retire_set(self, name: str) -> PoolSnapshot:
        """Hide a set from new requests; in-flight ones keep seeing it until released."""
        with self._lock:
            entry = self._sets.pop(name, None)
            if entry is None:
                raise PoolError(f"expert set {name!r} is not loaded")
            snap = self._publish()
            self._retired.append((snap.version, entry))
            self._reclaim()
            return snap

    # ------------------------------------------------------------- training side
    def attach_trainable(
        self, tensors: Mapping[str, tuple[Tensor, Tensor]], *, scale: float = 1.0
    ) -> None:
        """Add the experts being learned (usually `nn.Parameter`s) after the pool's slots.

        Every token sees them; they share the normalisation, top-k and softmax with the
        frozen experts, exactly as they will once saved and loaded. Not for serving.
        """
        with self._lock:
            self._check_tensors("<trainable>", tensors)
            self.trainable = dict(tensors)
            self.trainable_scale = float(scale)

    def detach_trainable(self) -> None:
        with self._lock:
            self.trainable = None

    def set_version(self, version: int) -> PoolSnapshot:
        """Renumber the current state (versions only grow). Replicas use this to report the
        version of the cluster-wide registry instead of their local count of mutations."""
        with self._lock:
            if version < self._version:
                raise PoolError(f"version {version} is older than the pool's {self._version}")
            if version > self._version:
                self._version = version - 1
                self._publish()
            return self._latest

    def reserve(self, extra_slots: int) -> None:
        """Grow the buffers ahead of time so that a later `add_set` need not allocate."""
        with self._lock:
            self._ensure_capacity(self._high_water + extra_slots)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ExpertPool:
        with self._lock:
            self.device = torch.device(device)
            self.dtype = dtype or self.dtype
            for layer in self.layers.values():
                layer.to(self.device, self.dtype)
            self._slot_scale = self._slot_scale.to(self.device, self.dtype)
            return self

    # ------------------------------------------------------------------ internals
    def _check_tensors(self, name: str, tensors: Mapping[str, tuple[Tensor, Tensor]]) -> int:
        extra = sorted(set(tensors) - set(self.layers))
        if extra or not tensors:
            raise PoolError(f"expert set {name!r}: no layer, or layers the pool lacks: {extra}")
        ranks = set()
        for path, (A, B) in tensors.items():
            layer = self.layers[path]
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[0]:
                raise PoolError(f"{name}/{path}: A and B must be [r, D] and [r, O]")
            if A.shape[1] != layer.in_features or B.shape[1] != layer.out_features:
                raise PoolError(
                    f"{name}/{path}: got A {tuple(A.shape)}, B {tuple(B.shape)}; layer is "
                    f"D={layer.in_features}, O={layer.out_features}"
                )
            if not (torch.isfinite(A.detach()).all() and torch.isfinite(B.detach()).all()):
                raise PoolError(f"{name}/{path}: non-finite values")
            ranks.add(A.shape[0])
        if len(ranks) != 1 or 0 in ranks:
            raise PoolError(f"expert set {name!r}: every layer needs the same non-zero rank")
        return ranks.pop()

    def _allocate(self, rank: int) -> int:
        for i, (start, length) in enumerate(self._free):
            if length >= rank:
                rest = (start + rank, length - rank)
                self._free[i : i + 1] = [rest] if rest[1] else []
                return start
        start = self._high_water
        self._ensure_capacity(start + rank)
        self._high_water = start + rank
        return start

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        capacity = max(needed, 2 * self._capacity)
        logger.info("growing expert pool capacity %d -> %d slots", self._capacity, capacity)
        for layer in self.layers.values():
            layer.grow(capacity)
        scale = self._slot_scale.new_zeros(capacity)
        scale[: self._capacity] = self._slot_scale
        self._slot_scale = scale
        self._capacity = capacity

    def _publish(self) -> PoolSnapshot:
        self._version += 1
        entries = tuple(sorted(self._sets.values(), key=lambda e: e.slot_start))
        slots = tuple(s for e in entries for s in e.slots)
        self._latest = PoolSnapshot(self._version, slots, entries)
        return self._latest

    def _reclaim(self) -> None:
        oldest_live = min(self._live, default=self._version + 1)
        keep = []
        for retired_at, entry in self._retired:
            if oldest_live >= retired_at:
                for layer in self.layers.values():
                    span = slice(entry.slots.start, entry.slots.stop)
                    if not bool(layer.present[span].all()):
                        layer.absent_slots -= entry.rank
                    layer.A[span] = 0
                    layer.B[span] = 0
                    layer.present[span] = False
                self._slot_scale[entry.slots.start : entry.slots.stop] = 0
                self._free.append((entry.slot_start, entry.rank))
            else:
                keep.append((retired_at, entry))
        self._retired = keep
        self._free.sort()
