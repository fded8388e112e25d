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

from serving.backend import LMBackend, merge_routing
from serving.errors import ApiError, BadRequest, ContextLengthExceeded, Overloaded, RequestTimeout
from serving.openapi import errors, json_body, ok
from serving.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    LogprobsBlock,
    MoraInfo,
    Usage,
    parse_request,
)
from serving.text import ChoiceText, Piece, TokenLogprob, logprobs_block, prompt_logprobs

if TYPE_CHECKING:
    from mora_runtime.engine import TokenEvent
    from mora_runtime.stats import SequenceRouting
    from serving.api import AppState

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


class Choice:
    """One engine request: its events, turned into `Piece`s for one output choice."""

    def __init__(
        self, job: Completion, index: int, prompt_ids: list[int], echo_text: str | None
    ) -> None:
        req = job.req
        self.job, self.index, self.prompt_ids, self.echo_text = job, index, prompt_ids, echo_text
        params = req.to_sampling_params(job.state.params_cls, index=index % req.n)
        self.events = job.lm.generate(
            f"{job.id}-{index}", prompt_ids, params, stream=bool(req.stream)
        )
        self.text = ChoiceText(
            job.lm.detokenize,
            context_ids=prompt_ids,
            stops=req.stop_strings,
            logprobs=req.logprobs,
            offset=len(echo_text) if echo_text is not None else 0,
        )
        self.completion_tokens = 0
        self.pool_version = 0
        self.routing: SequenceRouting | None = None
        self.first_event: TokenEvent | None = None
        self._last_token_at: float | None = None

    async def _next(self) -> TokenEvent:
        try:
            event = await anext(self.events)
        except StopAsyncIteration:
            raise RuntimeError("the backend ended a request without a final event") from None
        if event.token_id is not None:
            metrics, model = self.job.state.metrics, self.job.model
            now = time.perf_counter()
            # The engine's clock when the backend stamps events (TokenEvent.emitted_at),
            # else arrival here; a backend does one or the other for all its events.
            stamp = event.emitted_at or now
            if self._last_token_at is None:  # the first event always arrives on its own
                metrics.first_token(model, now - self.job.started)
            else:  # later ones may come in batches: the engine's own clock spaces them
                metrics.inter_token(model, max(stamp - self._last_token_at, 0.0))
            self._last_token_at = stamp
        return event

    async def start(self) -> None:
        """Wait for the first event: admission errors surface here, before any response."""
        self.first_event = await self._next()
        self._raise_if_failed(self.first_event)

    @staticmethod
    def _raise_if_failed(event: TokenEvent) -> None:
        """The engine ended this request alone because processing it failed (the others in
        its batch went on): most likely its input, so a 400 naming the prompt."""
        if event.finish_reason == "error":
            reason = getattr(event, "error", None) or "unknown error"
            raise BadRequest(
                f"The model could not process this request ({reason}).",
                param="prompt",
                code="invalid_prompt",
            )

    async def close(self) -> None:
        closer = getattr(self.events, "aclose", None)
        if closer is not None:
            try:
                await closer()
            except Exception:
                logger.debug("closing the backend iterator of %s failed", self.index, exc_info=True)

    async def pieces(self) -> AsyncIterator[Piece]:
        try:
            event = self.first_event or await self._next()
            if self.echo_text is not None:
                yield await self._echo_piece(event)
            if self.job.req.max_tokens == 0:  # echo only: the engine's one token is dropped
                self.pool_version = event.pool_version
                await self._drain(event)
                yield Piece(finish_reason="length")
                return
            while True:
                piece = await self._consume(event)
                if piece.text or piece.logprobs or piece.finish_reason:
                    yield piece
                if piece.finish_reason:
                    await self._drain(event)
                    return
                event = await self._next()
        finally:
            await self.close()

    async def _drain(self, event: TokenEvent) -> None:
        """After the engine's final event, let the iterator end by itself (closing it there
        would read as an abort); cut short by a stop string, `close` aborts it instead."""
        if event.finish_reason is None:
            return
        try:
            await anext(self.events)
        except StopAsyncIteration:
            return
        logger.warning("%s: the backend yielded past its final event", self.job.id)

    async def _echo_piece(self, event: TokenEvent) -> Piece:
        entries: list[TokenLogprob] = []
        if self.job.req.logprobs is not None:
            decode = self.job.lm.detokenize
            entries = await prompt_logprobs(decode, self.prompt_ids, event.prompt_logprobs)
        return Piece(self.echo_text or "", entries)

    async def _consume(self, event: TokenEvent) -> Piece:
        self.pool_version = event.pool_version
        if event.routing is not None:
            self.routing = event.routing
        self._raise_if_failed(event)
        if event.finish_reason == "abort":
            raise Overloaded("The engine aborted the request (shutting down or overloaded).")
        piece = Piece()
        if event.token_id is not None:
            self.completion_tokens += 1
            piece = await self.text.push(event.token_id, event.logprob, event.top_logprobs)
            if piece.finish_reason:  # a stop string: the caller closes the iterator
                return piece
        if event.finish_reason:
            tail = await self.text.finish(event.finish_reason)
            piece = Piece(
                piece.text + tail.text, piece.logprobs + tail.logprobs, tail.finish_reason
            )
        return piece

    def output(self, piece: Piece) -> CompletionChoice:
        block = None
        if self.job.req.logprobs is not None:
            block = LogprobsBlock(**logprobs_block(piece.logprobs))
        reason = piece.finish_reason
        if reason is not None and reason not in ("stop", "length"):
            reason = "stop"
        return CompletionChoice(
            index=self.index, text=piece.text, logprobs=block, finish_reason=reason
        )


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
