"""`POST /v1/completions`: OpenAI legacy completions over an `LMBackend`.

Each choice (prompt x n) is one engine request with its own backend iterator. All choices are
admitted (first event received) before the response starts, so admission failures such as
`Overloaded` become HTTP statuses; after that, streamed failures arrive as an SSE `error`
event followed by `[DONE]`. A stop string, a client disconnect or the request timeout closes
the backend iterators, which aborts the engine requests and frees their slots.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.http.backend import LMBackend, merge_routing
from serving.http.completion_choice import Choice
from serving.http.errors import ApiError, BadRequest, ContextLengthExceeded, RequestTimeout
from serving.http.openapi import errors, json_body, ok
from serving.http.protocol import (
    CompletionRequest,
    parse_request,
)
from serving.http.responses import (
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
    MoraInfo,
    Usage,
)
from serving.http.text import Piece

if TYPE_CHECKING:
    from serving.http.api import AppState

logger = logging.getLogger(__name__)
T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's convention; nobody reads it, the metrics do
DONE = "data: [DONE]\n\n"
STREAMED = "a CompletionChunk as JSON (an error body if the request fails), then [DONE]"


def router(state: AppState) -> APIRouter:
    routes = APIRouter()

    @routes.post(
        "/v1/completions",
        response_model=None,
        responses={
            **ok(CompletionResponse, events=STREAMED),
            **errors(400, 401, 404, 415, 503, 504),
        },
        openapi_extra=json_body(CompletionRequest),
    )
    async def create_completion(request: Request) -> Response:
        state.require_api(request)
        release = state.admit_completion()  # before any work: overload is refused at once
        try:
            body = await state.read_json(request)
            req = parse_request(CompletionRequest, body, state.settings.limits())
            lm = state.resolve_lm(req.model)
            job = await Completion.prepare(state, lm, req)
        except BaseException:
            release()
            raise
        job.on_close = release  # however the request ends (Completion.close)
        return await (job.stream() if req.stream else job.run(request))

    return routes


async def gather_or_cancel(aws: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently; on the first failure (or if we are cancelled) cancel the rest."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task in done and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnect(request: Request) -> None:
    """Returns once the client has gone (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Completion:
    """One `/v1/completions` request: its choices, timing and usage."""

    def __init__(self, state: AppState, lm: LMBackend, req: CompletionRequest) -> None:
        self.state, self.lm, self.req = state, lm, req
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.model = req.model
        self.created = int(time.time())
        self.started = time.perf_counter()
        self.choices: list[Choice] = []
        self.prompt_tokens = 0
        self._tasks: list[asyncio.Future[None]] = []
        self._reported = False
        self.on_close: Callable[[], None] | None = None  # e.g. the admission's release

    @classmethod
    async def prepare(cls, state: AppState, lm: LMBackend, req: CompletionRequest) -> Completion:
        job = cls(state, lm, req)
        prompts = req.prompts()
        max_chars = lm.max_context * state.settings.max_prompt_chars_per_token
        for p, prompt in enumerate(prompts):
            if isinstance(prompt, str) and len(prompt) > max_chars:
                raise BadRequest(
                    f"The prompt has {len(prompt)} characters; this model's context of "
                    f"{lm.max_context} tokens admits at most {max_chars}. Please shorten it.",
                    param="prompt" if len(prompts) == 1 else f"prompt[{p}]",
                    code="context_length_exceeded",
                )
        ids = await asyncio.gather(*(job._ids(prompt) for prompt in prompts))
        for p, prompt_ids in enumerate(ids):
            job._check(prompt_ids, p if len(prompts) > 1 else None)
        echoes: list[str | None] = [None] * len(prompts)
        if req.echo:
            echoes = list(
                await asyncio.gather(*(job._echo(p, i) for p, i in zip(prompts, ids, strict=True)))
            )
        for p, (prompt_ids, echo) in enumerate(zip(ids, echoes, strict=True)):
            for i in range(req.n):
                job.choices.append(Choice(job, p * req.n + i, prompt_ids, echo))
        job.prompt_tokens = sum(len(prompt_ids) for prompt_ids in ids)
        return job

    async def _ids(self, prompt: str | list[int]) -> list[int]:
        return await self.lm.tokenize(prompt) if isinstance(prompt, str) else list(prompt)

    async def _echo(self, prompt: str | list[int], ids: list[int]) -> str:
        return prompt if isinstance(prompt, str) else await self.lm.detokenize(ids)

    def _check(self, ids: list[int], index: int | None) -> None:
        param = "prompt" if index is None else f"prompt[{index}]"
        if not ids:
            raise BadRequest("The prompt must contain at least one token.", param=param)
        vocab = self.lm.vocab_size
        if max(ids) >= vocab:
            raise BadRequest(f"Token ids must be below the vocabulary size {vocab}.", param=param)
        max_tokens = max(self.req.max_tokens if self.req.max_tokens is not None else 16, 1)
        if len(ids) + max_tokens > self.lm.max_context:
            raise ContextLengthExceeded(len(ids), max_tokens, self.lm.max_context)

    @property
    def remaining_s(self) -> float:
        return self.state.settings.request_timeout_s - (time.perf_counter() - self.started)

    async def close(self) -> None:
        """Cancel the stream's pumps, close every backend iterator and report the tokens
        generated, however the request ended (idempotent)."""
        try:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await asyncio.gather(*(choice.close() for choice in self.choices))
        finally:
            if self.on_close is not None:
                self.on_close()
        if not self._reported:
            self._reported = True
            self._report()

    def usage(self) -> Usage:
        completion = sum(choice.completion_tokens for choice in self.choices)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )

    def mora(self) -> MoraInfo:
        version = max((choice.pool_version for choice in self.choices), default=0)
        return MoraInfo.from_routing(version, merge_routing([c.routing for c in self.choices]))

    def _report(self) -> None:
        if all(choice.first_event is None for choice in self.choices):
            return  # never admitted: nothing was processed
        metrics = self.state.metrics
        usage = self.usage()
        metrics.tokens(self.model, usage.prompt_tokens, usage.completion_tokens)
        routing = merge_routing([choice.routing for choice in self.choices])
        if routing is not None:
            metrics.routing(self.model, routing)

    async def _with_deadline(self, aw: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(aw, max(self.remaining_s, 0.0))
        except TimeoutError:
            raise RequestTimeout(
                f"The request did not finish within {self.state.settings.request_timeout_s:g} s."
            ) from None

    async def run(self, request: Request) -> Response:
        """Non-streaming: all choices concurrently; a client disconnect cancels them."""

        async def collect(choice: Choice) -> CompletionChoice:
            pieces = [piece async for piece in choice.pieces()]
            merged = Piece(
                "".join(piece.text for piece in pieces),
                [entry for piece in pieces for entry in piece.logprobs],
                pieces[-1].finish_reason if pieces else "stop",
            )
            return choice.output(merged)

        async def everything() -> list[CompletionChoice]:
            await gather_or_cancel([choice.start() for choice in self.choices])
            return await gather_or_cancel([collect(choice) for choice in self.choices])

        work = asyncio.ensure_future(self._with_deadline(everything()))
        gone = asyncio.ensure_future(until_disconnect(request))
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                logger.info("%s: client disconnected, aborting", self.id)
                return Response(status_code=CLIENT_CLOSED)
            outputs = work.result()
        finally:
            for task in (work, gone):
                task.cancel()
            await asyncio.gather(work, gone, return_exceptions=True)
            await self.close()
        response = CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=outputs,
            usage=self.usage(),
            mora=self.mora(),
        )
        return JSONResponse(response.model_dump(mode="json"))

    async def stream(self) -> Response:
        try:
            await self._with_deadline(gather_or_cancel([choice.start() for choice in self.choices]))
        except BaseException:
            await self.close()
            raise
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return EventStream(self._events(), self.close, headers=headers)

    def _chunk(self, choices: list[CompletionChoice], **extra: Any) -> str:
        chunk = CompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, **extra
        )
        return chunk.sse()

    async def _events(self) -> AsyncIterator[str]:
        queue: asyncio.Queue[tuple[Choice, Piece | BaseException | None]] = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            try:
                async for piece in choice.pieces():
                    await queue.put((choice, piece))
                await queue.put((choice, None))
            except Exception as exc:
                await queue.put((choice, exc))

        self._tasks = [asyncio.ensure_future(pump(choice)) for choice in self.choices]
        error: ApiError | None = None
        try:
            running = len(self._tasks)
            while running:
                choice, item = await self._with_deadline(queue.get())
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield self._chunk([choice.output(item)])
            if self.req.include_usage:
                yield self._chunk([], usage=self.usage(), mora=self.mora())
        except ApiError as exc:
            error = exc
        except Exception:
            logger.exception("%s: streaming failed", self.id)
            error = ApiError("The server had an error while processing your request.")
        finally:
            await self.close()
        if error is not None:
            yield f"data: {json.dumps(error.body())}\n\n"
        yield DONE


class EventStream(StreamingResponse):
    """SSE response that runs `on_close` however the stream ends (done, error, or the client
    going away while a chunk is being sent), so the engine always gets its slots back."""

    media_type = "text/event-stream"

    def __init__(
        self,
        content: AsyncIterator[str],
        on_close: Callable[[], Awaitable[None]],
        headers: dict[str, str],
    ) -> None:
        super().__init__(content, headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
