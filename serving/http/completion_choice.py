"""One choice of a `/v1/completions` request: one engine request, its events turned into the
text pieces of one output choice (stop strings, logprobs, echo), and its timing metrics.
`serving.http.routes_completions.Completion` runs the choices of a request together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from serving.http.errors import BadRequest, Overloaded
from serving.http.responses import CompletionChoice, LogprobsBlock
from serving.http.text import ChoiceText, Piece, TokenLogprob, logprobs_block, prompt_logprobs

if TYPE_CHECKING:
    from mora_runtime.engine.types import TokenEvent
    from mora_runtime.experts.stats import SequenceRouting
    from serving.http.routes_completions import Completion

logger = logging.getLogger(__name__)


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
