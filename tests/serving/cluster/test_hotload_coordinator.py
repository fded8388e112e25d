"""The hot-load coordinator without Ray: de-duplication of identical operations, and its
all-or-nothing protocol driven over fake replicas (tests/serving/cluster/fake_cluster.py) as
tables of operation sequences.

Each case names its replicas (their model kind and, per operation, what they do: see `Step`),
a sequence of operations ("load a", "retire a", "load a x3" = three identical loads at once),
every call's outcome (the registry version it committed, or the error it raised), and the
registry and every replica's pool at the end. Every case also checks the invariants: an
operation that fails changes no pool and no registry, nothing stays staged anywhere, each
identical concurrent call shares one run, and every commit names each replica's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from mora_runtime.expert_sets.format import ExpertSet, ExpertSetMeta
from mora_runtime.expert_sets.store import save_expert_set
from serving.cluster.hotload import HotLoadCoordinator
from serving.cluster.protocol import HotLoadOp, HotLoadResult
from serving.cluster.registry import RegistryState
from serving.http.errors import (
    ApiError,
    ExpertConflict,
    ExpertLoadFailed,
    NotFound,
    ServiceUnavailable,
)
from tests.serving import fakes
from tests.serving.cluster.fake_cluster import (
    FakeHandle,
    FakeRegistryActor,
    FakeReplica,
    Step,
    wait_until,
)

LM, CLIP = "causal_lm", "clip"
SET_KINDS = {"a": LM, "b": LM, "c": CLIP}  # the sets in the `store` fixture


# --------------------------------------------------------------------- de-duplication
class CountingCoordinator(HotLoadCoordinator):
    def __init__(self) -> None:
        super().__init__("/nonexistent-store", registry=None, handles={})
        self.runs = 0
        self.release = asyncio.Event()

    async def _run(self, op: HotLoadOp) -> HotLoadResult:
        self.runs += 1
        await self.release.wait()
        return HotLoadResult(op.action, op.name, self.runs, ())


def load_a() -> HotLoadOp:
    return HotLoadOp.load("a", LM, "/nonexistent-store/a", 2)  # a fresh op_id every time


def test_identical_operations_share_one_run_and_a_cancelled_caller_leaks_nothing() -> None:
    async def scenario() -> None:
        coordinator = CountingCoordinator()
        first = asyncio.ensure_future(coordinator._once(load_a()))
        second = asyncio.ensure_future(coordinator._once(load_a()))
        await asyncio.sleep(0.01)
        first.cancel()  # the client of the first request went away
        await asyncio.sleep(0.01)
        coordinator.release.set()
        assert (await second).version == 1  # the run went on for the other caller
        assert coordinator.runs == 1
        await asyncio.sleep(0)
        assert coordinator._inflight == {}
        # A later load of the same name really runs again.
        assert (await coordinator._once(load_a())).version == 2

    asyncio.run(scenario())


def test_a_run_whose_only_caller_left_still_frees_its_key() -> None:
    async def scenario() -> None:
        coordinator = CountingCoordinator()
        caller = asyncio.ensure_future(coordinator._once(load_a()))
        await asyncio.sleep(0.01)
        caller.cancel()
        coordinator.release.set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert coordinator._inflight == {}
        assert (await coordinator._once(load_a())).version == 2

    asyncio.run(scenario())


# --------------------------------------------------------------------- tables
@dataclass(frozen=True)
class Case:
    id: str
    replicas: tuple[tuple[str, str], ...]  # (model kind, one Step value per operation)
    ops: tuple[str, ...]
    outcomes: tuple[int | type[ApiError], ...]  # one per call, in call order
    registry: tuple[int, tuple[str, ...]]  # (version, set names) at the end
    pools: tuple[tuple[int, tuple[str, ...]], ...]  # each replica's (version, sets) at the end


CASES = (
    Case("load on every replica", ((LM, "ok"), (LM, "ok")), ("load a",), (1,),
         (1, ("a",)), ((1, ("a",)), (1, ("a",)))),
    Case("load, load, retire", ((LM, "ok ok ok"), (LM, "ok ok ok")),
         ("load a", "load b", "retire a"), (1, 2, 3),
         (3, ("b",)), ((3, ("b",)), (3, ("b",)))),
    Case("retired set loaded again", ((LM, "ok ok ok"),), ("load a", "retire a", "load a"),
         (1, 2, 3), (3, ("a",)), ((3, ("a",)),)),
    Case("one replica failing at prepare commits nothing anywhere",
         ((LM, "ok"), (LM, "fail"), (LM, "ok")), ("load a",), (ExpertLoadFailed,),
         (0, ()), ((0, ()), (0, ()), (0, ()))),
    Case("a later failure keeps the earlier commit", ((LM, "ok ok"), (LM, "ok fail")),
         ("load a", "load b"), (1, ExpertLoadFailed),
         (1, ("a",)), ((1, ("a",)), (1, ("a",)))),
    Case("a retire failing at prepare keeps the set", ((LM, "ok ok"), (LM, "ok fail")),
         ("load a", "retire a"), (1, ExpertLoadFailed),
         (1, ("a",)), ((1, ("a",)), (1, ("a",)))),
    Case("a replica joining between prepare and commit converges on the commit",
         ((LM, "ok ok"), (LM, "- join")), ("load a", "load b"), (1, 2),
         (2, ("a", "b")), ((2, ("a", "b")), (2, ("a", "b")))),
    Case("a replica started between operations catches up and takes part",
         ((LM, "ok ok"), (LM, "- ok")), ("load a", "load b"), (1, 2),
         (2, ("a", "b")), ((2, ("a", "b")), (2, ("a", "b")))),
    Case("a replica not started yet is left to its own reconcile", ((LM, "ok"), (LM, "-")),
         ("load a",), (1,), (1, ("a",)), ((1, ("a",)), (0, ()))),
    Case("a commit that misses a replica still commits", ((LM, "ok"), (LM, "miss")),
         ("load a",), (1,), (1, ("a",)), ((1, ("a",)), (0, ()))),
    Case("no replica running commits nothing", ((LM, "-"),), ("load a",),
         (ExpertLoadFailed,), (0, ()), ((0, ()),)),
    Case("concurrent identical loads run once", ((LM, "ok"), (LM, "ok")), ("load a x3",),
         (1, 1, 1), (1, ("a",)), ((1, ("a",)), (1, ("a",)))),
    Case("concurrent identical loads fail once, together", ((LM, "ok"), (LM, "fail")),
         ("load a x2",), (ExpertLoadFailed, ExpertLoadFailed), (0, ()), ((0, ()), (0, ()))),
    Case("a loaded name conflicts and an unknown one is not found", ((LM, "ok ok ok"),),
         ("load a", "load a", "retire z"), (1, ExpertConflict, NotFound),
         (1, ("a",)), ((1, ("a",)),)),
    Case("another model's replicas adopt the version", ((LM, "ok"), (CLIP, "ok")),
         ("load a",), (1,), (1, ("a",)), ((1, ("a",)), (1, ()))),
    Case("an LM load commits while the CLIP warms up; the CLIP catches up once loaded",
         ((LM, "ok ok"), (CLIP, "warm ok")), ("load a", "load b"), (1, 2),
         (2, ("a", "b")), ((2, ("a", "b")), (2, ()))),
    Case("a CLIP set while the CLIP warms up is a 503 and changes nothing",
         ((LM, "ok"), (CLIP, "warm")), ("load c",), (ServiceUnavailable,),
         (0, ()), ((0, ()), (0, ()))),
    Case("one warming CLIP replica refuses the load for all; the loaded one aborts",
         ((CLIP, "ok ok"), (CLIP, "warm ok")), ("load c", "load c"), (ServiceUnavailable, 1),
         (1, ("c",)), ((1, ("c",)), (1, ("c",)))),
    Case("retiring a CLIP set while the CLIP warms up is a 503 and keeps it",
         ((CLIP, "ok ok"), (CLIP, "- warm")), ("load c", "retire c"), (1, ServiceUnavailable),
         (1, ("c",)), ((1, ("c",)), (0, ()))),
)  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sets "a" and "b" for a causal LM, "c" for a CLIP; the fake replicas never read their
    tensors."""
    root = tmp_path_factory.mktemp("store")
    fingerprint = {"architecture": "Fake", "model_type": None, "hash": "0" * 64}
    for name, kind in SET_KINDS.items():
        meta = ExpertSetMeta(
            name=name,
            model_kind=kind,
            base_model={**fingerprint, "modules": {"m": [4, 4]}},
            target_modules=("m",),
            rank=2,
            top_k=2,
            tau=0.03,
            threshold=0.2,
            scale=1.0,
        )
        tensors = {"m": (torch.randn(2, 4), torch.randn(2, 4))}
        save_expert_set(ExpertSet(meta, tensors), root / name)
    return root


class TableCoordinator(HotLoadCoordinator):
    """Counts the callers that reached the de-duplication, per operation key."""

    arrived: dict[str, int]

    async def _once(self, op: HotLoadOp) -> HotLoadResult:
        self.arrived[op.key] = self.arrived.get(op.key, 0) + 1
        return await super()._once(op)


def pools(replicas: list[FakeReplica]) -> list[tuple[int, tuple[str, ...]]]:
    return [(r.version, r.names) for r in replicas]


class Cluster:
    """The replicas of one case, their handles, the registry and the coordinator."""

    def __init__(self, case: Case, store: Path, registry_root: Path) -> None:
        plans = [tuple(Step(s) for s in plan.split()) for _, plan in case.replicas]
        assert all(len(plan) == len(case.ops) for plan in plans), "one step per operation"
        self.replicas = [
            FakeReplica(f"r{i}", kind, plan)
            for i, ((kind, _), plan) in enumerate(zip(case.replicas, plans, strict=True))
        ]
        self.handles: dict[str, FakeHandle] = {}
        for replica in self.replicas:
            self.handles.setdefault(replica.kind, FakeHandle()).replicas.append(replica)
        self.registry = FakeRegistryActor(str(registry_root))
        self.metrics = fakes.RecordingMetrics()
        self.coordinator = TableCoordinator(
            str(store), self.registry, dict(self.handles), self.metrics
        )
        self.coordinator.arrived = {}

    def state(self) -> RegistryState:
        return self.registry.registry.state()

    def start(self, replica: FakeReplica) -> None:
        """A replica starting up reconciles with the registry before it serves."""
        replica.step = Step.OK
        replica.converge(self.state())

    def enter(self, index: int) -> None:
        """Give every replica its step for operation `index`."""
        for replica in self.replicas:
            step = replica.plan[index]
            if step is Step.JOIN:
                continue  # starts during the operation, see _joiners
            if step is Step.WARM:  # running, not loaded: nothing to reconcile yet
                replica.step = step
                continue
            if step is not Step.ABSENT and replica.step in (Step.ABSENT, Step.WARM):
                self.start(replica)  # a warming replica that loaded reconciles as it starts
            if replica.step is not Step.ABSENT:
                replica.step = step
        for handle in self.handles.values():
            handle.on_broadcast = self._joiners(handle, index)

    def _joiners(self, handle: FakeHandle, index: int) -> Callable[[str], None]:
        def on_broadcast(method: str) -> None:
            if method == "prepare":
                for replica in handle.replicas:
                    if replica.plan[index] is Step.JOIN and replica.step is Step.ABSENT:
                        self.start(replica)

        return on_broadcast

    async def call(self, action: str, name: str) -> dict[str, Any] | ApiError:
        try:
            if action == "load":
                return await self.coordinator.load_set(name, None, None)
            return await self.coordinator.retire_set(name)
        except ApiError as exc:
            return exc

    async def identical_calls(self, action: str, name: str, count: int) -> list[Any]:
        """`count` identical calls at once; every prepare waits until all have arrived."""
        if count == 1:
            return [await self.call(action, name)]
        key, gate = f"{action}:{name}", asyncio.Event()
        running = [r for r in self.replicas if r.step is not Step.ABSENT]
        for replica in self.replicas:
            replica.gate = gate
        tasks = [asyncio.ensure_future(self.call(action, name)) for _ in range(count)]
        await wait_until(
            lambda: (
                self.coordinator.arrived.get(key, 0) >= count
                and all(f"prepare {key}" in r.calls for r in running)
            ),
            "every identical call to arrive",
        )
        gate.set()
        results = await asyncio.gather(*tasks)
        for replica in self.replicas:
            replica.gate = None
        return results

    async def play(self, index: int, text: str) -> list[Any]:
        """Operation `index` of the case, checking the invariants around it."""
        action, name, *times = text.split()
        self.enter(index)
        before = (pools(self.replicas), self.state())
        calls_before = [len(r.calls) for r in self.replicas]
        runs_before = len(self.metrics.named("expert_load"))
        results = await self.identical_calls(action, name, int(times[0][1:]) if times else 1)

        runs = len(self.metrics.named("expert_load")) - runs_before
        assert runs == (1 if action == "load" or name in before[1].names() else 0), text
        for replica, start_at in zip(self.replicas, calls_before, strict=True):
            prepared = replica.calls[start_at:].count(f"prepare {action}:{name}")
            assert prepared <= 1, f"{text}: {replica.replica_id} prepared {prepared} times"
            # Nothing stays staged, but on a replica the commit missed: its reconcile drops it.
            if replica.step is not Step.MISS:
                assert replica.staged == {}, f"{text}: {replica.replica_id} kept a staged set"
        if all(isinstance(r, ApiError) for r in results):
            # All or nothing: a failed operation changed no pool and not the registry.
            assert (pools(self.replicas), self.state()) == before, text
        handle = self.handles.get(SET_KINDS.get(name, LM), FakeHandle())
        running = [r for r in handle.replicas if r.step is not Step.ABSENT]
        statuses = ["will reconcile" if r.step is Step.MISS else "committed" for r in running]
        for result in results:
            if not isinstance(result, ApiError):
                assert (result["action"], result["name"]) == (action, name)
                assert [r["status"] for r in result["replicas"]] == statuses, text
        return results

    async def check_listing(self) -> None:
        """GET /v1/experts: the registry's sets and every running replica's pool, as JSON."""
        state = self.state()
        listed = await self.coordinator.list_sets()
        assert listed["version"] == state.version
        assert [s["name"] for s in listed["sets"]] == [e.name for e in state.sets]
        assert all(s["path"] == s["name"] for s in listed["sets"])  # relative to the store
        for kind, handle in self.handles.items():
            # A warming replica has no pool to describe: it is left out, like one that fails.
            running = [r for r in handle.replicas if r.step not in (Step.ABSENT, Step.WARM)]
            described = listed["replicas"][kind]
            assert [(d["replica"], d["pool_version"]) for d in described] == [
                (r.replica_id, r.version) for r in running
            ]
            assert [[s["name"] for s in d["sets"]] for d in described] == [
                list(r.names) for r in running
            ]


async def play(case: Case, store: Path, registry_root: Path) -> None:
    cluster = Cluster(case, store, registry_root)
    outcomes: list[Any] = []
    for index, text in enumerate(case.ops):
        outcomes.extend(await cluster.play(index, text))

    got = [type(o) if isinstance(o, ApiError) else o["version"] for o in outcomes]
    assert got == list(case.outcomes)
    state = cluster.state()
    assert (state.version, tuple(sorted(state.names()))) == case.registry
    assert pools(cluster.replicas) == list(case.pools)
    await cluster.check_listing()
    # Each replica's background reconcile brings it to the registry's pool, staging nothing.
    for replica in cluster.replicas:
        replica.converge(state)
        assert (replica.version, replica.staged) == (state.version, {})
        assert replica.names == tuple(sorted(e.name for e in state.for_kind(replica.kind)))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hot_load_table(case: Case, store: Path, tmp_path: Path) -> None:
    asyncio.run(play(case, store, tmp_path / "registry"))
