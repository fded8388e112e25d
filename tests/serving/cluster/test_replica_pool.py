"""A replica's pool under the registry (no Ray): versions name pools, bad entries are
quarantined instead of crashing the replica, commits and reconciles agree."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mora_runtime.expert_sets.format import ExpertSetError
from mora_runtime.experts.patching import patch_model
from serving.cluster.protocol import HotLoadOp
from serving.cluster.registry import Registry, RegistryEntry, RegistryState
from serving.cluster.replica_pool import ReplicaPool
from tests.conftest import build_tiny_llama
from tests.integration.builders import save_random_set


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    model = build_tiny_llama()
    for i, name in enumerate(("set-a", "set-b", "set-c")):
        save_random_set(model, root / name, name, seed=i)
    return root


def new_replica(store: Path) -> ReplicaPool:
    model = build_tiny_llama()
    pool = patch_model(model, capacity=64)
    return ReplicaPool(pool, model, "causal_lm", str(store), lambda fn: fn())


def entry(store: Path, name: str, version: int) -> RegistryEntry:
    return RegistryEntry(name, "causal_lm", str(store / name), version, rank=4)


def state(version: int, *entries: RegistryEntry) -> RegistryState:
    return RegistryState(version, tuple(entries))


def load_op(store: Path, name: str) -> HotLoadOp:
    """What the coordinator broadcasts for a load."""
    return HotLoadOp(f"op-{name}", "load", name, "causal_lm", path=str(store / name), rank=4)


def names(replica: ReplicaPool) -> list[str]:
    return sorted(e.name for e in replica.pool.sets())


def test_one_version_names_one_pool_whatever_path_a_replica_took(store: Path) -> None:
    a, b, c = (entry(store, n, v) for n, v in (("set-a", 73), ("set-b", 74), ("set-c", 76)))
    follower, missed, late = new_replica(store), new_replica(store), new_replica(store)
    for replica in (follower, missed, late):
        run(replica.reconcile(state(73, a)))
    # v74 loads set-b: `missed` never gets the commit (it was busy, or its call failed).
    run(follower.prepare(load_op(store, "set-b")))
    run(follower.commit(load_op(store, "set-b"), state(74, a, b)))
    # v75 is another model's change: LM replicas only adopt the version.
    for replica in (follower, missed):
        run(replica.sync(state(75, a, b)))
    # v76 retires set-a and loads set-c; `late` missed everything and reconciles at once.
    for replica in (follower, missed):
        run(replica.prepare(load_op(store, "set-c")))
        run(replica.commit(load_op(store, "set-c"), state(76, b, c)))
    run(late.reconcile(state(76, b, c)))
    for replica in (follower, missed, late):
        assert (replica.pool.version, names(replica)) == (76, ["set-b", "set-c"])
        assert replica.describe().pool_version == 76
        described = replica.describe().as_json()  # the JSON of GET /v1/experts, per replica
        assert [s["name"] for s in described["sets"]] == ["set-b", "set-c"]
        assert all(s["slots"][1] - s["slots"][0] == s["rank"] > 0 for s in described["sets"])


def test_a_replica_that_missed_a_commit_never_claims_the_next_version_without_it(
    store: Path,
) -> None:
    replica = new_replica(store)
    a, b = entry(store, "set-a", 1), entry(store, "set-b", 2)
    run(replica.reconcile(state(1, a)))
    run(replica.sync(state(3, a, b)))  # set-b's commit (v2) never arrived here
    assert (replica.pool.version, names(replica)) == (3, ["set-a", "set-b"])


def test_a_replica_started_after_a_crash_reports_the_registry_version(store: Path) -> None:
    registry_state = state(12, entry(store, "set-a", 3), entry(store, "set-c", 11))
    before = new_replica(store)
    run(before.reconcile(registry_state))
    reborn = new_replica(store)  # a fresh process: its pool starts empty, at version 0
    run(reborn.reconcile(registry_state))
    assert before.pool.version == reborn.pool.version == 12
    assert names(before) == names(reborn) == ["set-a", "set-c"]


def test_commit_after_reconcile_is_a_no_op_not_an_error(store: Path) -> None:
    replica = new_replica(store)
    op = load_op(store, "set-a")
    run(replica.prepare(op))
    run(replica.reconcile(state(5, entry(store, "set-a", 5))))  # got there first
    report = run(replica.commit(op, state(5, entry(store, "set-a", 5))))
    assert report.pool_version == 5 and names(replica) == ["set-a"]
    assert (report.status, report.replica) == ("committed", replica.replica_id)
    assert replica._staged == {}
    # and a late, older state never moves the pool back
    run(replica.sync(state(4)))
    assert replica.pool.version == 5 and names(replica) == ["set-a"]


def test_a_set_staged_for_a_commit_that_never_arrived_is_dropped_at_reconcile(
    store: Path,
) -> None:
    replica = new_replica(store)
    run(replica.prepare(load_op(store, "set-a")))
    assert list(replica._staged) == ["op-set-a"]
    run(replica.reconcile(state(1)))  # another change: the set is not committed yet, keep it
    assert list(replica._staged) == ["op-set-a"]
    run(replica.reconcile(state(2, entry(store, "set-a", 2))))  # committed; the call was lost
    assert replica._staged == {} and names(replica) == ["set-a"]


def test_an_older_registry_state_is_never_applied(store: Path) -> None:
    replica = new_replica(store)
    run(replica.reconcile(state(9, entry(store, "set-a", 9))))
    assert run(replica.reconcile(state(4))) is False
    assert replica.pool.version == 9 and names(replica) == ["set-a"]


def _edit_json(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = directory / "expert_set.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_an_entry_that_cannot_be_applied_is_quarantined_and_the_rest_served(
    store: Path,
) -> None:
    # The file changed on disk after its commit: scale finite in JSON, not in float32.
    _edit_json(store / "set-b", lambda d: d.update(scale=1e300))
    bad = entry(store, "set-b", 2)
    registry_state = state(3, entry(store, "set-a", 1), bad, entry(store, "set-c", 3))
    replica = new_replica(store)
    assert run(replica.reconcile(registry_state)) is True  # no exception: the replica starts
    assert names(replica) == ["set-a", "set-c"]
    assert replica.pool.version == 3
    described = replica.describe().quarantined
    assert [q.name for q in described] == ["set-b"] and described[0].reason
    assert described[0].version_added == 2
    # skipped on later rounds (not re-read every few seconds)...
    assert run(replica.reconcile(registry_state)) is False
    # ...and retiring it works although it is not loaded here
    retire = HotLoadOp("r", "retire", "set-b", "causal_lm")
    run(replica.prepare(retire))
    run(replica.commit(retire, state(4, entry(store, "set-a", 1), entry(store, "set-c", 3))))
    assert replica.describe().quarantined == () and replica.pool.version == 4
    assert names(replica) == ["set-a", "set-c"]


def test_prepare_refuses_a_set_the_pool_cannot_hold_and_changes_nothing(store: Path) -> None:
    replica = new_replica(store)
    run(replica.reconcile(state(1, entry(store, "set-a", 1))))
    # Values finite in the file's float32 but not in the pool's dtype fail at staging.
    replica.pool.to("cpu", torch.float16)
    from safetensors.torch import load_file, save_file

    tensors = load_file(store / "set-c" / "expert_set.safetensors")
    key = next(iter(tensors))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = 1e30
    save_file(tensors, store / "set-c" / "expert_set.safetensors")
    with pytest.raises(ExpertSetError):
        run(replica.prepare(load_op(store, "set-c")))
    assert names(replica) == ["set-a"] and replica.pool.version == 1
    assert replica._staged == {}


def test_registry_version_survives_a_restart_and_never_goes_back(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path))
    registry.commit_load("a", "causal_lm", str(tmp_path / "a"), 4)
    registry.commit_load("b", "causal_lm", str(tmp_path / "b"), 4)
    registry.commit_retire("a")
    restarted = Registry(str(tmp_path))  # the actor restarted: it reads registry.json
    assert restarted.version == 3 and restarted.state().names() == {"b"}
    assert restarted.commit_load("a", "causal_lm", str(tmp_path / "a"), 4) == 4
