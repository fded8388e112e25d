"""Hot-loading expert sets into every replica: all-or-nothing, no restart, no lost request.

Protocol (driven by the ingress, `HotLoadCoordinator`):
1. `prepare(op)` is broadcast to every replica of the target deployment: each one reads and
   fully validates the set against its own model and stages it (nothing is visible yet).
2. If every replica staged it, the registry commits the operation (new cluster version) and
   `commit(op_id, version)` is broadcast: each replica appends the staged set between two
   engine steps, a pointer-sized change. Otherwise `abort(op_id)` drops the staged copies.
3. Each replica also reconciles with the registry in the background, so a replica that
   missed a commit, or started later, converges to the committed pool.
Requests in flight keep the snapshot they were admitted with (see `mora_runtime.pool`).
"""

from __future__ import annotations

import asyncio
import collections
import io
import logging
import shutil
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mora_runtime.openmp import in_fresh_thread
from mora_runtime.pool import ExpertPool
from mora_runtime.store import (
    ExpertSet,
    ExpertSetError,
    base_fingerprint,
    load_expert_set,
    read_metadata,
    resolve_in_store,
)

from .errors import BadRequest, ExpertConflict, ExpertLoadFailed, NotFound, Overloaded
from .registry import RegistryState

logger = logging.getLogger(__name__)

UPLOAD_DIR = "uploads"
MAX_UPLOAD_FILES = 4


class ReplicaPool:
    """One replica's side: staging, commits and reconciliation for its pool."""

    def __init__(
        self,
        pool: ExpertPool,
        model: Any,
        model_kind: str,
        store_root: str,
        exclusive: Callable[[Callable[[], Any]], Any],
    ) -> None:
        self.pool = pool
        self.model = model
        self.model_kind = model_kind
        self.store_root = store_root
        self.exclusive = exclusive  # runs a mutation between two forward passes
        self.replica_id = uuid.uuid4().hex[:8]
        self._staged: dict[str, ExpertSet] = {}
        # (token, layer, expert) activations per loaded set since it was (last) loaded
        self.activations: collections.Counter[str] = collections.Counter()
        self._shapes = {
            p: (layer.in_features, layer.out_features) for p, layer in pool.layers.items()
        }
        self._lock = asyncio.Lock()

    def _fingerprint(self, meta) -> dict:
        modules = {p: self._shapes[p] for p in meta.target_modules if p in self._shapes}
        if len(modules) != len(meta.target_modules):
            unknown = sorted(set(meta.target_modules) - set(self._shapes))
            raise ExpertSetError(
                f"set {meta.name!r} adapts modules this server does not: {unknown[:5]}"
            )
        return base_fingerprint(self.model, modules)

    async def _read(self, path: str) -> ExpertSet:
        """Read and validate a set: torch work, so off the event loop and on a thread that
        ends (mora_runtime/openmp.py)."""
        return await asyncio.to_thread(
            in_fresh_thread,
            load_expert_set,
            path,
            expected_fingerprint=self._fingerprint,
            expected_kind=self.model_kind,
            store_root=self.store_root,
        )

    def _apply_load(self, expert_set: ExpertSet, version: int | None) -> None:
        meta = expert_set.meta

        def mutate() -> None:
            if meta.name not in {e.name for e in self.pool.sets()}:
                self.pool.add_set(
                    meta.name,
                    expert_set.tensors,
                    scale=meta.scale,
                    meta={"class_names": list(meta.class_names), "rank": meta.rank},
                )
                # A set loaded again under an old name starts from zero; what requests
                # admitted before its retire counted after it is dropped here too (one that
                # outlives the retire and this load adds its counts to the new load).
                self.activations.pop(meta.name, None)
            if version is not None and version > self.pool.version:
                self.pool.set_version(version)

        self.exclusive(mutate)

    def _apply_retire(self, name: str, version: int | None) -> None:
        def mutate() -> None:
            if name in {e.name for e in self.pool.sets()}:
                self.pool.retire_set(name)
            if version is not None and version > self.pool.version:
                self.pool.set_version(version)

        self.exclusive(mutate)

    # ---------------------------------------------------------------- protocol
    async def prepare(self, op: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        async with self._lock:
            loaded = {e.name for e in self.pool.sets()}
            if op["action"] == "load":
                expert_set = await self._read(op["path"])
                if expert_set.meta.name != op["name"]:
                    raise ExpertSetError("the set's name changed while it was being loaded")
                if op["name"] in loaded:
                    raise ExpertSetError(f"set {op['name']!r} is already loaded on this replica")
                # Grow the slot buffers now, outside any forward pass and before the commit.
                await asyncio.to_thread(
                    self.exclusive, lambda: self.pool.reserve(expert_set.meta.rank)
                )
                self._staged[op["op_id"]] = expert_set
            elif op["name"] not in loaded:
                raise ExpertSetError(f"set {op['name']!r} is not loaded on this replica")
        return self._report("prepared", started)

    async def commit(self, op: dict[str, Any], version: int) -> dict[str, Any]:
        started = time.perf_counter()
        async with self._lock:
            if op["action"] == "load":
                expert_set = self._staged.pop(op["op_id"], None)
                if expert_set is None:  # staged elsewhere, e.g. after a restart: read again
                    expert_set = await self._read(op["path"])
                await asyncio.to_thread(self._apply_load, expert_set, version)
            else:
                await asyncio.to_thread(self._apply_retire, op["name"], version)
        return self._report("committed", started)

    async def sync_version(self, version: int) -> dict[str, Any]:
        started = time.perf_counter()
        async with self._lock:
            if version > self.pool.version:
                await asyncio.to_thread(self.exclusive, lambda: self.pool.set_version(version))
        return self._report("synced", started)

    async def abort(self, op_id: str) -> dict[str, Any]:
        self._staged.pop(op_id, None)
        return self._report("aborted", time.perf_counter())

    async def reconcile(self, state: RegistryState) -> bool:
        """Converge to the registry; True if anything changed."""
        async with self._lock:
            wanted = state.for_kind(self.model_kind)
            have = {e.name for e in self.pool.sets()}
            changed = False
            for name in have - {e.name for e in wanted}:
                await asyncio.to_thread(self._apply_retire, name, None)
                changed = True
            for entry in wanted:
                if entry.name not in have:
                    expert_set = await self._read(entry.path)
                    await asyncio.to_thread(self._apply_load, expert_set, None)
                    changed = True
            if state.version > self.pool.version:
                await asyncio.to_thread(
                    self.exclusive, lambda: self.pool.set_version(state.version)
                )
                changed = True
            if changed:
                logger.info(
                    "replica %s reconciled to version %d", self.replica_id, self.pool.version
                )
            return changed

    def _report(self, status: str, started: float) -> dict[str, Any]:
        return {
            "replica": self.replica_id,
            "status": status,
            "pool_version": self.pool.version,
            "experts": self.pool.num_experts,
            "seconds": round(time.perf_counter() - started, 4),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "replica": self.replica_id,
            "pool_version": self.pool.version,
            "sets": [
                {"name": e.name, "rank": e.rank, "slots": [e.slot_start, e.slot_start + e.rank]}
                for e in self.pool.sets()
            ],
        }


class HotLoadCoordinator:
    """The ingress side: implements `serving.backend.ExpertAdmin` over deployment handles."""

    def __init__(self, store_root: str, registry: Any, handles: dict[str, Any], metrics=None):
        self.store_root = Path(store_root)
        self.registry = registry  # the registry actor
        self.handles = handles  # model_kind -> DeploymentHandle of its model deployment
        self.metrics = metrics
        self._inflight: dict[str, asyncio.Future] = {}

    async def _state(self) -> RegistryState:
        from ray.exceptions import RayActorError

        try:
            return await self.registry.state.remote()
        except RayActorError:  # restarting (it reloads registry.json): a retry will do
            raise Overloaded("the expert registry is restarting; retry shortly") from None

    async def list_sets(self) -> dict[str, Any]:
        state = await self._state()
        replicas: dict[str, list] = {}
        activations: dict[str, int] = {}
        for kind, handle in self.handles.items():
            described = await handle.broadcast("describe_pool").results_async(
                return_exceptions=True
            )
            replicas[kind] = [d for d in described if isinstance(d, dict)]
            for d in replicas[kind]:
                for name, count in d.get("activations", {}).items():
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

    async def load_set(self, path: str | None, upload: bytes | None, model: str | None) -> dict:
        if (path is None) == (upload is None):
            raise BadRequest("give exactly one of 'path' (inside the expert store) or an upload")
        directory = self._unpack(upload) if upload is not None else self._resolve(path)
        try:
            meta = await asyncio.to_thread(read_metadata, directory, store_root=self.store_root)
        except ExpertSetError as exc:
            raise ExpertLoadFailed(str(exc)) from None
        if meta.model_kind not in self.handles:
            raise BadRequest(f"no {meta.model_kind!r} model is served here")
        op = {
            "op_id": uuid.uuid4().hex,
            "action": "load",
            "name": meta.name,
            "path": str(directory),
            "kind": meta.model_kind,
            "rank": meta.rank,
        }
        return await self._once(f"load:{meta.name}", op)

    async def retire_set(self, name: str) -> dict[str, Any]:
        state = await self._state()
        entry = next((e for e in state.sets if e.name == name), None)
        if entry is None:
            raise NotFound(f"expert set {name!r} is not loaded")
        op = {"op_id": uuid.uuid4().hex, "action": "retire", "name": name, "kind": entry.model_kind}
        return await self._once(f"retire:{name}", op)

    async def _once(self, key: str, op: dict[str, Any]) -> dict[str, Any]:
        """Concurrent identical operations share one in-flight run and its result."""
        running = self._inflight.get(key)
        if running is not None:
            return await asyncio.shield(running)
        future = asyncio.get_running_loop().create_task(self._run(op))
        self._inflight[key] = future
        try:
            return await asyncio.shield(future)
        finally:
            if future.done():
                self._inflight.pop(key, None)

    async def _run(self, op: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        result = "failed"
        try:
            state = await self._state()
            if op["action"] == "load" and op["name"] in state.names():
                raise ExpertConflict(f"expert set {op['name']!r} is already loaded")
            handle = self.handles[op["kind"]]
            prepared = await handle.broadcast("prepare", op).results_async(return_exceptions=True)
            failures = [r for r in prepared if isinstance(r, BaseException)]
            if failures or not prepared:
                await handle.broadcast("abort", op["op_id"]).results_async(return_exceptions=True)
                reasons = sorted({_reason(f) for f in failures}) or ["no replica is running"]
                raise ExpertLoadFailed(
                    f"{op['action']} of {op['name']!r} failed on {len(failures)} of "
                    f"{len(prepared)} replicas; nothing changed: {'; '.join(reasons)}"
                )
            if op["action"] == "load":
                version = await self.registry.commit_load.remote(
                    op["name"], op["kind"], op["path"], op["rank"]
                )
            else:
                version = await self.registry.commit_retire.remote(op["name"])
            committed = await handle.broadcast("commit", op, version).results_async(
                return_exceptions=True
            )
            # The version is cluster-wide: other models' pools are unchanged but move to it
            # now rather than at their next reconcile, so every response reports it at once.
            for kind, other in self.handles.items():
                if kind != op["kind"]:
                    await other.broadcast("sync_version", version).results_async(
                        return_exceptions=True
                    )
            result = "success"
            return {
                "action": op["action"],
                "name": op["name"],
                "version": version,
                "replicas": [
                    r if isinstance(r, dict) else {"status": "will reconcile", "error": _reason(r)}
                    for r in committed
                ],
            }
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


def _reason(error: BaseException) -> str:
    # Ray wraps replica exceptions; the innermost message is what the operator needs.
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}".splitlines()[0][:300]
