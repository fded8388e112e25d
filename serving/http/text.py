"""From token ids to the text a client sees: incremental detokenisation, stop strings,
OpenAI logprobs.

Everything here is model-free: a `Decode` is any async `ids -> str` (the backend's
`detokenize`; tests use a fake tokenizer). `ChoiceText` combines the pieces for one choice
so streamed and non-streamed completions produce exactly the same text.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Decode = Callable[[list[int]], Awaitable[str]]
REPLACEMENT = "\ufffd"
# Prompt tokens decoded in front of the output, so that a first token like "▁Paris" keeps
# its leading space the way it does in context (vLLM uses the same window).
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a token stream into text deltas that never change once emitted.

    Each step decodes a short window of recent ids twice (up to and including the newest
    token) and emits only the new suffix. A delta ending in U+FFFD (a multi-byte character
    split across tokens) is held back until a later token completes it; `flush` emits what
    is left, replacement characters included, when the sequence ends.
    """

    def __init__(self, decode: Decode, context_ids: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids = list(context_ids[-CONTEXT_TOKENS:]) if CONTEXT_TOKENS else []
        self._prefix = 0
        self._read = len(self._ids)

    async def _delta(self) -> str:
        prefix_text = await self._decode(self._ids[self._prefix : self._read])
        new_text = await self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text) :]

    async def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return await self._delta()

    async def flush(self) -> str:
        if self._read == len(self._ids):
            return ""
        prefix_text = await self._decode(self._ids[self._prefix : self._read])
        new_text = await self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Cuts text at the first stop string, holding back anything that may start one.

    `push(text)` returns the text that is safe to emit and whether a stop string was found;
    after a stop nothing more is emitted. The stop string itself is never emitted.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self._stops:
            return text, False
        buffer = self._held + text
        hits = [i for i in (buffer.find(stop) for stop in self._stops) if i >= 0]
        if hits:
            self._held, self.stopped = "", True
            return buffer[: min(hits)], True
        hold = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop."""
        longest = max(len(stop) for stop in self._stops) - 1
        for size in range(min(longest, len(buffer)), 0, -1):
            tail = buffer[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0


@dataclass(frozen=True)
class TokenLogprob:
    """One token of a logprobs block; `offset` counts characters from the returned text's
    start (echoed prompt included)."""

    text: str
    logprob: float | None
    top: dict[str, float] | None
    offset: int


async def token_logprob(
    decode: Decode,
    token_id: int,
    logprob: float | None,
    top: Sequence[tuple[int, float]],
    offset: int,
    *,
    with_top: bool = True,
) -> TokenLogprob:
    """Resolve ids to text. OpenAI's `top_logprobs` maps token text -> logprob and includes
    the sampled token; two ids that decode to the same text keep the higher logprob."""
    text = await decode([token_id])
    if not with_top:
        return TokenLogprob(text, logprob, None, offset)
    alternatives: dict[str, float] = {}
    for alt_id, alt_logprob in top:
        key = await decode([alt_id])
        alternatives[key] = max(alt_logprob, alternatives.get(key, alt_logprob))
    if logprob is not None and text not in alternatives:
        alternatives[text] = logprob
    return TokenLogprob(text, logprob, alternatives, offset)


def logprobs_block(entries: Sequence[TokenLogprob]) -> dict[str, list[Any]]:
    """The OpenAI completions `logprobs` object for these tokens."""
    return {
        "tokens": [entry.text for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": [entry.top for entry in entries],
        "text_offset": [entry.offset for entry in entries],
    }


async def prompt_logprobs(
    decode: Decode,
    prompt_ids: Sequence[int],
    scores: Sequence[tuple[float | None, Sequence[tuple[int, float]]]] | None,
) -> list[TokenLogprob]:
    """Logprob entries of an echoed prompt; the first token has no logprob (OpenAI: null)."""
    detok = IncrementalDetokenizer(decode)
    entries: list[TokenLogprob] = []
    offset = 0
    for i, token_id in enumerate(prompt_ids):
        logprob, top = scores[i] if scores and i < len(scores) else (None, ())
        entry = await token_logprob(decode, token_id, logprob, top, offset)
        if logprob is None:
            entry = TokenLogprob(entry.text, None, None, offset)
        entries.append(entry)
        offset += len(await detok.push(token_id))
    return entries


@dataclass
class Piece:
    """Text ready for the client, with the logprobs of the tokens it completes."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


class ChoiceText:
    """One choice's generated tokens -> `Piece`s: detokenise, cut at stop strings, attach
    logprobs to the piece that releases their text.

    A token's logprob entry is released once text at or past its offset is released; at a
    stop string, tokens that lie wholly inside the stop string are dropped.
    """

    def __init__(
        self,
        decode: Decode,
        *,
        context_ids: Sequence[int] = (),
        stops: Sequence[str] = (),
        logprobs: int | None = None,
        offset: int = 0,
    ) -> None:
        self._decode = decode
        self._detok = IncrementalDetokenizer(decode, context_ids)
        self._stop = StopMatcher(stops)
        self._want_logprobs = logprobs is not None
        self._with_top = bool(logprobs)
        self._base = offset  # length of the echoed prompt, if any
        self._decoded = 0  # characters detokenised so far (before stop handling)
        self._released = 0  # characters handed to the client so far
        self._pending: list[TokenLogprob] = []

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    async def push(
        self, token_id: int, logprob: float | None = None, top: Sequence[tuple[int, float]] = ()
    ) -> Piece:
        if self._want_logprobs:
            entry = await token_logprob(
                self._decode,
                token_id,
                logprob,
                top,
                self._base + self._decoded,
                with_top=self._with_top,
            )
            self._pending.append(entry)
        delta = await self._detok.push(token_id)
        self._decoded += len(delta)
        text, stopped = self._stop.push(delta)
        return self._release(text, "stop" if stopped else None)

    async def finish(self, reason: str) -> Piece:
        """The engine ended the sequence: emit whatever was held back."""
        if self.stopped:
            return Piece(finish_reason="stop")
        delta = await self._detok.flush()
        self._decoded += len(delta)
        text, stopped = self._stop.push(delta)
        text += self._stop.flush()
        return self._release(text, "stop" if stopped else reason, final=True)

    def _release(self, text: str, finish_reason: str | None, *, final: bool = False) -> Piece:
        self._released += len(text)
        if final and finish_reason != "stop":
            ready, self._pending = self._pending, []
        else:
            end = self._base + self._released
            ready = [entry for entry in self._pending if entry.offset < end]
            # After a stop string nothing more is released: tokens inside it are dropped.
            self._pending = [] if finish_reason == "stop" else self._pending[len(ready) :]
        return Piece(text, ready, finish_reason)
