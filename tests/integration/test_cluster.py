"""Two Ray nodes on this one machine: LM replicas on both, hot-loads across nodes, a node lost.

A head (`ray start --head --block`) and a worker node, each a process group with its own temp
dir and free ports, all on 127.0.0.1; the app deployed with `serve run <yaml> --address ...
--non-blocking`, the operator's path of docs/operations.md. It is a second Ray instance beside
conftest.py's `ServeCluster` (maybe running in this process): this module never calls
`ray.init`; throw-away driver subprocesses read the node table and place a hold (below).

The worker is started as `ray start --address` starts one (`ray._private.node.Node`, as
`ray.cluster_utils` does), not by the CLI: on Linux the CLI joins a second node on one machine
only with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, which also turns 127.0.0.1 into the machine's
outward address. Every process gets one fresh token (RAY_AUTH_MODE=token): `ray start --head`
turns token auth on when ~/.ray/auth_token exists, and refuses drivers without it.

The worker runs in a mount namespace in which one set's tensor file is a truncated copy: that
node's view of the "shared" store is broken (a stale or partly synced copy), so a load of that
set fails there and only there: the all-or-nothing check across nodes, with no server change.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.builders import save_random_set
from tests.integration.conftest import wait_for
from tests.integration.two_nodes import (
    GOOD_SET,
    SPLIT_SET,
    Outcome,
    TwoNodeCluster,
    mount_namespace_prefix,
)

pytestmark = pytest.mark.integration
logger = logging.getLogger(__name__)

SENDERS = 4  # clients sending while the worker is lost: half streaming, half not
MAX_TOKENS = 48  # the tiny LM always runs this many: a request stays in flight a while
RETRYABLE = {"server_unavailable", "overloaded", "model_warming"}  # 503 / SSE error codes


@pytest.fixture(scope="module")
def two_nodes(tiny_lm, tiny_lm_dir) -> Iterator[TwoNodeCluster]:
    unshare = mount_namespace_prefix()
    if unshare is None:
        pytest.skip("needs mount namespaces (root, or unprivileged user namespaces)")
    root = Path(tempfile.mkdtemp(prefix="mora-2n-", dir="/tmp"))
    cluster = TwoNodeCluster(root, unshare)
    try:
        save_random_set(tiny_lm.model, cluster.store / GOOD_SET, GOOD_SET, seed=1)
        split = save_random_set(tiny_lm.model, cluster.store / SPLIT_SET, SPLIT_SET, seed=2)
        started = time.perf_counter()
        cluster.start(split)
        cluster.deploy(tiny_lm_dir)
        logger.info("two nodes up and the app deployed in %.1f s", time.perf_counter() - started)
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


def test_replicas_on_both_nodes_load_a_set_together(two_nodes: TwoNodeCluster) -> None:
    head, worker = two_nodes.head_id, two_nodes.worker_id
    before = two_nodes.converged()
    assert sorted(r["node_id"] for r in before["replicas"]["causal_lm"]) == sorted([head, worker])

    response = two_nodes.admin("POST", json={"path": GOOD_SET})
    assert response.status_code == 200, response.text
    version = response.json()["version"]
    assert version == before["version"] + 1
    assert [r["status"] for r in response.json()["replicas"]] == ["committed", "committed"]

    state = two_nodes.converged(timeout_s=10)  # committed in the request: nothing to wait for
    assert state["version"] == version
    assert [s["name"] for s in state["sets"]] == [GOOD_SET]
    assert {r["node_id"] for r in state["replicas"]["causal_lm"]} == {head, worker}


def test_completions_are_served_on_both_nodes(two_nodes: TwoNodeCluster) -> None:
    """Concurrent completions until each node's replica has routed tokens through the set."""
    state = two_nodes.converged()
    assert [s["name"] for s in state["sets"]] == [GOOD_SET]
    outcomes: list[tuple[int, dict[str, Any] | None]] = []  # (status, the response's "mora")

    def one() -> None:
        response = two_nodes.complete()
        ok = response.status_code == 200
        outcomes.append((response.status_code, response.json()["mora"] if ok else None))

    def served_on_both() -> bool:
        threads = [threading.Thread(target=one) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        replicas = two_nodes.experts()["replicas"]["causal_lm"]
        return len(replicas) == 2 and all(r["activations"].get(GOOD_SET, 0) > 0 for r in replicas)

    wait_for(served_on_both, "completions on the replicas of both nodes", 120, interval_s=0)
    # Every one names the committed pool and went through the set (a greedy completion of
    # one prompt routes the same way on every replica: that part is deterministic; which
    # replica serves it is Serve's choice, hence the loop above).
    assert outcomes and all(code == 200 for code, _ in outcomes), outcomes
    assert {mora["pool_version"] for _, mora in outcomes if mora} == {state["version"]}
    assert all(
        GOOD_SET in [e["name"] for e in mora["expert_sets"]] for _, mora in outcomes if mora
    ), outcomes
    logger.info("%d completions until both nodes had served some", len(outcomes))


def test_a_load_that_fails_on_one_node_changes_nothing(two_nodes: TwoNodeCluster) -> None:
    before = two_nodes.converged()
    response = two_nodes.admin("POST", json={"path": SPLIT_SET})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "expert_load_failed"
    assert "failed on 1 of 2 replicas" in error["message"], error["message"]

    after = two_nodes.converged(timeout_s=10)
    assert after["version"] == before["version"]
    assert [s["name"] for s in after["sets"]] == [GOOD_SET]


def test_a_lost_node_s_replica_comes_back_on_the_other_with_the_pool(
    two_nodes: TwoNodeCluster,
) -> None:
    head = two_nodes.head_id
    before = two_nodes.converged()
    on_head = [r["replica"] for r in before["replicas"]["causal_lm"] if r["node_id"] == head]
    assert len(on_head) == 1 and [s["name"] for s in before["sets"]] == [GOOD_SET]
    # Beside the proxy (SERVE_YAML): what the lost node takes down is model replicas only.
    assert two_nodes.actors("ServeReplica:mora:MoraIngress") == [head]
    two_nodes.driver("release")  # room on the head for the worker's replica

    # Traffic throughout from a few clients, streaming and not, every outcome recorded.
    outcomes: list[Outcome] = []
    stop = threading.Event()

    def traffic(stream: bool) -> None:
        while not stop.is_set():
            outcomes.append(two_nodes.outcome(stream, MAX_TOKENS))

    senders = [threading.Thread(target=traffic, args=(i % 2 == 1,)) for i in range(SENDERS)]
    for sender in senders:
        sender.start()
    try:
        time.sleep(2)
        killed_at = time.monotonic()
        two_nodes.kill_worker()
        after = two_nodes.converged(timeout_s=180, nodes={head})
        recovered_at = time.monotonic()
        time.sleep(6)
    finally:
        stop.set()
        for sender in senders:
            sender.join(timeout=150)

    replicas = after["replicas"]["causal_lm"]
    assert {r["node_id"] for r in replicas} == {head}
    assert on_head[0] in {r["replica"] for r in replicas}  # the head's replica lived on
    assert after["version"] == before["version"]
    assert [s["name"] for s in after["sets"]] == [GOOD_SET]
    failed = [o for o in outcomes if o.kind != "done"]
    logger.info("recovered %.1f s after the kill; %d requests, failed (s after the kill, kind): "
                "%s", recovered_at - killed_at, len(outcomes),
                [(round(o.sent - killed_at, 1), o.kind) for o in failed])  # fmt: skip
    # A request in flight on the lost node's replica gets a retryable answer: 503 with
    # Retry-After, or (streaming) an SSE error event. Never a 500, and the proxy, on the
    # head, answers every request: no connection error either.
    for o in failed:
        logger.info("%.1f s after the kill: %s %s", o.sent - killed_at, o.kind, o.detail)
    assert all(o.kind in ("done", "503", "sse-error") for o in outcomes), failed
    assert {o.code for o in failed} <= RETRYABLE, failed
    # From a moment after recovery on, every request is served with the committed pool.
    since = {(o.kind, o.version) for o in outcomes if o.sent > recovered_at + 2}
    assert since == {("done", before["version"])}, since
