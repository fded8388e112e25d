"""Pydantic models of the HTTP answers: OpenAI completions (whole and streamed chunks), the
model list, health, classification results, and the `mora` extension every answer carries.

Requests and their validation live in `serving.http.protocol`.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

from mora_runtime.experts.stats import SequenceRouting


class LogprobsBlock(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: LogprobsBlock | None = None
    finish_reason: FinishReason | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ExpertShare(BaseModel):
    name: str
    share: float


class MoraInfo(BaseModel):
    """Response extension `mora`: which experts served the request."""

    pool_version: int
    active_ranks_per_token: float
    expert_sets: list[ExpertShare]

    @classmethod
    def from_routing(cls, pool_version: int, routing: SequenceRouting | None) -> MoraInfo:
        routing = routing or SequenceRouting()
        shares = sorted(routing.set_shares().items(), key=lambda item: (-item[1], item[0]))
        return cls(
            pool_version=pool_version,
            active_ranks_per_token=routing.mean_active_ranks,
            expert_sets=[ExpertShare(name=name, share=share) for name, share in shares],
        )


def _now() -> int:
    return int(time.time())


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    mora: MoraInfo | None = None


class CompletionChunk(BaseModel):
    """One SSE event of a streamed completion (OpenAI reuses `text_completion` here)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    mora: MoraInfo | None = None

    def sse(self) -> str:
        exclude = {name for name in ("usage", "mora") if getattr(self, name) is None}
        return f"data: {self.model_dump_json(exclude=exclude)}\n\n"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "mora-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    """`GET /health`: 200 whenever the server answers (the LM serves once the app is up)."""

    status: Literal["ok"] = "ok"
    models: list[str] = Field(description="Every served model name, as /v1/models lists them")
    ready: dict[str, bool] = Field(
        description="Per served model name: true once the model is loaded and answers; false "
        "while it warms up (its requests get a 503 with Retry-After meanwhile)"
    )
    devices: dict[str, str] = Field(
        default_factory=dict,
        description="Per served model name: the torch device its replicas serve on, "
        '"cpu" or "cuda:0" (each replica sees the GPUs Ray gave it from 0); a model whose '
        "replica did not say in time is left out",
    )


class LabelScore(BaseModel):
    label: str
    probability: float


class ImageLabels(BaseModel):
    index: int
    labels: list[LabelScore]  # sorted by probability, highest first


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["classification"] = "classification"
    created: int = Field(default_factory=_now)
    model: str
    data: list[ImageLabels]
    mora: MoraInfo
