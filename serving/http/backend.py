"""What the HTTP app talks to: backend Protocols, their small result types, a metrics hook.

The FastAPI app (`serving.http.api.create_app`) only ever calls these Protocols, so Ray Serve
deployment handles and the fakes in tests plug in the same way. Nothing here imports Ray or
torch; `TokenEvent` (mora_runtime/engine/types.py) is named for type checking only.

Backends raise `serving.http.errors.ApiError` subclasses for anything the client caused (a token
id outside the vocabulary, an overloaded engine -> `Overloaded`); any other exception is a
500.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from mora_runtime.experts.stats import SequenceRouting

if TYPE_CHECKING:
    from PIL import Image

    from mora_runtime.engine.params import SamplingParams
    from mora_runtime.engine.types import TokenEvent


@dataclass(frozen=True)
class MoraOverrides:
    """Per-request routing overrides, already checked against the server's limits."""

    top_k: int | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class ClassifyResult:
    """CLIP zero-shot scores: `probabilities[i][j]` is P(labels[j] | image i), rows sum to 1."""

    labels: tuple[str, ...]
    probabilities: tuple[tuple[float, ...], ...]  # [images, labels]
    pool_version: int
    routing: SequenceRouting | None = None  # totals over all images of the request


class LMBackend(Protocol):
    """A causal LM behind the engine.

    `detokenize` is called about twice per streamed token (incremental detokenisation) and
    once per logprob entry, so implement it locally, not as a remote call. The app refuses
    prompts over `max_context` and token ids at or past `vocab_size` with a 400 before they
    reach the engine.
    """

    model_name: str
    max_context: int
    vocab_size: int

    async def tokenize(self, text: str) -> list[int]: ...

    async def detokenize(self, ids: list[int]) -> str: ...

    async def device(self) -> str:
        """The torch device the model serves on ("cpu", "cuda:0"), for /health; answered
        quickly (bounded there like `ClipBackend.ready`)."""
        ...

    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, *, stream: bool
    ) -> AsyncIterator[TokenEvent]:
        """Yield events until one has `finish_reason` set. Closing or cancelling the
        iterator aborts the request and frees its engine slot. `stream=False` (the client
        reads nothing before the end) lets the backend deliver the events after the first
        in fewer, larger messages."""
        ...


class ClipBackend(Protocol):
    """A CLIP model. It may still be warming up (its model not loaded yet) while the LM
    serves: `ready` says whether it is, and `classify` raises `ServiceUnavailable` (503, with
    Retry-After) until then."""

    model_name: str

    async def ready(self) -> bool:
        """Whether the model is loaded and classifies. Must answer quickly: /health bounds
        it and counts an answer that comes late as not ready."""
        ...

    async def device(self) -> str:
        """The torch device the model serves (or, warming, will serve) on, for /health;
        bounded there like `ready`."""
        ...

    async def classify(
        self,
        images: list[Image.Image],
        labels: list[str] | None,
        mora: MoraOverrides | None,
    ) -> ClassifyResult:
        """`labels=None`: every class name of every loaded CLIP expert set plus the
        configured base labels."""
        ...


class ExpertAdmin(Protocol):
    """Hot-load / retire expert sets on every replica. Results are returned to the client
    as JSON as they are; failures raise `ExpertLoadFailed` (422), `ExpertConflict` (409),
    `NotFound` (404) or `BadRequest` (400)."""

    async def list_sets(self) -> dict[str, Any]: ...

    async def load_set(self, path: str | None, upload: bytes | None, model: str | None) -> dict:
        """Exactly one of `path` (relative to the configured expert store, already checked to
        stay inside it lexically) and `upload` (the raw bytes of an uploaded archive) is set.
        `model=None`: pick the served model from the set's `model_kind`."""
        ...

    async def retire_set(self, name: str) -> dict[str, Any]: ...


class MetricsHook(Protocol):
    """Where the app reports what it saw; the Ray layer maps these onto serving.cluster.metrics.

    `endpoint` is one of a fixed set of route paths (or "other"), so labels stay bounded.
    """

    def request_finished(self, endpoint: str, code: int, seconds: float) -> None: ...

    def first_token(self, model: str, seconds: float) -> None: ...

    def inter_token(self, model: str, seconds: float) -> None: ...

    def tokens(self, model: str, prompt: int, completion: int) -> None: ...

    def routing(self, model: str, routing: SequenceRouting) -> None: ...

    def expert_load(self, seconds: float, result: str) -> None:
        """Called by the `ExpertAdmin` implementation (it sees shared in-flight loads),
        never by the app itself."""
        ...


class NullMetrics:
    """The default hook: records nothing."""

    def request_finished(self, endpoint: str, code: int, seconds: float) -> None:
        pass

    def first_token(self, model: str, seconds: float) -> None:
        pass

    def inter_token(self, model: str, seconds: float) -> None:
        pass

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        pass

    def routing(self, model: str, routing: SequenceRouting) -> None:
        pass

    def expert_load(self, seconds: float, result: str) -> None:
        pass


def merge_routing(items: Sequence[SequenceRouting | None]) -> SequenceRouting | None:
    """Sum the routing of several sequences; None when none reported any."""
    present = [item for item in items if item is not None]
    if not present:
        return None
    out = SequenceRouting()
    for item in present:
        out = out.merge(item)
    return out
