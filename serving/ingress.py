"""The HTTP ingress deployment and the backends it uses to reach the model deployments.

The FastAPI app itself (`serving.api.create_app`) knows nothing of Ray: here its backend
Protocols are implemented over deployment handles. Tokenising happens in the ingress (the
app detokenises about twice per streamed token), so only token ids cross to the LM replica.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError

from mora_runtime.engine import TokenEvent
from mora_runtime.sampling import SamplingParams

from .api import ApiSettings, create_app
from .backend import ClassifyResult, MoraOverrides
from .config import ServerConfig
from .errors import BadRequest, Overloaded
from .hotload import HotLoadCoordinator
from .metrics import RayMetricsHook
from .registry import registry_actor

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


class RayLMBackend:
    """`LMBackend` over the LM deployment's handle."""

    def __init__(self, handle: Any, tokenizer: Any, model_name: str, max_context: int) -> None:
        self.handle = handle.options(stream=True)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_context = max_context

    async def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    async def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, *, stream: bool
    ) -> AsyncIterator[TokenEvent]:
        # Items are lists of events (LMServer.generate batches them) or one error dict.
        items = self.handle.generate.remote(request_id, prompt_ids, params, stream)
        finished = False
        try:
            async for item in items:
                if isinstance(item, dict):
                    if item.get("error") == "overloaded":
                        raise Overloaded(item["message"], retry_after=RETRY_AFTER_S)
                    raise BadRequest(item.get("message", "bad request"))
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

    async def classify(
        self, images: list, labels: list[str] | None, mora: MoraOverrides | None
    ) -> ClassifyResult:
        try:
            return await self.handle.classify.remote(images, labels, mora)
        except BackPressureError as exc:
            raise Overloaded(f"the CLIP model is at capacity ({exc})", retry_after=1) from None


def api_settings(cfg: ServerConfig) -> ApiSettings:
    limits = cfg.limits
    return ApiSettings(
        admin_token=cfg.admin_token,
        api_token=cfg.api_token,
        max_n=limits.max_n,
        max_top_k=cfg.lm.routing.max_top_k,
        max_images=limits.max_images,
        max_labels=limits.max_labels,
        max_image_pixels=limits.max_image_pixels,
        max_body_bytes=limits.max_body_bytes,
        request_timeout_s=limits.request_timeout_s,
        served_model_names=(cfg.lm.served_name,) if cfg.lm.enabled else (),
    )


@serve.deployment(name="MoraIngress", max_ongoing_requests=2048)
@serve.ingress()
class MoraIngress:
    async def __init__(self, config: dict[str, Any], lm_handle: Any, clip_handle: Any) -> None:
        cfg = ServerConfig.model_validate(config)
        self.cfg = cfg
        self.lm = self.clip = None
        handles: dict[str, Any] = {}
        if lm_handle is not None:
            from transformers import AutoTokenizer

            # The replica resolved the model (default or configured): ask it, don't guess.
            info = await lm_handle.model_info.remote()
            tokenizer = AutoTokenizer.from_pretrained(info["model_dir"], local_files_only=True)
            self.lm = RayLMBackend(lm_handle, tokenizer, cfg.lm.served_name, info["max_context"])
            handles["causal_lm"] = lm_handle
        if clip_handle is not None:
            self.clip = RayClipBackend(clip_handle, cfg.clip.served_name)
            handles["clip"] = clip_handle
        self.metrics = RayMetricsHook()
        self.admin = HotLoadCoordinator(
            cfg.expert_store, registry_actor(cfg.expert_store), handles, self.metrics
        )

    def __serve_build_asgi_app__(self):
        return create_app(
            self.lm, self.clip, self.admin, api_settings(self.cfg), metrics=self.metrics
        )
