"""The expert-set registry: the cluster-wide truth of what every replica must serve.

A named, detached Ray actor holds it and persists it as `registry.json` in the expert store,
so a replica that starts later (autoscaling, a crash) and a full restart serve the same
pool. The registry only records committed operations; staging on replicas and the commit
protocol live in `serving.cluster.hotload`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REGISTRY_FILE = "registry.json"
ACTOR_NAME = "mora-registry"
NAMESPACE = "mora"


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    model_kind: str  # "causal_lm" | "clip"
    path: str  # absolute path of the set's directory inside the store
    version_added: int
    rank: int = 0
    loaded_at: float = 0.0


@dataclass(frozen=True)
class RegistryState:
    version: int = 0
    sets: tuple[RegistryEntry, ...] = field(default_factory=tuple)

    def for_kind(self, model_kind: str) -> tuple[RegistryEntry, ...]:
        return tuple(e for e in self.sets if e.model_kind == model_kind)

    def names(self) -> set[str]:
        return {e.name for e in self.sets}

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "sets": [asdict(e) for e in self.sets]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RegistryState:
        return cls(int(data["version"]), tuple(RegistryEntry(**e) for e in data["sets"]))


class Registry:
    """Plain class (the actor wraps it): ordered, versioned, persisted set list."""

    def __init__(self, store_root: str) -> None:
        self.root = Path(store_root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.file = self.root / REGISTRY_FILE
        self._state = RegistryState()
        if self.file.exists():
            try:
                self._state = RegistryState.from_json(json.loads(self.file.read_text()))
            except (ValueError, KeyError, TypeError) as exc:
                raise RuntimeError(f"{self.file} is corrupt ({exc}); fix or remove it") from exc
            logger.info("registry: %d sets at version %d", len(self._state.sets), self.version)

    @property
    def version(self) -> int:
        return self._state.version

    def state(self) -> RegistryState:
        return self._state

    def commit_load(self, name: str, model_kind: str, path: str, rank: int) -> int:
        if name in self._state.names():
            raise ValueError(f"expert set {name!r} is already registered")
        version = self._state.version + 1
        entry = RegistryEntry(name, model_kind, path, version, rank, time.time())
        self._save(RegistryState(version, (*self._state.sets, entry)))
        return version

    def commit_retire(self, name: str) -> int:
        if name not in self._state.names():
            raise KeyError(name)
        version = self._state.version + 1
        self._save(RegistryState(version, tuple(e for e in self._state.sets if e.name != name)))
        return version

    def _save(self, state: RegistryState) -> None:
        # Write-then-rename: a crash leaves the old registry or the new one, never half.
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".registry-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(state.to_json(), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.file)
        self._state = state


def registry_actor(store_root: str):
    """Get or create the detached registry actor of this Ray cluster."""
    import ray

    actor_cls = ray.remote(num_cpus=0)(Registry)
    return actor_cls.options(
        name=ACTOR_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
    ).remote(store_root)
