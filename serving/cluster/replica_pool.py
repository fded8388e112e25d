"""One replica's side of hot-loading (`serving.cluster.hotload` drives it from the ingress).

The registry's version is the pool's name: every change this replica makes to its pool is
published under the registry version that committed it (`ExpertPool.apply(version=...)`),
whether it arrives as a commit or through the background reconcile. So "version 75" means
the same sets on every replica, and a replica that starts after a crash starts at the
registry's version, never below what clients already saw.

A set is checked and converted for the pool when it is prepared (`ExpertPool.stage_set`):
whatever could make applying it fail (a scale the pool's dtype cannot hold, shapes, values)
fails the prepare, so it is never committed. A registry entry that still fails here (a file
changed on disk, a replica with another dtype) is quarantined: logged, reported by
`describe`, skipped until its entry changes, and the replica goes on serving the rest.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from mora_runtime.cpu.openmp import in_fresh_thread
from mora_runtime.expert_sets.fingerprint import base_fingerprint
from mora_runtime.expert_sets.format import ExpertSet, ExpertSetError
from mora_runtime.expert_sets.store import load_expert_set
from mora_runtime.experts.pool import ExpertPool
from mora_runtime.experts.slots import PoolError, StagedSet
from serving.cluster.protocol import (
    HotLoadOp,
    LoadedSet,
    QuarantinedSet,
    ReplicaDescription,
    ReplicaReport,
    ReplicaStatus,
)
from serving.cluster.registry import RegistryEntry, RegistryState

logger = logging.getLogger(__name__)


class ReplicaPool:
    """Staging, commits and reconciliation of one replica's pool."""

    def __init__(
        self,
        pool: ExpertPool,
        model: Any,
        model_kind: str,
        store_root: str,
        exclusive: Callable[[Callable[[], Any]], Any],
    ) -> None:
        self.pool = pool
        self.model = model
        self.model_kind = model_kind
        self.store_root = store_root
        self.exclusive = exclusive  # runs a mutation between two forward passes
        self.replica_id = uuid.uuid4().hex[:8]
        self._staged: dict[str, StagedSet] = {}
        # registry entries this replica could not apply -> why (skipped until they change)
        self.quarantined: dict[RegistryEntry, str] = {}
        # (token, layer, expert) activations per loaded set since it was (last) loaded
        self.activations: collections.Counter[str] = collections.Counter()
        self._shapes = {
            p: (layer.in_features, layer.out_features) for p, layer in pool.layers.items()
        }
        self._lock = asyncio.Lock()

    def _fingerprint(self, meta) -> dict:
        modules = {p: self._shapes[p] for p in meta.target_modules if p in self._shapes}
        if len(modules) != len(meta.target_modules):
            unknown = sorted(set(meta.target_modules) - set(self._shapes))
            raise ExpertSetError(
                f"set {meta.name!r} adapts modules this server does not: {unknown[:5]}"
            )
        return base_fingerprint(self.model, modules)

    async def _stage(self, path: str, name: str | None = None) -> StagedSet:
        """Read, validate and convert a set for this pool; the pool is not touched. Torch
        work, so off the event loop and on a thread that ends (mora_runtime/cpu/openmp.py)."""

        def read_and_stage() -> StagedSet:
            expert_set: ExpertSet = load_expert_set(
                path,
                expected_fingerprint=self._fingerprint,
                expected_kind=self.model_kind,
                store_root=self.store_root,
            )
            meta = expert_set.meta
            if name is not None and meta.name != name:
                raise ExpertSetError("the set's name changed while it was being loaded")
            try:
                return self.pool.stage_set(
                    meta.name,
                    expert_set.tensors,
                    scale=meta.scale,
                    meta=meta.pool_meta(),
                )
            except PoolError as exc:
                raise ExpertSetError(str(exc)) from None

        return await asyncio.to_thread(in_fresh_thread, read_and_stage)

    def _apply(self, add: list[StagedSet], retire: list[str], version: int) -> None:
        """Publish a change under the registry's `version`, between two forward passes."""

        def mutate() -> None:
            self.pool.apply(add=add, retire=retire, version=version)
            # A retired set's count goes with it; one loaded again starts from zero.
            for name in [*retire, *(staged.name for staged in add)]:
                self.activations.pop(name, None)

        self.exclusive(mutate)

    # ---------------------------------------------------------------- protocol
    async def prepare(self, op: HotLoadOp) -> ReplicaReport:
        started = time.perf_counter()
        async with self._lock:
            if op.action == "load":
                assert op.path is not None  # HotLoadOp checks that a load names its path
                if op.name in {e.name for e in self.pool.sets()}:
                    raise ExpertSetError(f"set {op.name!r} is already loaded on this replica")
                staged = await self._stage(op.path, op.name)
                # Grow the slot buffers now, outside any forward pass and before the commit.
                await asyncio.to_thread(self.exclusive, lambda: self.pool.reserve(staged.rank))
                self._staged[op.op_id] = staged
            # A retire needs nothing staged: the coordinator checked that the registry holds
            # the set, and a replica that quarantined it has nothing to remove.
        return self._report("prepared", started)

    async def commit(self, op: HotLoadOp, state: RegistryState) -> ReplicaReport:
        """The registry committed `op`; `state` is the registry read after that commit.

        Converging to the whole state, rather than applying `op` alone, is what keeps one
        version one pool: a replica that missed an earlier commit catches up in the same
        step instead of naming a pool it does not hold.
        """
        started = time.perf_counter()
        staged = self._staged.pop(op.op_id, None)
        await self.reconcile(state, staged=[staged] if staged is not None else [])
        return self._report("committed", started)

    async def sync(self, state: RegistryState) -> ReplicaReport:
        """Another model's pool changed: adopt the registry's new version."""
        started = time.perf_counter()
        await self.reconcile(state)
        return self._report("synced", started)

    async def abort(self, op_id: str) -> ReplicaReport:
        self._staged.pop(op_id, None)
        return self._report("aborted", time.perf_counter())

    async def reconcile(self, state: RegistryState, staged: list[StagedSet] = ()) -> bool:
        """Converge to the registry in one change published under its version; True if
        anything changed. `staged` holds sets already prepared here (not read again).
        Entries that cannot be applied here are quarantined, not fatal."""
        async with self._lock:
            if state.version <= self.pool.version:
                if state.version < self.pool.version:
                    # Only a registry file reset by hand gets here; serving goes on unchanged.
                    logger.error(
                        "registry version %d is older than this replica's pool (%d); ignored",
                        state.version,
                        self.pool.version,
                    )
                return False
            ready = {s.name: s for s in staged}
            wanted = state.for_kind(self.model_kind)
            # A set staged for an operation whose commit never reached this replica is in
            # the registry by now and is read again below: drop the stale staged copy, or
            # its tensors would stay in memory for good.
            committed = {e.name for e in wanted}
            self._staged = {k: s for k, s in self._staged.items() if s.name not in committed}
            self.quarantined = {e: why for e, why in self.quarantined.items() if e in wanted}
            have = {e.name for e in self.pool.sets()}
            retire = sorted(have - {e.name for e in wanted})
            add: list[StagedSet] = []
            for entry in wanted:
                if entry.name in have or entry in self.quarantined:
                    continue
                if entry.name in ready:
                    add.append(ready[entry.name])
                    continue
                try:
                    add.append(await self._stage(entry.path, entry.name))
                except (ExpertSetError, OSError) as exc:
                    self.quarantined[entry] = str(exc)
                    logger.error(
                        "replica %s: expert set %r (registry version %d) quarantined: %s",
                        self.replica_id,
                        entry.name,
                        entry.version_added,
                        exc,
                    )
            await asyncio.to_thread(self._apply, add, retire, state.version)
            logger.info("replica %s now at version %d", self.replica_id, self.pool.version)
            return True

    def _report(self, status: ReplicaStatus, started: float) -> ReplicaReport:
        return ReplicaReport(
            replica=self.replica_id,
            status=status,
            pool_version=self.pool.version,
            experts=self.pool.num_experts,
            seconds=round(time.perf_counter() - started, 4),
        )

    def describe(self) -> ReplicaDescription:
        return ReplicaDescription(
            replica=self.replica_id,
            pool_version=self.pool.version,
            sets=tuple(
                LoadedSet(e.name, e.rank, e.slot_start, e.slot_start + e.rank)
                for e in self.pool.sets()
            ),
            quarantined=tuple(
                QuarantinedSet(e.name, e.version_added, why) for e, why in self.quarantined.items()
            ),
            activations=dict(self.activations),
        )
