"""The HTTP ingress deployment and the backends it uses to reach the model deployments.

The FastAPI app itself (`serving.http.api.create_app`) knows nothing of Ray: here its backend
Protocols are implemented over deployment handles. Tokenising happens in the ingress (the
app detokenises about twice per streamed token), so only token ids cross to the LM replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.exceptions import (
    GetTimeoutError,
    RayError,
    RayTaskError,
    TaskCancelledError,
)
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)

from mora_runtime.engine.params import SamplingParams
from mora_runtime.engine.types import TokenEvent
from serving.cluster.hotload import HotLoadCoordinator
from serving.cluster.metrics import RayMetricsHook
from serving.cluster.protocol import Refusal
from serving.cluster.registry import registry_actor
from serving.config import ServerConfig
from serving.http.api import ApiSettings, create_app
from serving.http.backend import ClassifyResult, MoraOverrides
from serving.http.errors import BadRequest, Overloaded, ServiceUnavailable

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
# /health asks the CLIP replicas whether they have loaded; one that has not answered by
# then counts as not ready.
READY_TIMEOUT_S = 1.0
# A call whose replica died before answering anything is sent again (Serve routes it to a
# live replica); a short, growing pause lets Serve learn of the death first.
REPLICA_RETRIES = 2
REPLICA_RETRY_WAIT_S = 0.2
_SERVE_LOST = (ReplicaUnavailableError, DeploymentUnavailableError)
# Ray errors that are about the request itself, not about where it ran.
_NOT_LOST = (TaskCancelledError, GetTimeoutError)


def replica_lost(exc: BaseException) -> bool:
    """Whether `exc` says the replica, its worker, node or objects (not the request's own
    code) failed: a call that answered nothing yet is safe to send elsewhere.

    Every Ray system error counts (a lost node shows up as several kinds: actor died, worker
    crashed, node died, object or owner lost...); an application error raised in the
    replica arrives as a RayTaskError wrapping it and does not.
    """
    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        return cause is not None and cause is not exc and replica_lost(cause)
    if isinstance(exc, _NOT_LOST):
        return False
    return isinstance(exc, (RayError, *_SERVE_LOST))


def refusal_error(refusal: Refusal) -> Overloaded | BadRequest:
    """The HTTP error of a request a model replica refused on admission."""
    if refusal.kind == "overloaded":
        return Overloaded(refusal.message, retry_after=RETRY_AFTER_S)
    if refusal.kind == "warming":
        return ServiceUnavailable(
            refusal.message, retry_after=refusal.retry_after_s, code="model_warming"
        )
    return BadRequest(refusal.message)


def lost_error(what: str) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"The {what} replica serving this request went away; retry shortly.",
        retry_after=RETRY_AFTER_S,
    )


class RayLMBackend:
    """`LMBackend` over the LM deployment's handle."""

    def __init__(
        self,
        handle: Any,
        tokenizer: Any,
        model_name: str,
        max_context: int,
        vocab_size: int,
        device: str = "cpu",
    ) -> None:
        self.handle = handle.options(stream=True)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_context = max_context
        self.vocab_size = vocab_size
        self._device = device  # the replica's model_info said so at start

    async def device(self) -> str:
        return self._device

    async def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    async def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, *, stream: bool
    ) -> AsyncIterator[TokenEvent]:
        """Retries on another replica while the call has answered nothing; once an item came
        back a lost replica ends the request with a retryable 503 (an SSE error event when
        streaming), since the client may already hold part of the output."""
        for attempt in range(REPLICA_RETRIES + 1):
            started = False
            try:
                async for event in self._generate_once(request_id, prompt_ids, params, stream):
                    started = True
                    yield event
                return
            except TaskCancelledError:
                # Ray cancelled the call (the client went away and we cancelled it, or the
                # replica is shutting down): a retryable answer, if anyone still listens.
                raise lost_error("model") from None
            except Exception as exc:
                if not replica_lost(exc):
                    raise
                if started or attempt == REPLICA_RETRIES:
                    logger.warning("%s: LM replica lost (%s)", request_id, type(exc).__name__)
                    raise lost_error("model") from None
                logger.info("%s: LM replica lost before answering, retrying", request_id)
                await asyncio.sleep(REPLICA_RETRY_WAIT_S * (attempt + 1))

    async def _generate_once(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, stream: bool
    ) -> AsyncIterator[TokenEvent]:
        # Items are lists of events (LMServer.generate batches them) or one Refusal.
        items = self.handle.generate.remote(request_id, prompt_ids, params, stream)
        finished = False
        try:
            async for item in items:
                if isinstance(item, Refusal):
                    raise refusal_error(item)
                for event in item:
                    finished = event.finish_reason is not None
                    yield event
        except BackPressureError as exc:
            raise Overloaded(
                f"the model is at capacity, retry shortly ({exc})", retry_after=RETRY_AFTER_S
            ) from None
        finally:
            if not finished:
                # The replica's generator sees CancelledError and frees the slot. A request
                # that was never assigned (backpressure) makes cancel() re-raise that error,
                # which would replace the Overloaded above with Ray's plain-text 503.
                with contextlib.suppress(Exception):
                    items.cancel()


class RayClipBackend:
    """`ClipBackend` over the CLIP deployment's handle."""

    def __init__(self, handle: Any, model_name: str) -> None:
        self.handle = handle
        self.model_name = model_name
        self._loaded = False  # every replica said it was ready once: warming is over
        self._device: str | None = None

    async def device(self) -> str:
        """The device a replica picked (all of a deployment reserve the same GPUs); asked
        once, then remembered."""
        if self._device is None:
            self._device = str(await self.handle.device_name.remote())
        return self._device

    async def ready(self) -> bool:
        """Whether every running replica has loaded the model. Warming happens once, at
        start (a replica started later finds the directory and loads before it runs), so
        once all have said so the replicas are not asked again: /health stays cheap."""
        if self._loaded:
            return True
        try:
            answers = await asyncio.wait_for(
                self.handle.broadcast("is_ready").results_async(return_exceptions=True),
                READY_TIMEOUT_S,
            )
        except TimeoutError:  # a replica that does not answer in time is not ready
            return False
        self._loaded = bool(answers) and all(answer is True for answer in answers)
        return self._loaded

    async def classify(
        self, images: list, labels: list[str] | None, mora: MoraOverrides | None
    ) -> ClassifyResult:
        # Classification has no partial output: every attempt may be retried.
        for attempt in range(REPLICA_RETRIES + 1):
            try:
                result = await self.handle.classify.remote(images, labels, mora)
                if isinstance(result, Refusal):  # a replica still warming up
                    raise refusal_error(result)
                return result
            except BackPressureError as exc:
                raise Overloaded(f"the CLIP model is at capacity ({exc})", retry_after=1) from None
            except Exception as exc:
                if not replica_lost(exc):
                    raise
                logger.info("CLIP replica lost (%s), attempt %d", type(exc).__name__, attempt)
            if attempt < REPLICA_RETRIES:
                await asyncio.sleep(REPLICA_RETRY_WAIT_S * (attempt + 1))
        raise lost_error("CLIP")


@serve.deployment(name="MoraIngress", max_ongoing_requests=2048)  # INGRESS_DEPLOYMENT
@serve.ingress()
class MoraIngress:
    async def __init__(self, config: dict[str, Any], lm_handle: Any, clip_handle: Any) -> None:
        cfg = ServerConfig.model_validate(config)
        self.settings = ApiSettings.from_config(cfg)
        self.lm = self.clip = None
        handles: dict[str, Any] = {}
        if lm_handle is not None:
            from transformers import AutoTokenizer

            # The replica resolved the model (default or configured): ask it, don't guess.
            info = await lm_handle.model_info.remote()
            tokenizer = AutoTokenizer.from_pretrained(info["model_dir"], local_files_only=True)
            self.lm = RayLMBackend(
                lm_handle,
                tokenizer,
                cfg.lm.served_name,
                info["max_context"],
                info["vocab_size"],
                info.get("device", "cpu"),
            )
            handles["causal_lm"] = lm_handle
        if clip_handle is not None:
            self.clip = RayClipBackend(clip_handle, cfg.clip.served_name)
            handles["clip"] = clip_handle
        self.metrics = RayMetricsHook()
        self.admin = HotLoadCoordinator(
            cfg.expert_store, registry_actor(cfg.expert_store), handles, self.metrics
        )

    def announced_bound(self) -> int | None:
        """The bound on completions in flight the app announces to the proxies' gates
        (serving/cluster/proxy_gate.py), which ask for it when theirs may be stale."""
        return self.settings.announced_bound

    def __serve_build_asgi_app__(self):
        return create_app(self.lm, self.clip, self.admin, self.settings, metrics=self.metrics)
