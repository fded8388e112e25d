"""A cluster of two Ray nodes on this one machine, for tests/integration/test_cluster.py: a
head and a worker, each a process group with its own temp dir and free ports on 127.0.0.1,
the app deployed as an operator would (`serve run <yaml> --address ...`)."""

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from serving.cluster.launcher import free_ports
from tests.integration.conftest import ADMIN_TOKEN, LM_NAME, wait_for

logger = logging.getLogger(__name__)

BIN = Path(sys.executable).parent
PROMPT = "the quick brown fox"
GOOD_SET = "everywhere"  # readable on both nodes
SPLIT_SET = "head-only"  # its tensors are truncated in the worker node's view of the store

# A throw-away driver. argv: GCS address, then "up" (wait for both nodes, take one of the
# head's two LM slots with a detached actor, print {resource: node id}), "release" (free it)
# or "actors" (print [class name, node id] of every live actor).
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
elif sys.argv[2] == "actors":
    from ray._private.state import actors
    alive = actors(actor_state_name="ALIVE").values()
    print(json.dumps([[a["ActorClassName"], a["Address"]["NodeID"]] for a in alive]))
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
# and room on the head for the worker's once the hold is released. The ingress sits beside
# the proxy on the head (Ray gives the head node the resource `node:__internal_head__`): an
# ingress lost with its node fails the requests it holds with Serve's own plain-text 500,
# which the app cannot turn into a retryable answer (docs/reliability.md).
SERVE_YAML = """
proxy_location: HeadOnly
http_options: {{host: 127.0.0.1, port: {port}}}
applications:
  - name: mora
    route_prefix: /
    import_path: serving.cluster.deployments:build_app
    args:
      expert_store: {store}
      lm: {{model_dir: {lm_dir}, served_name: {lm}, replicas: 2, num_cpus: 0, torch_threads: 1}}
      clip: {{enabled: false}}
    deployments:
      - name: LMServer
        ray_actor_options: {{num_cpus: 0, resources: {{lm_slot: 1}}}}
      - name: MoraIngress
        ray_actor_options: {{num_cpus: 0.25, resources: {{"node:__internal_head__": 0.001}}}}
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


def mount_namespace_prefix() -> list[str] | None:
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


def _session_pids(session: int) -> list[int]:
    """The live (not zombie) processes of a session, read from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # After the command name in parentheses: state, ppid, process group, session.
            fields = stat.read_text().rpartition(")")[2].split()
            if fields[0] != "Z" and int(fields[3]) == session:
                pids.append(int(stat.parent.name))
    return pids


@dataclass(frozen=True)
class Outcome:
    """One completion sent while a node is lost, as its client saw it."""

    sent: float  # time.monotonic() when it was sent
    # "done"; "503" (non-streaming, with Retry-After); "sse-error" (a stream ended by an error
    # event); "no-answer" (the connection failed, no HTTP status); "unexpected" (anything else)
    kind: str
    status: int = 0  # 0: no HTTP answer
    version: int | None = None  # the pool version a finished request names
    code: str | None = None  # the error code of a 503 or an SSE error event
    detail: str = ""  # what a failure said: body and headers, or the exception


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

    def actors(self, class_name: str) -> list[str]:
        """The node ids of the live actors of `class_name` (Serve names a replica's class
        `ServeReplica:<app>:<deployment>`)."""
        alive = json.loads(self.driver("actors").strip().splitlines()[-1])
        return [node for name, node in alive if name == class_name]

    def kill_worker(self) -> None:
        """A node lost at once: every process of the worker node gets SIGKILL. Ray gives each
        worker process (a replica) a process group of its own, so killing the node's group
        would leave its replicas serving until they notice their raylet is gone; they all
        keep the node's session, led by the node's first process."""
        process = self.processes["worker"]
        deadline = time.monotonic() + 30
        # start_new_session: the node's first process leads the session.
        while pids := _session_pids(process.pid):
            assert time.monotonic() < deadline, f"the worker node's processes outlived {pids}"
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.poll()  # reaps the leader once it is dead
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

    def outcome(self, stream: bool, max_tokens: int) -> Outcome:
        """Send one completion and classify what came back; never raises for the server."""
        sent = time.monotonic()
        body = {"model": LM_NAME, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        try:
            with self.http.stream("POST", "/v1/completions", json=body) as response:
                text = response.read().decode(errors="replace")
        except httpx.HTTPError as exc:
            return Outcome(sent, "no-answer", detail=f"{type(exc).__name__}: {exc}")
        status = response.status_code
        detail = f"{text[-600:]} (headers {dict(response.headers)})"
        if status == 503 and response.headers.get("Retry-After") and '"error"' in text:
            code = json.loads(text)["error"]["code"]
            return Outcome(sent, "503", status, code=code, detail=detail)
        if status != 200:
            return Outcome(sent, "unexpected", status, detail=detail)
        if not stream:
            return Outcome(sent, "done", status, json.loads(text)["mora"]["pool_version"])
        events = [block.removeprefix("data: ") for block in text.split("\n\n") if block]
        if len(events) < 2 or events[-1] != "[DONE]":
            return Outcome(sent, "unexpected", status, detail=f"stream cut short: {detail}")
        last = json.loads(events[-2])
        if "error" in last:
            return Outcome(sent, "sse-error", status, code=last["error"]["code"], detail=detail)
        return Outcome(sent, "done", status, last["mora"]["pool_version"])
