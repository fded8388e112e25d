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

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.launcher import free_ports
from tests.integration.builders import save_random_set
from tests.integration.conftest import ADMIN_TOKEN, LM_NAME, wait_for

pytestmark = pytest.mark.integration
logger = logging.getLogger(__name__)

BIN = Path(sys.executable).parent
PROMPT = "the quick brown fox"
GOOD_SET = "everywhere"  # readable on both nodes
SPLIT_SET = "head-only"  # its tensors are truncated in the worker node's view of the store

# A throw-away driver. argv: GCS address, then "up" (wait for both nodes, take one of the
# head's two LM slots with a detached actor, print {resource: node id}) or "release" (free it).
DRIVER_SCRIPT = """
import json, sys, time, ray
ray.init(address=sys.argv[1], namespace="two-nodes", logging_level="ERROR", log_to_driver=False)
@ray.remote(num_cpus=0, resources={"node_a": 0.5, "lm_slot": 1})
class Hold:
    def ready(self):
        return True
if sys.argv[2] == "up":
    while len(nodes := [n for n in ray.nodes() if n["Alive"]]) < 2:
        time.sleep(0.5)
    ray.get(Hold.options(name="hold", lifetime="detached").remote().ready.remote())
    print(json.dumps({r: n["NodeID"] for n in nodes for r in n["Resources"] if "node_" in r}))
else:
    ray.kill(ray.get_actor("hold"))
"""

# `ray start --address=... --block` for a worker node, less the CLI's one-node-per-machine
# check (see the module docstring). argv: GCS address, temp dir, RayParams fields as JSON.
WORKER_SCRIPT = """
import json, sys, time
from ray._private.node import Node
from ray._private.parameter import RayParams
params = RayParams(gcs_address=sys.argv[1], node_ip_address="127.0.0.1", temp_dir=sys.argv[2],
                   **json.loads(sys.argv[3]))
Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
while True:
    time.sleep(60)
"""

# The operator's file (deploy/serve.yaml's shape): one proxy, on the head, since every
# node's proxy would bind the same 127.0.0.1:port. Serve only tries to spread replicas over
# nodes, so each LM replica takes an `lm_slot`: the head has two, one of them held by a
# detached actor until the worker is to be lost, the worker one: one replica on each node,
# and room on the head for the worker's once the hold is released.
SERVE_YAML = """
proxy_location: HeadOnly
http_options: {{host: 127.0.0.1, port: {port}}}
applications:
  - name: mora
    route_prefix: /
    import_path: serving.deployments:build_app
    args:
      expert_store: {store}
      lm: {{model_dir: {lm_dir}, served_name: {lm}, replicas: 2, num_cpus: 0, torch_threads: 1}}
      clip: {{enabled: false}}
    deployments:
      - name: LMServer
        ray_actor_options: {{num_cpus: 0, resources: {{lm_slot: 1}}}}
"""

# Ray's fixed-port services, one free port each per node (the rest pick random ports):
# `ray start` flag -> RayParams field.
NODE_PORTS = {
    "--node-manager-port": "node_manager_port",
    "--object-manager-port": "object_manager_port",
    "--dashboard-agent-listen-port": "dashboard_agent_listen_port",
    "--dashboard-agent-grpc-port": "metrics_agent_port",
    "--runtime-env-agent-port": "runtime_env_agent_port",
    "--metrics-export-port": "metrics_export_port",
}


def _mount_namespace_prefix() -> list[str] | None:
    """An `unshare` command line that gives a process its own mounts, if this host allows it."""
    for prefix in (
        ["unshare", "--mount", "--propagation", "private"],  # root
        ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"],
    ):
        if shutil.which(prefix[0]) is None:
            return None
        probe = subprocess.run([*prefix, "true"], capture_output=True, check=False)
        if probe.returncode == 0:
            return prefix
    return None


def _pids(pattern: str, wait_s: float) -> list[int]:
    """The processes whose command line has `pattern` still there after up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
        if not out.stdout.split() or time.monotonic() > deadline:
            return [int(pid) for pid in out.stdout.split()]
        time.sleep(0.5)


class TwoNodeCluster:
    """A head and a worker node on 127.0.0.1, the "mora" app deployed on them."""

    def __init__(self, root: Path, unshare: list[str]) -> None:
        self.root = root
        self.unshare = unshare
        ports = iter(free_ports(4 + 2 * len(NODE_PORTS)))
        self.gcs_port, self.http_port = next(ports), next(ports)
        self.client_port, self.dashboard_port = next(ports), next(ports)
        self.node_ports = {
            name: {flag: next(ports) for flag in NODE_PORTS} for name in ("head", "worker")
        }
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.store = root / "store"
        self.store.mkdir()
        self.processes: dict[str, subprocess.Popen] = {}
        self.session_name: str | None = None
        self.head_id = self.worker_id = ""  # Ray node ids, once both nodes are up
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=120.0)
        self.env = {
            **os.environ,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # 127.0.0.1 stays loopback
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            # A lost node is declared dead after about 3 s instead of about 15.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            "MORA_ADMIN_TOKEN": ADMIN_TOKEN,  # the replicas' environment, as in production
        }

    # ----------------------------------------------------------------- nodes
    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 (the process owns it)
        # A process group per node: killing a node signals all of its processes.
        self.processes[name] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()

    def start(self, split_set: Path) -> None:
        (self.root / "head").mkdir()  # short temp dirs: socket paths must stay under 108 bytes
        self._spawn(
            "head",
            [
                str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                f"--port={self.gcs_port}", f"--temp-dir={self.root / 'head'}", "--num-cpus=1",
                f"--ray-client-server-port={self.client_port}", "--include-dashboard=false",
                f"--dashboard-port={self.dashboard_port}", "--disable-usage-stats",
                '--resources={"node_a": 1, "lm_slot": 2}',
                *(f"{flag}={port}" for flag, port in self.node_ports["head"].items()),
            ],
        )  # fmt: skip
        wait_for(lambda: (self.root / "head" / "session_latest").exists(), "the head node", 120)
        self.session_name = (self.root / "head" / "session_latest").resolve().name
        # The worker's view of the store: the split set's tensors cut in half.
        tensors = split_set / "expert_set.safetensors"
        truncated = self.root / "truncated.safetensors"
        truncated.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
        params = {"num_cpus": 1, "resources": {"node_b": 1, "lm_slot": 1}}
        params["include_log_monitor"] = True
        params |= {NODE_PORTS[f]: port for f, port in self.node_ports["worker"].items()}
        (self.root / "worker").mkdir()
        worker = [sys.executable, "-c", WORKER_SCRIPT, self.address, str(self.root / "worker"),
                  json.dumps(params)]  # fmt: skip
        script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
        self._spawn("worker", [*self.unshare, "sh", "-c", script, "sh", str(truncated),
                               str(tensors), *worker])  # fmt: skip
        # Both nodes up; one LM slot of the head held until test 4: one replica per node.
        nodes = json.loads(self.driver("up").strip().splitlines()[-1])
        self.head_id, self.worker_id = nodes["node_a"], nodes["node_b"]

    def driver(self, action: str) -> str:
        command = [sys.executable, "-c", DRIVER_SCRIPT, self.address, action]
        out = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=120)
        assert out.returncode == 0, f"driver {action} failed: {out.stderr[-2000:]}"
        return out.stdout

    def kill_worker(self) -> None:
        """A node lost at once: every process of the worker node gets SIGKILL."""
        process = self.processes["worker"]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def stop(self) -> None:
        """SIGKILL both nodes' process groups (a graceful stop drains Serve: slow and nothing
        to test here), then any process that names this session on its command line (raylet,
        GCS, agents, workers) and left its node's group: none may outlive the cluster."""
        self.http.close()
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        if self.session_name:
            for pid in _pids(self.session_name, 10):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            assert not _pids(self.session_name, 30), f"{self.session_name} outlived the cluster"

    # ----------------------------------------------------------------- the app
    def deploy(self, lm_dir: Path) -> None:
        path = self.root / "serve.yaml"
        # Paths quoted as JSON strings, which YAML reads as they are.
        paths = {"store": json.dumps(str(self.store)), "lm_dir": json.dumps(str(lm_dir))}
        path.write_text(SERVE_YAML.format(port=self.http_port, lm=LM_NAME, **paths))
        command = [str(BIN / "serve"), "run", str(path), "--address", self.address]
        out = subprocess.run(
            [*command, "--non-blocking"], capture_output=True, text=True, env=self.env, timeout=300
        )
        assert out.returncode == 0, out.stderr[-4000:]
        wait_for(lambda: self.http.get("/health").status_code == 200, "/health", 300)

    def admin(self, method: str, path: str = "/v1/experts", **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        return self.http.request(method, path, headers=headers, **kwargs)

    def experts(self) -> dict[str, Any]:
        response = self.admin("GET")
        assert response.status_code == 200, response.text
        return response.json()

    def converged(
        self, replicas: int = 2, timeout_s: float = 180.0, nodes: set[str] | None = None
    ) -> dict[str, Any]:
        """GET /v1/experts once `replicas` LM replicas (on `nodes`, if given) serve the
        registry's sets and version: what a test asserts about the registry then holds for
        every replica."""

        def probe() -> dict[str, Any] | None:
            response = self.admin("GET")
            if response.status_code != 200:
                return None
            state = response.json()
            names = sorted(s["name"] for s in state["sets"])
            lm = state["replicas"].get("causal_lm", [])
            ok = len(lm) == replicas and all(
                r["pool_version"] == state["version"]
                and sorted(s["name"] for s in r["sets"]) == names
                and (nodes is None or r["node_id"] in nodes)
                for r in lm
            )
            return state if ok else None

        return wait_for(probe, f"{replicas} replicas on the committed pool", timeout_s)

    def complete(self, max_tokens: int = 8) -> httpx.Response:
        body = {"model": LM_NAME, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
        return self.http.post("/v1/completions", json=body)


@pytest.fixture(scope="module")
def two_nodes(tiny_lm, tiny_lm_dir) -> Iterator[TwoNodeCluster]:
    unshare = _mount_namespace_prefix()
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
    two_nodes.driver("release")  # room on the head for the worker's replica

    # Traffic throughout: one request at a time, every outcome recorded.
    outcomes: list[tuple[float, int, int | None]] = []  # (sent at, status, pool version)
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            sent, code, version = time.monotonic(), 0, None  # 0: no HTTP answer
            with contextlib.suppress(httpx.HTTPError):
                response = two_nodes.complete()
                code = response.status_code
                version = response.json()["mora"]["pool_version"] if code == 200 else None
            outcomes.append((sent, code, version))

    sender = threading.Thread(target=traffic)
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
        sender.join(timeout=150)

    replicas = after["replicas"]["causal_lm"]
    assert {r["node_id"] for r in replicas} == {head}
    assert on_head[0] in {r["replica"] for r in replicas}  # the head's replica lived on
    assert after["version"] == before["version"]
    assert [s["name"] for s in after["sets"]] == [GOOD_SET]
    failed = [(round(t - killed_at, 1), code) for t, code, _ in outcomes if code != 200]
    logger.info("recovered %.1f s after the kill; %d requests, failed (s after the kill, code): "
                "%s", recovered_at - killed_at, len(outcomes), failed)  # fmt: skip
    # Requests in flight on the lost node may fail (a retryable 503, or a 500 that Serve's
    # proxy can still answer when a node dies: logged above, not yet asserted).
    # From a moment after recovery on, every request is served with the committed pool.
    since = [(code, version) for t, code, version in outcomes if t > recovered_at + 2]
    assert since and set(since) == {(200, before["version"])}, since
