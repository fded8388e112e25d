"""Ray Serve deployments: the LM and CLIP model servers, the HTTP ingress, `build_app`.

`build_app(args)` is the `import_path` target of deploy/serve.yaml, so `serve run` /
`serve deploy` and `mora serve` start the same application.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from mora_runtime.engine.core import Engine
from mora_runtime.engine.params import SamplingParams
from mora_runtime.engine.types import EngineConfig, EngineOverloaded, TokenEvent
from mora_runtime.experts.slots import RoutingConfig
from serving.cluster.devices import gpus_present, resolve_gpus
from serving.cluster.metrics import server_metrics
from serving.cluster.protocol import Refusal
from serving.cluster.replica_base import ReplicaBase, set_torch_threads
from serving.cluster.replica_pool import ReplicaPool
from serving.config import ServerConfig
from serving.http.backend import ClassifyResult

logger = logging.getLogger(__name__)

# A warming CLIP replica looks for its model directory this often, and says it still waits
# in its log every WARM_REMINDER_POLLS looks (a mistyped model_dir shows up there).
WARM_POLL_S = 1.0
WARM_REMINDER_POLLS = 60


def _routing(settings) -> RoutingConfig:
    return RoutingConfig(settings.top_k, settings.tau, settings.threshold)


async def event_batches(
    queue: asyncio.Queue[TokenEvent], *, stream: bool
) -> AsyncIterator[list[TokenEvent]]:
    """A request's events from `queue` in lists, up to the final one (LMServer.generate)."""
    first = True
    while True:
        batch = [await queue.get()]
        while not first and batch[-1].finish_reason is None:
            if stream and queue.empty():
                break
            batch.append(queue.get_nowait() if stream else await queue.get())
        first = False
        yield batch
        if batch[-1].finish_reason is not None:
            return


@serve.deployment(name="LMServer")
class LMServer(ReplicaBase):
    """One causal LM, its expert pool, and the continuous-batching engine."""

    async def __init__(self, config: dict[str, Any]) -> None:
        from mora_runtime.cpu.openmp import in_fresh_thread
        from mora_runtime.experts.patching import patch_model
        from mora_runtime.models.lm import load_causal_lm

        cfg = ServerConfig.model_validate(config)
        self.model_name = cfg.lm.served_name
        set_torch_threads(cfg.lm.torch_threads or os.cpu_count() or 1)
        self._pick_device("LM", cfg.lm.num_gpus)

        def build() -> tuple[Any, Any]:
            lm = load_causal_lm(cfg.lm.model_dir, weights=cfg.lm.weights, device=self.device)
            pool = patch_model(
                lm.model,
                cfg.lm.targets,
                capacity=cfg.lm.pool_capacity,
                routing=_routing(cfg.lm.routing),
            )
            return lm, pool

        # On a thread that ends, not the executor's: only the engine thread may keep a torch
        # thread pool alive (mora_runtime/cpu/openmp.py; the engine fuses its projections on
        # such a thread itself).
        lm, pool = await asyncio.to_thread(in_fresh_thread, build)
        self.metrics = server_metrics()
        self.engine = Engine(
            lm.model,
            eos_token_ids=lm.eos_token_ids,
            max_context=lm.max_context,
            pad_token_id=lm.tokenizer.pad_token_id or 0,
            pool=pool,
            config=EngineConfig(
                max_running=cfg.lm.max_running,
                max_waiting=cfg.lm.max_waiting,
                prefix_cache_blocks=cfg.lm.prefix_cache_blocks,
                forward=cfg.lm.forward,
            ),
            on_step=self._on_step,
        )
        self.replica = ReplicaPool(
            pool, lm.model, "causal_lm", cfg.expert_store, self.engine.run_exclusive
        )
        await self._start_sync(cfg.expert_store)
        self.engine.start()
        self.info = {
            "model_dir": str(lm.model_dir),
            "max_context": lm.max_context,
            # The edge refuses ids at or past it before they reach the engine.
            "vocab_size": self.engine.vocab_size,
            "weights": lm.weights,
            "device": self.device,
        }
        logger.info("LM replica %s ready: %s", self.replica.replica_id, lm.model_dir)

    async def model_info(self) -> dict[str, Any]:
        return self.info

    def _on_step(self, timing, per_token) -> None:  # engine thread
        self.metrics.observe_routing(self.model_name, per_token)
        self.metrics.observe_step(self.model_name, timing.seconds, timing.prefill_tokens > 0)
        self.metrics.set_queue(self.model_name, timing.running, timing.waiting)

    def _refresh_gauges(self) -> None:
        super()._refresh_gauges()
        self.metrics.set_queue(self.model_name, self.engine.num_running, self.engine.num_waiting)

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, stream: bool = True
    ) -> AsyncIterator[list[TokenEvent] | Refusal]:
        """Stream the request's events in lists: the first event alone (admission errors and
        the first token surface at once), then, with `stream`, whatever the engine has made
        since the last item, else all the rest in one list at the end. Every item crosses
        Ray as its own message, which costs both processes far more than the event itself
        (docs/performance.md has what lists saved). A request refused on admission comes back
        as one `Refusal` item, so it crosses Ray without a traceback."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def on_event(event: TokenEvent) -> None:  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, event)

        try:
            self.engine.submit(prompt_ids, params, on_event, request_id)
        except EngineOverloaded as exc:
            yield Refusal("overloaded", str(exc))
            return
        except ValueError as exc:
            yield Refusal("bad_request", str(exc))
            return
        finished = False
        try:
            async for batch in event_batches(queue, stream=stream):
                event = batch[-1]
                finished = event.finish_reason is not None
                if finished and event.routing is not None:
                    self.replica.activations.update(event.routing.set_activations)
                yield batch
        finally:
            if not finished:  # client went away (CancelledError) or the stream was closed
                self.engine.abort(request_id)

    async def check_health(self) -> None:
        if not self.engine.is_alive:
            raise RuntimeError("the engine thread is not running")


def clip_dir_ready(directory: Path) -> bool:
    """Whether a CLIP directory is in place: `materialize` puts one there with a single
    rename, config.json inside (docs/operations.md asks the same of a configured one)."""
    return (directory / "config.json").is_file()


@serve.deployment(name="ClipServer")
class ClipServer(ReplicaBase):
    """CLIP zero-shot classification with the pool on both towers; requests are batched.

    A replica whose model directory is not there yet (the default CLIP still being prepared
    in the background by `mora serve`) starts at once, warming: Serve waits for `__init__`,
    and the application must serve completions meanwhile. It answers every call with a
    "warming" refusal until the directory appears, then loads it exactly as a replica that
    found it ready does.
    """

    async def __init__(self, config: dict[str, Any]) -> None:
        from mora_runtime.paths import default_clip_dir

        cfg = ServerConfig.model_validate(config)
        self.cfg = cfg
        self.model_name = cfg.clip.served_name
        configured = cfg.clip.model_dir
        self.model_dir = default_clip_dir() if configured is None else Path(configured).expanduser()
        self.load_error: str | None = None
        self._pick_device("CLIP", cfg.clip.num_gpus)
        if cfg.clip.torch_threads:
            set_torch_threads(cfg.clip.torch_threads)
        # All torch work of this replica (loading, batches, pool mutations) on one thread:
        # each thread that runs torch ops keeps an OpenMP pool of its own, and two of them
        # slow every op (mora_runtime/cpu/openmp.py). One worker also serialises batches and
        # mutations, so a mutation always lands between two batches.
        self._torch = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="clip-torch")
        self._torch_ident = self._torch.submit(threading.get_ident).result()
        self._classify_batch.set_max_batch_size(cfg.clip.max_batch_size)
        self._classify_batch.set_batch_wait_timeout_s(cfg.clip.batch_wait_timeout_s)
        if clip_dir_ready(self.model_dir):
            await self._load()  # a directory that does not load fails the replica, as ever
            return
        self.warming = Refusal.warming(f"the CLIP model {self.model_name!r}")
        logger.warning("no CLIP model in %s yet: warming up until it appears", self.model_dir)
        self._warm_task = asyncio.get_running_loop().create_task(self._load_when_ready())

    async def _load(self) -> None:
        from mora_runtime.models.clip import ClipClassifier
        from mora_runtime.models.clip_loading import load_clip

        cfg = self.cfg
        loop = asyncio.get_running_loop()
        loaded = await loop.run_in_executor(
            self._torch, lambda: load_clip(cfg.clip.model_dir, device=self.device)
        )
        self.classifier = ClipClassifier(loaded)
        pool = await loop.run_in_executor(
            self._torch,
            lambda: self.classifier.patch(
                _routing(cfg.clip.routing), capacity=cfg.clip.pool_capacity
            ),
        )
        self.base_labels = tuple(loaded.base_labels)
        self.replica = ReplicaPool(pool, loaded.model, "clip", cfg.expert_store, self._exclusive)
        await self._start_sync(cfg.expert_store)

    async def _load_when_ready(self) -> None:
        polls = 0
        while not clip_dir_ready(self.model_dir):
            polls += 1
            if polls % WARM_REMINDER_POLLS == 0:
                logger.info("still waiting for the CLIP model directory %s", self.model_dir)
            await asyncio.sleep(WARM_POLL_S)
        try:
            await self._load()
        except Exception as exc:  # check_health reports it, so Serve replaces this replica
            logger.exception("loading the CLIP model from %s failed", self.model_dir)
            self.load_error = f"{type(exc).__name__}: {exc}"
            return
        self.warming = None
        logger.info("CLIP replica %s ready: %s", self.replica.replica_id, self.model_dir)

    async def check_health(self) -> None:
        # A replica that found its directory at start and could not load it never started;
        # one that loaded it later fails its health check instead, and its replacement
        # loads at start (the directory is there now).
        if self.load_error is not None:
            raise RuntimeError(f"the CLIP model failed to load: {self.load_error}")

    def _exclusive(self, fn):
        """Run a pool mutation on the torch thread, between two batches (blocking)."""
        if threading.get_ident() == self._torch_ident:
            return fn()
        return self._torch.submit(fn).result()

    def default_labels(self) -> list[str]:
        labels = list(self.base_labels)
        for entry in self.replica.pool.sets():
            labels.extend(str(n) for n in entry.meta.get("class_names", ()))
        return list(dict.fromkeys(labels))

    async def classify(
        self, images: list, labels: list[str] | None, mora: Any
    ) -> ClassifyResult | Refusal:
        if self.warming is not None:
            return self.warming
        return await self._classify_batch((images, labels, mora))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _classify_batch(self, requests: list[tuple]) -> list[ClassifyResult]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._torch, self._run_batch, requests)

    def _run_batch(self, requests: list[tuple]) -> list[ClassifyResult]:
        pool = self.replica.pool
        snapshot = pool.acquire()  # one version for the whole batch
        try:
            return [self._one(images, labels, mora, snapshot) for images, labels, mora in requests]
        finally:
            pool.release(snapshot)

    def _one(self, images, labels, mora, snapshot) -> ClassifyResult:
        labels = list(labels) if labels else self.default_labels()
        out = self.classifier.classify(
            images,
            labels,
            snapshot=snapshot,
            top_k=getattr(mora, "top_k", None),
            threshold=getattr(mora, "threshold", None),
        )
        routing = out.routing
        self.replica.activations.update(routing.set_activations)
        probabilities = out.logits.softmax(dim=-1).tolist()  # [images, labels], label order
        return ClassifyResult(
            labels=tuple(labels),
            probabilities=tuple(tuple(row) for row in probabilities),
            pool_version=out.pool_version,
            routing=routing,
        )


def build_app(args: dict[str, Any]) -> Application:
    """The whole application (ingress + model deployments) from a config mapping."""
    from serving.cluster.ingress import MoraIngress

    cfg = ServerConfig.model_validate(args).resolved()
    if cfg.lm.num_gpus is None or cfg.clip.num_gpus is None:
        cfg = resolve_gpus(cfg, gpus_present())
    config = cfg.model_dump()  # the replicas see the resolved GPU counts
    lm = clip = None
    if cfg.lm.enabled:
        lm = LMServer.options(
            num_replicas=cfg.lm.replicas,
            max_ongoing_requests=cfg.lm.max_ongoing_requests,
            max_queued_requests=cfg.lm.max_queued_requests,
            ray_actor_options={"num_cpus": cfg.lm.num_cpus, "num_gpus": cfg.lm.num_gpus},
        ).bind(config)
    if cfg.clip.enabled:
        clip = ClipServer.options(
            num_replicas=cfg.clip.replicas,
            max_ongoing_requests=max(64, 4 * cfg.clip.max_batch_size),
            ray_actor_options={"num_cpus": cfg.clip.num_cpus, "num_gpus": cfg.clip.num_gpus},
        ).bind(config)
    ingress = MoraIngress.options(ray_actor_options={"num_cpus": cfg.ingress_num_cpus})
    return ingress.bind(config, lm, clip)
