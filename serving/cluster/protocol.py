"""The records that cross Ray between the ingress and the model replicas.

Hot-loading (serving/cluster/hotload.py drives it, serving/cluster/replica_pool.py answers):
the coordinator broadcasts a `HotLoadOp`; each replica answers a `ReplicaReport`, or raises,
which fails the operation everywhere. `ReplicaDescription` is what a replica says of its pool
for `GET /v1/experts`. A request a replica refuses comes back as a `Refusal` instead of an
exception, so it crosses Ray without a traceback; a replica still warming up (its model not
loaded yet) answers every call, hot-load steps included, with a "warming" `Refusal`.

All are frozen dataclasses of plain values (picklable, no torch, no Ray). The JSON the admin
routes answer is built here (`as_json`), field for field what the routes always returned.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal["load", "retire"]
ReplicaStatus = Literal["prepared", "committed", "synced", "aborted"]
RefusalKind = Literal["overloaded", "bad_request", "warming"]
# How long a client should wait before asking a warming model again (Retry-After).
WARMING_RETRY_AFTER_S = 5


def new_op_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class HotLoadOp:
    """One hot-load operation on the pools of one model kind. A load names the set's
    directory and rank; a retire names only the set."""

    op_id: str
    action: Action
    name: str
    kind: str  # the model_kind whose replicas take part
    path: str | None = None
    rank: int | None = None

    def __post_init__(self) -> None:
        if self.action not in ("load", "retire"):
            raise ValueError(f"unknown hot-load action {self.action!r}")
        loading = self.action == "load"
        if loading != (self.path is not None) or loading != (self.rank is not None):
            raise ValueError(f"a {self.action} op takes path and rank only when loading")

    @classmethod
    def load(cls, name: str, kind: str, path: str, rank: int) -> HotLoadOp:
        return cls(new_op_id(), "load", name, kind, path=path, rank=rank)

    @classmethod
    def retire(cls, name: str, kind: str) -> HotLoadOp:
        return cls(new_op_id(), "retire", name, kind)

    @property
    def key(self) -> str:
        """Operations with the same key are the same request (the coordinator runs one)."""
        return f"{self.action}:{self.name}"


@dataclass(frozen=True)
class ReplicaReport:
    """A replica's answer to one protocol step."""

    replica: str
    status: ReplicaStatus
    pool_version: int
    experts: int
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "status": self.status,
            "pool_version": self.pool_version,
            "experts": self.experts,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class Unreached:
    """A replica a commit did not reach: it converges at its next reconcile."""

    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"status": "will reconcile", "error": self.reason}


@dataclass(frozen=True)
class HotLoadResult:
    """A committed operation: the registry version it made and each replica's answer."""

    action: Action
    name: str
    version: int
    replicas: tuple[ReplicaReport | Unreached, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "name": self.name,
            "version": self.version,
            "replicas": [r.as_json() for r in self.replicas],
        }


@dataclass(frozen=True)
class LoadedSet:
    """Where one set lives in a replica's pool: slots [start, stop)."""

    name: str
    rank: int
    start: int
    stop: int


@dataclass(frozen=True)
class QuarantinedSet:
    """A registry entry this replica could not apply, and why."""

    name: str
    version_added: int
    reason: str


@dataclass(frozen=True)
class ReplicaDescription:
    """What one replica holds: its pool's version and sets, what it quarantined, where it
    runs and how often each set was activated since it was loaded."""

    replica: str
    pool_version: int
    sets: tuple[LoadedSet, ...]
    quarantined: tuple[QuarantinedSet, ...]
    node_id: str | None = None
    activations: Mapping[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "pool_version": self.pool_version,
            "sets": [
                {"name": s.name, "rank": s.rank, "slots": [s.start, s.stop]} for s in self.sets
            ],
            "quarantined": [
                {"name": q.name, "version_added": q.version_added, "reason": q.reason}
                for q in self.quarantined
            ],
            "node_id": self.node_id,
            "activations": dict(self.activations),
        }


@dataclass(frozen=True)
class Refusal:
    """A request the replica refused before running it: at capacity, one the client got
    wrong, or its model is still warming up. The ingress answers 400 for a bad request, else
    a 503 with `Retry-After`."""

    kind: RefusalKind
    message: str
    retry_after_s: int = 1  # for the retryable kinds: the Retry-After a client is told

    @classmethod
    def warming(cls, what: str) -> Refusal:
        """`what` (e.g. "the CLIP model 'x'") has not finished loading yet."""
        return cls(
            "warming",
            f"{what[:1].upper()}{what[1:]} is warming up (being prepared or loaded); "
            "retry in a few seconds.",
            retry_after_s=WARMING_RETRY_AFTER_S,
        )
