"""ExpertPool: the growing set of rank-1 experts of one patched model.

Every adapted layer owns preallocated slot buffers (`A [capacity, D]`, `B [capacity, O]`),
in the manner of vLLM's adapter slots. An expert set of rank r occupies the same slot range
in every layer, so a pool *version* is just a set of visible slots, shared by all layers.

Growth and retirement never touch a slot that a live snapshot can see: loading appends into
free slots (growing the buffers first if needed), retiring hides a set from new versions
and frees its slots only once no snapshot taken before the retirement is alive.

A change is staged first (`stage_set`: checked and converted, the pool untouched), then
applied (`apply`: slots written, one new version published), so applying cannot fail on a
set's contents. Versions only grow; a server passes its registry's version to `apply`, so
one number names one pool on every replica. Callers serialise mutations against forward
passes (the engine applies them between steps), which is why buffers may be reallocated
here without locks of their own.

Shape legend: N = slots allocated so far (high-water mark), C = capacity, D/O = layer sizes.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from mora_runtime.experts.slots import (
    ExpertSetEntry,
    PoolError,
    PoolLayer,
    PoolSnapshot,
    RoutingConfig,
    StagedSet,
)

__all__ = [
    "ExpertPool",
    "ExpertSetEntry",
    "PoolError",
    "PoolLayer",
    "PoolSnapshot",
    "RoutingConfig",
    "StagedSet",
]

logger = logging.getLogger(__name__)


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
            path: PoolLayer(d, o, capacity, device=self.device, dtype=dtype, path=path)
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
        return self.apply(add=[self.stage_set(name, tensors, scale=scale, meta=meta)])

    def retire_set(self, name: str) -> PoolSnapshot:
        """Hide a set from new requests; in-flight ones keep seeing it until released."""
        return self.apply(retire=[name])

    def stage_set(
        self,
        name: str,
        tensors: Mapping[str, tuple[Tensor, Tensor]],
        *,
        scale: float = 1.0,
        meta: Mapping[str, Any] | None = None,
    ) -> StagedSet:
        """Check a set against this pool and convert it to the pool's device and dtype, without
        changing the pool: everything about the set that could make `apply` fail fails here
        (shapes, values that overflow the pool's dtype, a scale it cannot hold)."""
        if not isinstance(name, str) or not name:
            raise PoolError("an expert set needs a non-empty name")
        rank = self.check_tensors(name, tensors)
        device, dtype = self.device, self.dtype
        converted: dict[str, tuple[Tensor, Tensor]] = {}
        for path, (A, B) in tensors.items():
            A = A.detach().to(device=device, dtype=dtype).contiguous()
            B = B.detach().to(device=device, dtype=dtype).contiguous()
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise PoolError(f"{name}/{path}: values overflow the pool's dtype {dtype}")
            converted[path] = (A, B)
        try:
            held = float(torch.tensor(float(scale), dtype=torch.float64).to(dtype))
        except (TypeError, ValueError, OverflowError):
            held = math.inf
        if not math.isfinite(held):
            raise PoolError(f"expert set {name!r}: scale {scale!r} is not finite in {dtype}")
        return StagedSet(name, rank, float(scale), converted, dict(meta or {}), device, dtype)

    def apply(
        self,
        *,
        add: Iterable[StagedSet] = (),
        retire: Iterable[str] = (),
        version: int | None = None,
    ) -> PoolSnapshot:
        """Retire and add sets in one step, published as one new version: `version` when given
        (it must be newer than the pool's: a registry names the pool), else the next one.

        Everything is checked, and the buffers grown, before anything visible changes: on any
        error the pool is unchanged.
        """
        add, retire = list(add), list(retire)
        with self._lock:
            self._check_apply(add, retire, version)
            starts, free, high_water = self._plan([staged.rank for staged in add])
            self._ensure_capacity(high_water)  # may fail (memory): nothing is visible yet
            self._free, self._high_water = free, high_water
            new_version = self._version + 1 if version is None else version
            retired = [self._sets.pop(name) for name in retire]
            for staged, start in zip(add, starts, strict=True):
                self._install(staged, start, new_version)
            snap = self._publish(version)
            self._retired.extend((snap.version, entry) for entry in retired)
            self._reclaim()
            return snap

    def set_version(self, version: int) -> PoolSnapshot:
        """Renumber the current state (versions only grow). Replicas use this to report the
        version of the cluster-wide registry instead of their local count of mutations."""
        with self._lock:
            if version < self._version:
                raise PoolError(f"version {version} is older than the pool's {self._version}")
            if version > self._version:
                self._publish(version)
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
    def check_tensors(self, name: str, tensors: Mapping[str, tuple[Tensor, Tensor]]) -> int:
        """The rank of a set of experts for this pool's layers (module path -> (A [r, D],
        B [r, O])); raises PoolError unless it fits (also used for trainable experts)."""
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

    def _check_apply(self, add: list[StagedSet], retire: list[str], version: int | None) -> None:
        if version is not None and version <= self._version:
            raise PoolError(f"version {version} is not newer than the pool's {self._version}")
        if len(set(retire)) != len(retire):
            raise PoolError(f"expert sets retired twice: {sorted(retire)}")
        for name in retire:
            if name not in self._sets:
                raise PoolError(f"expert set {name!r} is not loaded")
        names = [staged.name for staged in add]
        if len(set(names)) != len(names):
            raise PoolError(f"expert sets added twice: {sorted(names)}")
        for staged in add:
            if staged.name in self._sets and staged.name not in retire:
                raise PoolError(f"expert set {staged.name!r} is already loaded")
            if staged.device != self.device or staged.dtype != self.dtype:
                raise PoolError(f"expert set {staged.name!r} was staged for another device/dtype")
            if not staged.tensors.keys() <= self.layers.keys():
                raise PoolError(f"expert set {staged.name!r} was staged for another pool")

    def _plan(self, ranks: list[int]) -> tuple[list[int], list[tuple[int, int]], int]:
        """Slot starts for sets of these ranks, and the free list and high-water mark after."""
        free, high_water, starts = list(self._free), self._high_water, []
        for rank in ranks:
            for i, (start, length) in enumerate(free):
                if length >= rank:
                    rest = (start + rank, length - rank)
                    free[i : i + 1] = [rest] if rest[1] else []
                    break
            else:
                start, high_water = high_water, high_water + rank
            starts.append(start)
        return starts, free, high_water

    def _install(self, staged: StagedSet, start: int, version: int) -> None:
        rank = staged.rank
        for path, layer in self.layers.items():
            if path not in staged.tensors:
                layer.absent_slots += rank
                continue
            A, B = staged.tensors[path]
            layer.A[start : start + rank] = A
            layer.B[start : start + rank] = B
            layer.present[start : start + rank] = True
        self._slot_scale[start : start + rank] = staged.scale
        entry = ExpertSetEntry(staged.name, start, rank, staged.scale, version, staged.meta)
        self._sets[staged.name] = entry

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

    def _publish(self, version: int | None = None) -> PoolSnapshot:
        # Versions only grow: snapshots are pinned, and caches keyed, by version.
        self._version = self._version + 1 if version is None else version
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
