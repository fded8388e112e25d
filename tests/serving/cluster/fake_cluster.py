"""Fake replicas, deployment handles and registry actor for driving the hot-load coordinator
without Ray (tests/serving/cluster/test_hotload_coordinator.py).

A `FakeReplica` keeps its pool as a (version, names) pair and answers the protocol the way
serving/cluster/replica_pool.py does: `prepare` stages, `commit` and `sync` converge to the
registry state they are given, `abort` drops what was staged; one still warming up answers
every call with a "warming" `Refusal`, as serving/cluster/deployments.py's replicas do. What it
does at each operation of a scenario is its plan: one `Step` per operation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from mora_runtime.expert_sets.format import ExpertSetError
from serving.cluster.protocol import (
    HotLoadOp,
    LoadedSet,
    Refusal,
    ReplicaDescription,
    ReplicaReport,
    ReplicaStatus,
)
from serving.cluster.registry import Registry, RegistryState


class Step(Enum):
    """What one replica does during one operation of a scenario."""

    ABSENT = "-"  # not started yet
    OK = "ok"  # takes part; joins (reconciling with the registry) first if it was absent
    FAIL = "fail"  # refuses the prepare (the set does not validate there)
    JOIN = "join"  # starts between the prepare broadcast and the commit: gets the commit only
    MISS = "miss"  # prepares, but the commit never reaches it (its call fails)
    WARM = "warm"  # running, its model not loaded yet: refuses every call as warming


class FakeReplica:
    def __init__(self, replica_id: str, kind: str, plan: tuple[Step, ...]) -> None:
        self.replica_id, self.kind, self.plan = replica_id, kind, plan
        self.step = Step.ABSENT
        self.version = 0
        self.names: tuple[str, ...] = ()
        self.staged: dict[str, str] = {}  # op_id -> name of the staged set
        self.calls: list[str] = []  # protocol calls in order, e.g. "prepare load:a"
        self.gate: asyncio.Event | None = None  # when set, prepare waits for it

    def converge(self, state: RegistryState) -> None:
        """Reconcile: adopt the registry's sets of this kind under its version (never back)."""
        if state.version > self.version:
            self.version = state.version
            self.names = tuple(sorted(e.name for e in state.for_kind(self.kind)))
            # As ReplicaPool.reconcile does: a staged copy of a committed set is stale.
            self.staged = {k: n for k, n in self.staged.items() if n not in self.names}

    def report(self, status: ReplicaStatus) -> ReplicaReport:
        return ReplicaReport(self.replica_id, status, self.version, len(self.names), 0.0)

    def warming(self) -> Refusal | None:
        return Refusal.warming(f"replica {self.replica_id}") if self.step is Step.WARM else None

    async def prepare(self, op: HotLoadOp) -> ReplicaReport | Refusal:
        self.calls.append(f"prepare {op.key}")
        if self.gate is not None:
            await self.gate.wait()
        if refusal := self.warming():
            return refusal
        if self.step is Step.FAIL:
            raise ExpertSetError(f"{op.name!r} does not validate on {self.replica_id}")
        if op.action == "load":
            self.staged[op.op_id] = op.name
        return self.report("prepared")

    async def commit(self, op: HotLoadOp, state: RegistryState) -> ReplicaReport | Refusal:
        self.calls.append(f"commit {op.key}")
        if refusal := self.warming():
            return refusal
        if self.step is Step.MISS:
            raise ConnectionError(f"{self.replica_id} did not answer")
        self.staged.pop(op.op_id, None)
        self.converge(state)
        return self.report("committed")

    async def sync(self, state: RegistryState) -> ReplicaReport | Refusal:
        self.calls.append("sync")
        if refusal := self.warming():
            return refusal
        self.converge(state)
        return self.report("synced")

    async def abort(self, op_id: str) -> ReplicaReport | Refusal:
        self.calls.append("abort")
        if refusal := self.warming():
            return refusal
        self.staged.pop(op_id, None)
        return self.report("aborted")

    async def describe_pool(self) -> ReplicaDescription | Refusal:
        if refusal := self.warming():
            return refusal
        sets = tuple(LoadedSet(n, 2, 2 * i, 2 * i + 2) for i, n in enumerate(self.names))
        return ReplicaDescription(self.replica_id, self.version, sets, (), node_id="node")


class _Broadcast:
    def __init__(self, calls: list[Callable[[], Any]]) -> None:
        self.calls = calls

    async def results_async(self, return_exceptions: bool = False) -> list[Any]:
        return list(await asyncio.gather(*(c() for c in self.calls), return_exceptions=True))


@dataclass
class FakeHandle:
    """A deployment handle: `broadcast(method, *args)` reaches every running replica."""

    replicas: list[FakeReplica] = field(default_factory=list)
    on_broadcast: Callable[[str], None] = lambda method: None

    def broadcast(self, method: str, *args: Any) -> _Broadcast:
        running = [r for r in self.replicas if r.step is not Step.ABSENT]
        calls = [lambda r=r: getattr(r, method)(*args) for r in running]
        self.on_broadcast(method)  # after choosing the recipients: a joiner misses this call
        return _Broadcast(calls)


class _Remote:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    async def remote(self, *args: Any) -> Any:
        await asyncio.sleep(0)  # an actor call always yields to the event loop
        return self.fn(*args)


class FakeRegistryActor:
    """The registry actor over the real `Registry` (persisted in a temporary directory)."""

    def __init__(self, root: str) -> None:
        self.registry = Registry(root)
        self.state = _Remote(self.registry.state)
        self.commit_load = _Remote(self.registry.commit_load)
        self.commit_retire = _Remote(self.registry.commit_retire)


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)
