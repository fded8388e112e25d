"""GPUs for the model replicas: what each deployment asks Ray for, and where a replica serves.

`num_gpus: null` in the config (the default) is resolved where the application is built
(`build_app`): the GPUs that process sees are shared out among the LM and CLIP replicas
left automatic, at most one each, so that every replica can be scheduled. Ray hides the
GPUs of an actor that reserved none, so a replica asks torch for CUDA only when it reserved
some; the device it picked is logged and reported by `/health`.
"""

from __future__ import annotations

import logging
import math

from serving.config import ServerConfig

logger = logging.getLogger(__name__)


def gpus_present() -> float:
    """GPUs seen by the process that builds the app: torch's CUDA devices, or, when Ray is
    already running, the cluster's GPU resources (a KubeRay head usually has no GPU of its
    own while its workers do)."""
    import ray
    import torch

    local = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cluster = float(ray.cluster_resources().get("GPU", 0.0)) if ray.is_initialized() else 0.0
    return max(float(local), cluster)


def resolve_gpus(cfg: ServerConfig, present: float) -> ServerConfig:
    """`cfg` with every `num_gpus: null` replaced: `present` GPUs, less what explicit
    settings reserve, shared among the automatic replicas (at most 1 each, rounded down to
    a hundredth, so that their sum fits); 0 when there are none."""
    sections = {"lm": cfg.lm, "clip": cfg.clip}
    auto = [s for s in sections.values() if s.enabled and s.num_gpus is None]
    reserved = sum(
        s.num_gpus * s.replicas for s in sections.values() if s.enabled and s.num_gpus is not None
    )
    replicas = sum(s.replicas for s in auto)
    left = max(present - reserved, 0.0)
    share = min(1.0, math.floor(100 * left / replicas) / 100) if replicas else 0.0
    update = {
        name: s.model_copy(update={"num_gpus": share})
        for name, s in sections.items()
        if s.num_gpus is None
    }
    if auto:
        logger.info("%.2f GPU per LM/CLIP replica left automatic (%g GPUs seen)", share, present)
    return cfg.model_copy(update=update)


def replica_device(num_gpus: float | None) -> str:
    """The torch device a replica that reserved `num_gpus` serves on: its CUDA device when
    Ray gave it a GPU and torch can use it, else the CPU (logged when a reserved GPU cannot
    be used, e.g. a CPU-only torch build)."""
    import torch

    if not num_gpus:
        return "cpu"
    if not torch.cuda.is_available():
        logger.warning("%g GPU reserved but torch sees no CUDA device: serving on cpu", num_gpus)
        return "cpu"
    return f"cuda:{torch.cuda.current_device()}"


def ray_gpu_ids() -> list[str]:
    """The GPU ids Ray assigned to this worker, for the replica's start-up log line."""
    import ray

    try:
        return [str(i) for i in ray.get_gpu_ids()]
    except Exception:  # outside a Ray worker (tests): nothing was assigned
        return []
