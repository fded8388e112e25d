"""GPUs for the replicas: `num_gpus: null` is resolved where the app is built, explicit values
are kept, and a replica serves on CUDA only when it reserved a GPU that torch can use. No GPU
is needed: torch's CUDA queries are monkeypatched."""

from __future__ import annotations

from typing import Any

import pytest
import ray
import torch

from serving.cluster import deployments, devices
from serving.config import ServerConfig


def test_num_gpus_defaults_to_automatic_and_takes_explicit_values() -> None:
    cfg = ServerConfig()
    assert cfg.lm.num_gpus is None and cfg.clip.num_gpus is None
    cfg = ServerConfig.model_validate({"lm": {"num_gpus": 0}, "clip": {"num_gpus": 0.25}})
    assert (cfg.lm.num_gpus, cfg.clip.num_gpus) == (0, 0.25)
    with pytest.raises(ValueError):
        ServerConfig.model_validate({"lm": {"num_gpus": -1}})


def actor_options(monkeypatch: pytest.MonkeyPatch, gpus: int, args: dict) -> dict[str, dict]:
    """ray_actor_options of the LM and CLIP deployments `build_app` makes with `gpus` CUDA
    devices visible to torch (and no Ray running)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    seen: dict[str, dict] = {}

    def options_of(name: str) -> Any:
        def options(**kwargs: Any) -> Any:
            seen[name] = kwargs["ray_actor_options"]

            class Bound:
                def bind(self, *args: Any) -> None:
                    seen[name + ".config"] = args[0]

            return Bound()

        return options

    monkeypatch.setattr(deployments.LMServer, "options", options_of("lm"))
    monkeypatch.setattr(deployments.ClipServer, "options", options_of("clip"))
    from serving.cluster import ingress

    monkeypatch.setattr(
        ingress.MoraIngress, "options", lambda **_: type("B", (), {"bind": lambda *a: None})()
    )
    deployments.build_app(args)
    return seen


@pytest.mark.parametrize(("gpus", "lm", "clip"), [(0, 0.0, 0.0), (1, 0.5, 0.5), (2, 1.0, 1.0)])
def test_automatic_gpus_follow_what_torch_sees(
    monkeypatch: pytest.MonkeyPatch, gpus: int, lm: float, clip: float
) -> None:
    seen = actor_options(monkeypatch, gpus, {})
    assert (seen["lm"]["num_gpus"], seen["clip"]["num_gpus"]) == (lm, clip)
    # The replicas get the resolved counts, so they know whether they hold a GPU.
    assert seen["lm.config"]["lm"]["num_gpus"] == lm


def test_explicit_gpus_are_kept_and_the_rest_is_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = actor_options(monkeypatch, 1, {"lm": {"num_gpus": 0}})
    assert (seen["lm"]["num_gpus"], seen["clip"]["num_gpus"]) == (0, 1.0)
    seen = actor_options(monkeypatch, 1, {"lm": {"num_gpus": 0.75}})
    assert (seen["lm"]["num_gpus"], seen["clip"]["num_gpus"]) == (0.75, 0.25)
    seen = actor_options(monkeypatch, 0, {"lm": {"num_gpus": 1}, "clip": {"num_gpus": 0.25}})
    assert (seen["lm"]["num_gpus"], seen["clip"]["num_gpus"]) == (1, 0.25)


def test_shares_round_down_so_that_every_replica_fits() -> None:
    cfg = devices.resolve_gpus(ServerConfig.model_validate({"lm": {"replicas": 2}}), 1.0)
    assert (cfg.lm.num_gpus, cfg.clip.num_gpus) == (0.33, 0.33)
    cfg = devices.resolve_gpus(ServerConfig.model_validate({"clip": {"enabled": False}}), 4.0)
    assert cfg.lm.num_gpus == 1.0


@pytest.mark.parametrize(
    ("num_gpus", "cuda", "expected"),
    [(0, True, "cpu"), (None, True, "cpu"), (0.5, True, "cuda:0"), (1, False, "cpu")],
)
def test_a_replica_serves_on_cuda_only_with_a_reserved_usable_gpu(
    monkeypatch: pytest.MonkeyPatch, num_gpus: float | None, cuda: bool, expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert devices.replica_device(num_gpus) == expected
