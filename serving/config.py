"""Typed server configuration: defaults that run offline, a Serve-style YAML, env overrides.

The YAML is Ray Serve's own config format (`serve run` / `serve deploy` accept it): the
MoRA settings are the `args` of the application whose `import_path` is
`serving.cluster.deployments:build_app`, and `http_options` gives host and port.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from mora_runtime.experts.defaults import CLIP_ROUTING, LM_ROUTING

ADMIN_TOKEN_ENV = "MORA_ADMIN_TOKEN"
API_TOKEN_ENV = "MORA_API_TOKEN"
STORE_ENV = "MORA_EXPERT_STORE"
APP_NAME = "mora"
INGRESS_DEPLOYMENT = "MoraIngress"  # the app's HTTP ingress (serving/cluster/ingress.py)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoutingSettings(_Strict):
    """A model's routing budget; the defaults are a causal LM's (experts/defaults.py)."""

    top_k: int = Field(LM_ROUTING.top_k, ge=1)
    tau: float = Field(LM_ROUTING.tau, gt=0)
    threshold: float = LM_ROUTING.threshold
    max_top_k: int = Field(64, ge=1)  # ceiling for per-request overrides


class LMSettings(_Strict):
    enabled: bool = True
    model_dir: str | None = None  # None: the bundled SmolLM2-135M-Instruct
    served_name: str = "smollm2-135m-instruct"
    replicas: int = Field(1, ge=1)
    targets: list[str] | None = None  # None: q/k/v/o (Llama family) or the family's preset
    # "auto": int4 for a model that is 4-bit at its source (the bundled GGUF) on a CPU, else
    # float; "float" keeps the checkpoint's weights; "int4" quantises
    # (mora_runtime/models/quantize.py).
    weights: Literal["auto", "float", "int4"] = "auto"
    pool_capacity: int = Field(256, ge=1)
    max_running: int = Field(32, ge=1)
    max_waiting: int = Field(64, ge=1)
    # prompt blocks of 16 tokens whose keys/values are kept for reuse (0: no prefix cache)
    prefix_cache_blocks: int = Field(128, ge=0)
    # "auto": the compact forward for Llama-family models (mora_runtime/models/llama), HF's
    # forward for every other model; "ops": the compact forward without its whole-layer C++
    # calls; "hf": always HF's forward.
    forward: Literal["auto", "ops", "hf"] = "auto"
    max_ongoing_requests: int = Field(96, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    num_cpus: float = Field(1.0, ge=0)
    # GPUs Ray reserves per replica, fractions allowed; 0 serves on the CPU. None: automatic,
    # the GPUs seen where the app is built shared among the automatic LM and CLIP replicas
    # (serving/cluster/devices.py).
    num_gpus: float | None = Field(None, ge=0)
    # Ray sets OMP_NUM_THREADS to a replica's num_cpus; torch then uses that many threads.
    # None: every core of the machine (one LM replica per node is the common layout).
    torch_threads: int | None = Field(None, ge=1)
    routing: RoutingSettings = RoutingSettings()


class ClipSettings(_Strict):
    enabled: bool = True
    model_dir: str | None = None  # None: the default CLIP trained at set-up
    served_name: str = "clip-default"
    replicas: int = Field(1, ge=1)
    pool_capacity: int = Field(256, ge=1)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float | None = Field(None, ge=0)  # as LMSettings.num_gpus
    torch_threads: int | None = Field(None, ge=1)  # None: as Ray sets it (num_cpus)
    routing: RoutingSettings = RoutingSettings(
        top_k=CLIP_ROUTING.top_k, tau=CLIP_ROUTING.tau, threshold=CLIP_ROUTING.threshold
    )


class LimitSettings(_Strict):
    """Every request limit of the HTTP surface, and the only place their defaults are written:
    serving/http/api.py's ApiSettings takes its defaults from here (`ApiSettings.from_config`
    fills it from a loaded config), and deploy/serve.yaml sets each one."""

    max_n: int = Field(8, ge=1)
    max_prompts: int = Field(16, ge=1)  # prompts in one completions request
    max_images: int = Field(16, ge=1)
    max_labels: int = Field(512, ge=1)
    max_label_chars: int = Field(200, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)  # decompression-bomb guard, per image
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    # /v1/completions only (text and token ids; images and uploads use max_body_bytes): 16
    # prompts of a full 8k context fit with room to spare.
    max_completion_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    # A text prompt longer than the context times this is refused before it is tokenised:
    # no tokenizer packs that many characters into one token on real text, and tokenising
    # a megabyte-scale prompt only to find it over the context costs seconds of CPU.
    max_prompt_chars_per_token: int = Field(32, ge=1)
    # Completions in flight at the ingress before new ones are refused (503) on arrival.
    # None: what the LM replicas admit, replicas x the smaller of (max_ongoing + max_queued
    # requests) and the engine's (max_running + max_waiting); set it when autoscaling.
    max_inflight_completions: int | None = Field(None, ge=1)
    # Also refuse completions past that bound in Ray Serve's HTTP proxy itself (each proxy
    # counting its own traffic), so a burst's refusals skip the hop to the ingress replica.
    refuse_at_proxy: bool = True
    # Past it: 504 (or an SSE error event once streaming).
    request_timeout_s: float = Field(300.0, gt=0)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = 8000
    metrics_port: int = 8080
    # The ingress only parses HTTP and awaits handles: a fraction of a CPU, so that
    # ingress + LM + CLIP fit a small machine with the defaults.
    ingress_num_cpus: float = Field(0.25, ge=0)
    expert_store: str = "experts"
    admin_token: str | None = None  # else $MORA_ADMIN_TOKEN
    api_token: str | None = None  # else $MORA_API_TOKEN
    lm: LMSettings = LMSettings()
    clip: ClipSettings = ClipSettings()
    limits: LimitSettings = LimitSettings()

    def inflight_bound(self) -> int | None:
        """Completions the ingress lets in at once: `limits.max_inflight_completions`, else
        what the LM replicas can run or queue, the smaller of Ray's bound (ongoing + queued
        calls) and the engine's (running + waiting)."""
        if self.limits.max_inflight_completions is not None:
            return self.limits.max_inflight_completions
        lm = self.lm
        per_replica = lm.max_running + lm.max_waiting
        if lm.max_queued_requests >= 0:  # -1: Ray's queue is unbounded
            per_replica = min(per_replica, lm.max_ongoing_requests + lm.max_queued_requests)
        return lm.replicas * per_replica

    def resolved(self) -> ServerConfig:
        """Fill secrets and the store from the environment; make the store path absolute."""
        store = os.environ.get(STORE_ENV) or self.expert_store
        return self.model_copy(
            update={
                "admin_token": self.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None,
                "api_token": self.api_token or os.environ.get(API_TOKEN_ENV) or None,
                "expert_store": str(Path(store).expanduser().resolve()),
            }
        )


def load_config(path: str | Path | None) -> ServerConfig:
    """Read a Serve-style YAML (or a bare MoRA config mapping); None gives the defaults."""
    if path is None:
        return ServerConfig().resolved()
    data = yaml.safe_load(Path(path).read_text()) or {}
    return config_from_mapping(data).resolved()


def config_from_mapping(data: dict[str, Any]) -> ServerConfig:
    if "applications" not in data:
        return ServerConfig.model_validate(data)
    apps = [a for a in data["applications"] if a.get("name", APP_NAME) == APP_NAME]
    if len(apps) != 1:
        raise ValueError(f"expected exactly one application named {APP_NAME!r}")
    args = dict(apps[0].get("args") or {})
    http = data.get("http_options") or {}
    args.setdefault("host", http.get("host", "127.0.0.1"))
    args.setdefault("port", http.get("port", 8000))
    return ServerConfig.model_validate(args)
