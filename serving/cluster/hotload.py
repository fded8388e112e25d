"""Hot-loading expert sets into every replica: all-or-nothing, no restart, no lost request.

Protocol (driven by the ingress, `HotLoadCoordinator`; the records that cross Ray, such as
`HotLoadOp` and `ReplicaReport`, are in serving/cluster/protocol.py):
1. `prepare(op)` is broadcast to every replica of the target deployment: each one reads,
   fully validates and converts the set for its own pool and stages it (nothing is visible
   yet; `serving.cluster.replica_pool`).
2. If every replica staged it, the registry commits the operation (new cluster version) and
   `commit(op, state)` is broadcast: each replica installs the staged set between two
   engine steps, published under that version. Otherwise `abort(op_id)` drops the staged
   copies and the registry is untouched.
3. Each replica also reconciles with the registry in the background, so a replica that
   missed a commit, or started later, converges to the committed pool under the registry's
   version: one version names one pool on every replica (and drops what it staged for a
   commit it missed). A replica still warming up (its model not loaded) answers every step
   with a "warming" `Refusal`: a load or retire for its model is refused with a 503, and it
   catches up with the registry once loaded.
Requests in flight keep the snapshot they were admitted with (see `mora_runtime.experts.pool`).
"""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

from mora_runtime.expert_sets.format import ExpertSetError
from mora_runtime.expert_sets.store import read_metadata, resolve_in_store
from serving.cluster.protocol import (
    HotLoadOp,
    HotLoadResult,
    Refusal,
    ReplicaDescription,
    ReplicaReport,
    Unreached,
)
from serving.cluster.registry import RegistryState
from serving.http.errors import (
    BadRequest,
    ExpertConflict,
    ExpertLoadFailed,
    NotFound,
    Overloaded,
    ServiceUnavailable,
)

logger = logging.getLogger(__name__)

UPLOAD_DIR = "uploads"
MAX_UPLOAD_FILES = 4


class HotLoadCoordinator:
    """The ingress side: implements `serving.http.backend.ExpertAdmin` over deployment handles."""

    def __init__(self, store_root: str, registry: Any, handles: dict[str, Any], metrics=None):
        self.store_root = Path(store_root)
        self.registry = registry  # the registry actor
        self.handles = handles  # model_kind -> DeploymentHandle of its model deployment
        self.metrics = metrics
        self._inflight: dict[str, asyncio.Future[HotLoadResult]] = {}

    async def _state(self) -> RegistryState:
        from ray.exceptions import RayActorError

        try:
            return await self.registry.state.remote()
        except RayActorError:  # restarting (it reloads registry.json): a retry will do
            raise Overloaded("the expert registry is restarting; retry shortly") from None

    async def list_sets(self) -> dict[str, Any]:
        state = await self._state()
        replicas: dict[str, list[dict[str, Any]]] = {}
        activations: dict[str, int] = {}
        for kind, handle in self.handles.items():
            described = await handle.broadcast("describe_pool").results_async(
                return_exceptions=True
            )
            # A replica that failed to answer is left out; the others still describe the pool.
            answers = [d for d in described if isinstance(d, ReplicaDescription)]
            replicas[kind] = [d.as_json() for d in answers]
            for d in answers:
                for name, count in d.activations.items():
                    activations[name] = activations.get(name, 0) + count
        sets = [
            {
                "name": e.name,
                "model_kind": e.model_kind,
                "rank": e.rank,
                "version_added": e.version_added,
                "path": str(Path(e.path).relative_to(self.store_root))
                if Path(e.path).is_relative_to(self.store_root)
                else e.path,
                "activations": activations.get(e.name, 0),
            }
            for e in state.sets
        ]
        return {"version": state.version, "sets": sets, "replicas": replicas}

    async def load_set(
        self, path: str | None, upload: bytes | None, model: str | None
    ) -> dict[str, Any]:
        if (path is None) == (upload is None):
            raise BadRequest("give exactly one of 'path' (inside the expert store) or an upload")
        directory = self._unpack(upload) if upload is not None else self._resolve(path)
        try:
            meta = await asyncio.to_thread(read_metadata, directory, store_root=self.store_root)
        except ExpertSetError as exc:
            raise ExpertLoadFailed(str(exc)) from None
        if meta.model_kind not in self.handles:
            raise BadRequest(f"no {meta.model_kind!r} model is served here")
        op = HotLoadOp.load(meta.name, meta.model_kind, str(directory), meta.rank)
        return (await self._once(op)).as_json()

    async def retire_set(self, name: str) -> dict[str, Any]:
        state = await self._state()
        entry = next((e for e in state.sets if e.name == name), None)
        if entry is None:
            raise NotFound(f"expert set {name!r} is not loaded")
        return (await self._once(HotLoadOp.retire(name, entry.model_kind))).as_json()

    async def _once(self, op: HotLoadOp) -> HotLoadResult:
        """Concurrent identical operations (same `op.key`) share one in-flight run and its
        result."""
        key = op.key
        running = self._inflight.get(key)
        if running is not None:
            return await asyncio.shield(running)
        future = asyncio.get_running_loop().create_task(self._run(op))
        self._inflight[key] = future
        # The operation runs to its end even if every caller went away (shield); whenever it
        # ends, the next identical request starts a new one instead of reusing this result.
        future.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(future)

    async def _run(self, op: HotLoadOp) -> HotLoadResult:
        started = time.perf_counter()
        result = "failed"
        try:
            state = await self._state()
            if op.action == "load" and op.name in state.names():
                raise ExpertConflict(f"expert set {op.name!r} is already loaded")
            handle = self.handles[op.kind]
            prepared = await handle.broadcast("prepare", op).results_async(return_exceptions=True)
            # Anything but a report (an exception, or a replica answering out of protocol)
            # counts as a failed prepare: nothing is committed anywhere.
            failures = [r for r in prepared if not isinstance(r, ReplicaReport)]
            if failures or not prepared:
                await handle.broadcast("abort", op.op_id).results_async(return_exceptions=True)
                _raise_if_warming(failures)
                reasons = sorted({_reason(f) for f in failures}) or ["no replica is running"]
                raise ExpertLoadFailed(
                    f"{op.action} of {op.name!r} failed on {len(failures)} of "
                    f"{len(prepared)} replicas; nothing changed: {'; '.join(reasons)}"
                )
            if op.action == "load":
                version = await self.registry.commit_load.remote(op.name, op.kind, op.path, op.rank)
            else:
                version = await self.registry.commit_retire.remote(op.name)
            # Replicas converge to the registry as it is after the commit (this operation
            # and any they missed) under its version. Other models' pools are unchanged but
            # adopt that version now rather than at their next reconcile.
            state = await self._state()
            committed = await handle.broadcast("commit", op, state).results_async(
                return_exceptions=True
            )
            for kind, other in self.handles.items():
                if kind != op.kind:
                    await other.broadcast("sync", state).results_async(return_exceptions=True)
            result = "success"
            return HotLoadResult(
                op.action,
                op.name,
                version,
                tuple(
                    r if isinstance(r, ReplicaReport) else Unreached(_reason(r)) for r in committed
                ),
            )
        finally:
            if self.metrics is not None:
                self.metrics.expert_load(time.perf_counter() - started, result)

    def _resolve(self, path: str) -> Path:
        try:
            return resolve_in_store(self.store_root, path)
        except ExpertSetError as exc:
            raise BadRequest(str(exc), param="path") from None

    def _unpack(self, upload: bytes) -> Path:
        """An uploaded zip holding expert_set.json + expert_set.safetensors -> store dir."""
        try:
            archive = zipfile.ZipFile(io.BytesIO(upload))
        except zipfile.BadZipFile:
            raise BadRequest("the upload must be a zip of an expert-set directory") from None
        members = [m for m in archive.infolist() if not m.is_dir()]
        if not members or len(members) > MAX_UPLOAD_FILES:
            raise BadRequest(f"the upload must hold 1 to {MAX_UPLOAD_FILES} files")
        target = self.store_root / UPLOAD_DIR / uuid.uuid4().hex
        target.mkdir(parents=True)
        try:
            for member in members:
                name = Path(member.filename).name  # flatten: no directories, no escapes
                if not name or name.startswith(".") or member.file_size > 2**31:
                    raise BadRequest(f"unexpected file {member.filename!r} in the upload")
                with archive.open(member) as src, open(target / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        return target


def _raise_if_warming(failures: list[object]) -> None:
    """A replica whose model is still loading cannot validate a set: retry once it is up."""
    for failure in failures:
        if isinstance(failure, Refusal) and failure.kind == "warming":
            raise ServiceUnavailable(
                failure.message, retry_after=failure.retry_after_s, code="model_warming"
            )


def _reason(error: object) -> str:
    if isinstance(error, Refusal):  # e.g. a warming replica a commit did not reach
        return error.message
    # Ray wraps replica exceptions; the innermost message is what the operator needs.
    if not isinstance(error, BaseException):
        return f"unexpected answer {type(error).__name__}"
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}".splitlines()[0][:300]
