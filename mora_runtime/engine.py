"""Continuous-batching generation engine: scheduler, step loop and sampling.

One background thread runs `step()` forever. A step either prefills newly admitted requests
(batched, left-padded) and merges them into the running batch, or decodes one token for
every running sequence. Finished and aborted sequences leave the batch at once. Every
sequence is pinned to the pool version it was admitted at; pool mutations run between steps
through `run_exclusive`, so a forward never sees a half-loaded expert set.
Prompt blocks already prefilled under the same pool version and routing are reused
(prefix_cache.py): a row's cached prefix goes into the cache columns in front of its
remaining tokens.

A step that raises never takes its whole batch down: the state it touched is rolled back,
the rows are split in halves until the failing sequences are found, and only those end,
with an "error" event; the others go on as if nothing happened (see `_prefill_isolated`
and `_decode_isolated`).

Shape legend: S = running sequences, L = cache columns, V = vocabulary, P = prompt length.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

from .context import ForwardContext
from .kv_cache import BatchKVCache
from .openmp import in_fresh_thread
from .patching import forward_context
from .pool import ExpertPool, PoolSnapshot
from .prefix_cache import BLOCK, PrefixCache
from .sampling import SamplingParams, sample_next
from .stats import SequenceRouting, StepTiming

logger = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["Engine", "EngineConfig", "EngineOverloaded", "SamplingParams", "TokenEvent"]


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the caller should retry later."""


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 32  # sequences decoded together
    max_waiting: int = 256  # queued requests before `submit` refuses
    max_prefill_tokens: int = 4096  # prompt tokens prefilled in one step
    prefix_cache_blocks: int = 128  # prompt blocks of 16 tokens kept for reuse (0: off)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token (or the end) of one request."""

    request_id: str
    token_id: int | None  # None only on a final event that carries no token
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...]
    finish_reason: str | None  # "stop", "length", "abort", "error", or None while running
    pool_version: int
    routing: SequenceRouting | None = None  # totals of the request, on the final event
    prompt_logprobs: tuple[tuple[float | None, tuple[tuple[int, float], ...]], ...] | None = None
    # time.perf_counter() of the engine's process when the token was picked (0: unknown):
    # consumers that receive events in batches still see when each one was made.
    emitted_at: float = 0.0
    error: str | None = None  # what went wrong, on an "error" final event


@dataclass
class _Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[TokenEvent], None]
    snapshot: PoolSnapshot | None = None
    generator: torch.Generator | None = None
    output: list[int] = field(default_factory=list)
    counts: Tensor | None = None  # [V] token counts, only when penalties are on
    routing: SequenceRouting = field(default_factory=SequenceRouting)
    next_token: int = 0
    position: int = 0  # position id of the next input token


class Engine:
    """Continuous batching over a (patched) Hugging Face causal LM."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eos_token_ids: tuple[int, ...],
        max_context: int,
        pad_token_id: int = 0,
        pool: ExpertPool | None = None,
        config: EngineConfig | None = None,
        on_step: Callable[[StepTiming, dict[str, tuple[float, ...]]], None] | None = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.config = config or EngineConfig()
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_context = max_context
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self.num_layers = model.config.get_text_config().num_hidden_layers
        # Ids at or past it would fail the embedding lookup: refused at admission.
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.on_step = on_step
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: list[_Sequence] = []
        self._admitted: list[_Sequence] = []  # taken from the queue, not yet running
        self._aborted: set[str] = set()
        self._cache: BatchKVCache | None = None
        self._mask: Tensor | None = None  # [S, L] long: 1 for real tokens, 0 for padding
        self._step_lock = threading.Lock()
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._ids = itertools.count()
        # (fn, future) pairs that run_exclusive hands to the engine thread
        self._exclusive: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]]
        self._exclusive = collections.deque()
        self.prefix_cache = PrefixCache(self.config.prefix_cache_blocks)

    # ------------------------------------------------------------------ public API
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def is_alive(self) -> bool:
        """Whether the step loop thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        on_event: Callable[[TokenEvent], None],
        request_id: str | None = None,
    ) -> str:
        """Queue a request; `on_event` is called from the engine thread for every token."""
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        outside = [t for t in prompt if not 0 <= t < self.vocab_size]
        if outside:
            raise ValueError(
                f"token id {outside[0]} is outside the vocabulary (ids 0 to {self.vocab_size - 1})"
            )
        if len(prompt) + params.max_tokens > self.max_context:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the context length ({self.max_context})"
            )
        request_id = request_id or f"req-{next(self._ids)}"
        seq = _Sequence(request_id, list(prompt), params, on_event)
        with self._wakeup:
            if len(self._waiting) >= self.config.max_waiting:
                raise EngineOverloaded(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(seq)
            self._wakeup.notify()
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request; its slot is freed before the next forward pass."""
        with self._wakeup:
            self._aborted.add(request_id)
            self._wakeup.notify()

    def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run `fn` between two steps (for pool mutations), on the engine thread when it runs:
        torch work on any other long-lived thread would slow every later step (openmp.py).
        A stopped engine runs `fn` at once, on a thread that ends."""
        engine_thread = self._thread
        if engine_thread is not None and threading.current_thread() is engine_thread:
            return fn()  # from the engine's own thread: already between forwards
        job: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._wakeup:
            queued = engine_thread is not None and not self._stop
            if queued:
                self._exclusive.append((fn, job))
                self._wakeup.notify()
        if not queued:
            with self._step_lock:
                return in_fresh_thread(fn)
        return job.result()

    def _run_exclusive_jobs(self) -> None:
        while True:
            with self._wakeup:
                if not self._exclusive:
                    return
                fn, job = self._exclusive.popleft()
            try:
                with self._step_lock:
                    job.set_result(fn())
            except BaseException as error:  # the caller re-raises it
                job.set_exception(error)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="mora-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._wakeup:
            self._stop = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def generate(self, prompt: list[int], params: SamplingParams) -> list[TokenEvent]:
        """Blocking convenience: submit and wait for every event (engine must be started)."""
        events: list[TokenEvent] = []
        done = threading.Event()

        def collect(event: TokenEvent) -> None:
            events.append(event)
            if event.finish_reason is not None:
                done.set()

        self.submit(prompt, params, collect)
        done.wait()
        return events

    # ------------------------------------------------------------------ step loop
    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not self._stop and not (
                    self._waiting or self._running or self._aborted or self._exclusive
                ):
                    self._wakeup.wait()
                if self._stop:
                    break
            self._run_exclusive_jobs()
            try:
                self.step()
            except Exception:  # a broken step must not kill the server: fail its requests
                logger.exception("engine step failed; aborting the requests in it")
                self._fail_all()
        self._run_exclusive_jobs()  # queued before the stop: their callers are waiting
        self._fail_all()

    @torch.inference_mode()
    def step(self) -> None:
        with self._step_lock:
            started = time.perf_counter()
            self._apply_aborts()
            admitted = self._admit()
            prefill_tokens = decode_tokens = 0
            per_token: dict[str, tuple[float, ...]] = {}
            if admitted:
                self._admitted = admitted
                try:
                    per_token = self._prefill_isolated(admitted)
                finally:
                    self._admitted = []
                prefill_tokens = sum(len(s.prompt) for s in admitted)
            elif self._running:
                decode_tokens = len(self._running)
                per_token = self._decode_isolated()
            if self.on_step is not None and (prefill_tokens or decode_tokens):
                timing = StepTiming(
                    time.perf_counter() - started,
                    prefill_tokens,
                    decode_tokens,
                    len(self._running),
                    len(self._waiting),
                )
                self.on_step(timing, per_token)

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        budget = self.config.max_prefill_tokens
        with self._wakeup:
            while self._waiting and len(self._running) + len(admitted) < self.config.max_running:
                if admitted and len(self._waiting[0].prompt) > budget:
                    break
                seq = self._waiting.popleft()
                budget -= len(seq.prompt)
                admitted.append(seq)
        ready: list[_Sequence] = []
        for seq in admitted:
            seq.snapshot = self.pool.acquire() if self.pool is not None else None
            try:
                if seq.params.seed is not None:
                    seq.generator = torch.Generator().manual_seed(seq.params.seed)
            except Exception as error:  # e.g. a seed torch refuses: this request only
                self._end_with_error(seq, error)
                continue
            ready.append(seq)
        return ready

    def _forward(
        self,
        seqs: list[_Sequence],
        ids: Tensor,
        mask: Tensor,
        positions: Tensor,
        *,
        cache: BatchKVCache,
        all_logits: bool,
        valid: Tensor | None,
    ):
        kwargs: dict[str, Any] = dict(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
        if self.pool is None:
            return self.model(**kwargs).logits, None
        ctx = ForwardContext(
            [s.snapshot for s in seqs],
            top_k=self._overrides(seqs, "top_k", self.pool.routing.top_k),
            threshold=self._overrides(seqs, "threshold", self.pool.routing.threshold),
            valid_tokens=valid,
        )
        with forward_context(self.pool, ctx):
            logits = self.model(**kwargs).logits
        return logits, ctx.collect()

    @staticmethod
    def _overrides(seqs: list[_Sequence], name: str, default: float) -> list | None:
        values = [getattr(s.params, name) for s in seqs]
        if all(v is None for v in values):
            return None
        return [default if v is None else v for v in values]

    @staticmethod
    def _prefix_context(seq: _Sequence) -> tuple:
        """What besides the tokens decides a prompt's keys and values (prefix_cache.py)."""
        version = seq.snapshot.version if seq.snapshot is not None else None
        return (version, seq.params.top_k, seq.params.threshold)

    def _prefill(self, seqs: list[_Sequence]) -> dict[str, tuple[float, ...]]:
        """Prefill the admitted prompts together: left-padded, each row's cached prefix
        blocks (if any) in the cache columns in front, only the rest computed."""
        keys = [self.prefix_cache.keys(self._prefix_context(s), s.prompt) for s in seqs]
        reused = [
            # Prompt logprobs need every prompt position's logits: nothing reused for them.
            []
            if s.params.prompt_logprobs is not None
            else self.prefix_cache.lookup(k, len(s.prompt))
            for s, k in zip(seqs, keys, strict=True)
        ]
        cached = [BLOCK * len(blocks) for blocks in reused]
        suffixes = [s.prompt[c:] for s, c in zip(seqs, cached, strict=True)]
        prefix_width, width = max(cached), max(map(len, suffixes))
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)  # [n, P]
        mask = torch.zeros(len(seqs), prefix_width + width, dtype=torch.long)  # [n, C + P]
        positions = torch.zeros(len(seqs), width, dtype=torch.long)  # [n, P]
        for row, (suffix, start) in enumerate(zip(suffixes, cached, strict=True)):
            ids[row, width - len(suffix) :] = torch.tensor(suffix)
            mask[row, prefix_width - start : prefix_width] = 1
            mask[row, prefix_width + width - len(suffix) :] = 1
            positions[row, width - len(suffix) :] = torch.arange(start, start + len(suffix))
        ids, mask, positions = (t.to(self.device) for t in (ids, mask, positions))
        if prefix_width:
            cache = BatchKVCache.from_blocks(self.num_layers, reused, BLOCK, prefix_width)
        else:
            cache = BatchKVCache(self.num_layers)
        want_prompt_logprobs = any(s.params.prompt_logprobs is not None for s in seqs)
        # Everything that may fail comes before the first change to the engine's state, so a
        # failed prefill can be retried on fewer rows (_prefill_isolated).
        logits, routing = self._forward(
            seqs,
            ids,
            mask,
            positions,
            cache=cache,
            all_logits=want_prompt_logprobs,
            valid=mask[:, prefix_width:].reshape(-1).bool(),
        )
        prompt_logprobs = (
            [self._prompt_logprobs(s, logits[row], width) for row, s in enumerate(seqs)]
            if want_prompt_logprobs
            else [None] * len(seqs)
        )
        picks = self._sample(seqs, logits[:, -1].float())
        self._store_prefixes(seqs, keys, cache, prefix_width + width)
        for seq in seqs:
            seq.position = len(seq.prompt) - 1  # the last prompt token's; _emit_step moves it
        first_row = len(self._running) if self._cache is not None else 0
        self._merge(seqs, cache, mask)  # the new rows go after the running ones
        self._emit_step(seqs, picks, routing, prompt_logprobs, first_row)
        return routing.per_token if routing is not None else {}

    def _store_prefixes(
        self, seqs: list[_Sequence], keys: list[list[bytes]], cache: BatchKVCache, end: int
    ) -> None:
        """Keep the full prompt blocks not stored yet (prefix_cache.py). A computed prompt
        token j sits in column end - len(prompt) + j; stored blocks are all in front of the
        computed ones, so every block missing here was computed by this prefill."""
        for row, (seq, row_keys) in enumerate(zip(seqs, keys, strict=True)):
            offset = end - len(seq.prompt)
            for index, key in enumerate(row_keys):
                if key in self.prefix_cache:
                    continue
                first = offset + index * BLOCK
                block = tuple(
                    t[row, :, first : first + BLOCK].clone()
                    for layer in cache.layers
                    for t in (layer.keys, layer.values)
                )
                self.prefix_cache.store(key, block)

    def _prompt_logprobs(self, seq: _Sequence, logits: Tensor, width: int):
        if seq.params.prompt_logprobs is None:
            return None
        start = width - len(seq.prompt)
        logprobs = torch.log_softmax(logits[start:].float(), dim=-1)  # [P, V]
        out: list[tuple[float | None, tuple[tuple[int, float], ...]]] = [(None, ())]
        n = seq.params.prompt_logprobs
        for i, token in enumerate(seq.prompt[1:]):
            row = logprobs[i]
            top = row.topk(n) if n else None
            alts = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else ()
            out.append((float(row[token]), alts))
        return tuple(out)

    def _merge(self, seqs: list[_Sequence], cache: BatchKVCache, mask: Tensor) -> None:
        if self._cache is None or not self._running:
            self._cache, self._mask, self._running = cache, mask, list(seqs)
            return
        merged, pad_old, pad_new = BatchKVCache.merge(self._cache, cache)
        old_mask = torch.nn.functional.pad(self._mask, (pad_old, 0))
        new_mask = torch.nn.functional.pad(mask, (pad_new, 0))
        self._cache, self._mask = merged, torch.cat([old_mask, new_mask])
        self._running = self._running + list(seqs)

    def _decode(self) -> dict[str, tuple[float, ...]]:
        """One token for every running sequence. On failure the cache and mask are as
        before the call (the forward may have written a column into some layers)."""
        seqs = self._running
        ids = torch.tensor([[s.next_token] for s in seqs], device=self.device)  # [S, 1]
        positions = torch.tensor([[s.position] for s in seqs], device=self.device)  # [S, 1]
        ones = torch.ones(len(seqs), 1, dtype=torch.long, device=self.device)
        mask = torch.cat([self._mask, ones], dim=1)  # [S, L + 1]
        length = self._cache.length
        try:
            logits, routing = self._forward(
                seqs, ids, mask, positions, cache=self._cache, all_logits=False, valid=None
            )
            picks = self._sample(seqs, logits[:, -1].float())
        except Exception:
            self._cache.truncate(length)
            raise
        self._mask = mask
        self._emit_step(seqs, picks, routing, [None] * len(seqs))
        return routing.per_token if routing is not None else {}

    def _sample(self, seqs: list[_Sequence], logits: Tensor, *, trial: bool = False) -> list:
        """`sample_next` for `seqs` that leaves their generators as they were if it fails
        (always, with `trial`), so a retried step draws the same tokens."""
        for seq in seqs:
            if seq.params.penalised and seq.counts is None:
                seq.counts = torch.zeros(logits.shape[-1], dtype=torch.float32)
        states = [
            (s.generator, s.generator.get_state())
            for s in seqs
            if s.generator is not None and s.params.temperature > 0
        ]
        try:
            picks = sample_next(
                logits,
                [s.params for s in seqs],
                [s.generator for s in seqs],
                [s.counts for s in seqs],
            )
        except Exception:
            trial = True
            raise
        finally:
            if trial:  # a failure or a trial: as if nothing was drawn
                for generator, state in states:
                    generator.set_state(state)
        return picks

    # ------------------------------------------------------------------ failure isolation
    def _prefill_isolated(self, seqs: list[_Sequence]) -> dict[str, tuple[float, ...]]:
        """Prefill `seqs`; if that fails, prefill each half on its own, down to single
        sequences: one that fails alone ends with an "error" event, the rest run."""
        try:
            return self._prefill(seqs)
        except Exception as error:
            if len(seqs) == 1:
                self._end_with_error(seqs[0], error)
                return {}
            logger.warning("prefill of %d sequences failed (%r); splitting", len(seqs), error)
        half = len(seqs) // 2
        first = self._prefill_isolated(seqs[:half])
        second = self._prefill_isolated(seqs[half:])
        return {k: first.get(k, ()) + second.get(k, ()) for k in first.keys() | second.keys()}

    def _decode_isolated(self) -> dict[str, tuple[float, ...]]:
        """Decode; if that fails, find the sequences that fail on their own (by halves, on
        copies of their cache rows), end them with an "error" event and decode the others.
        If none fails on its own the decode is retried once; failing again, it ends all."""
        try:
            return self._decode()
        except Exception as error:
            logger.warning(
                "decode of %d sequences failed (%r); isolating", len(self._running), error
            )
            failing = self._failing_rows(list(range(len(self._running))), error)
        for row, row_error in failing:
            self._end_with_error(self._running[row], row_error, retire=False)
        if failing:
            self._retire_rows([row for row, _ in failing])
        if not self._running:
            return {}
        try:
            return self._decode()
        except Exception as error:
            logger.exception("decode failed again; ending its %d sequences", len(self._running))
            for seq in self._running:
                self._end_with_error(seq, error, retire=False)
            self._retire_rows(list(range(len(self._running))))
            return {}

    def _failing_rows(
        self, rows: list[int], error: BaseException
    ) -> list[tuple[int, BaseException]]:
        """The rows among `rows` (whose decode raised `error`) that fail on their own."""
        if len(rows) == 1:
            return [(rows[0], error)]
        half = len(rows) // 2
        failing: list[tuple[int, BaseException]] = []
        for part in (rows[:half], rows[half:]):
            part_error = self._try_decode(part)
            if part_error is not None:
                failing += self._failing_rows(part, part_error)
        return failing

    def _try_decode(self, rows: list[int]) -> BaseException | None:
        """Run the decode of `rows` on copies of their cache rows, changing nothing."""
        seqs = [self._running[row] for row in rows]
        index = torch.tensor(rows, device=self.device)
        cache = self._cache.copy_rows(index)
        ones = torch.ones(len(rows), 1, dtype=torch.long, device=self.device)
        mask = torch.cat([self._mask.index_select(0, index), ones], dim=1)  # [S', L + 1]
        ids = torch.tensor([[s.next_token] for s in seqs], device=self.device)  # [S', 1]
        positions = torch.tensor([[s.position] for s in seqs], device=self.device)
        try:
            logits, _ = self._forward(
                seqs, ids, mask, positions, cache=cache, all_logits=False, valid=None
            )
            self._sample(seqs, logits[:, -1].float(), trial=True)
        except Exception as error:
            return error
        return None

    def _end_with_error(self, seq: _Sequence, error: BaseException, *, retire: bool = True) -> None:
        """End one sequence that failed on its own. Not running yet (`retire`): its pool
        snapshot is released here; a running row is retired by the caller."""
        logger.error("request %s failed in the engine; ending it", seq.request_id, exc_info=error)
        message = f"{type(error).__name__}: {error}"[:300]
        version = seq.snapshot.version if seq.snapshot else 0
        event = TokenEvent(
            seq.request_id, None, None, (), "error", version, seq.routing, error=message
        )
        if retire:
            self._admitted = [s for s in self._admitted if s is not seq]
            if seq.snapshot is not None and self.pool is not None:
                self.pool.release(seq.snapshot)
        self._deliver(seq, event)

    def _emit_step(self, seqs, picks: list, routing, prompt_logprobs, first_row: int = 0) -> None:
        """Send the events of this step's `picks` (one per sequence) and retire finished
        rows.

        `seqs` occupy batch rows `first_row ...` (a prefill's new rows follow the running
        ones)."""
        finished: list[int] = []
        now = time.perf_counter()
        for row, (seq, pick) in enumerate(zip(seqs, picks, strict=True)):
            if routing is not None:
                seq.routing = seq.routing.merge(routing.sequences[row])
            reason = self._finish_reason(seq, pick.token_id)
            is_stop = reason == "stop"
            if not is_stop:
                seq.output.append(pick.token_id)
                seq.next_token = pick.token_id
                seq.position += 1
                if seq.counts is not None:
                    seq.counts[pick.token_id] += 1
            event = TokenEvent(
                request_id=seq.request_id,
                token_id=None if is_stop else pick.token_id,
                logprob=None if is_stop else pick.logprob,
                top_logprobs=() if is_stop else pick.top_logprobs,
                finish_reason=reason,
                pool_version=seq.snapshot.version if seq.snapshot else 0,
                routing=seq.routing if reason else None,
                prompt_logprobs=prompt_logprobs[row],
                emitted_at=now,
            )
            self._deliver(seq, event)
            if reason is not None:
                finished.append(first_row + row)
        if finished:
            self._retire_rows(finished)

    def _finish_reason(self, seq: _Sequence, token: int) -> str | None:
        params = seq.params
        if token in params.stop_token_ids or (
            not params.ignore_eos and token in self.eos_token_ids
        ):
            return "stop"
        if len(seq.output) + 1 >= params.max_tokens:
            return "length"
        if len(seq.prompt) + len(seq.output) + 1 >= self.max_context:
            return "length"
        return None

    def _deliver(self, seq: _Sequence, event: TokenEvent) -> None:
        try:
            seq.on_event(event)
        except Exception:  # a consumer's bug must not stop the other sequences
            logger.exception("event callback of %s failed; aborting it", seq.request_id)
            self._aborted.add(seq.request_id)

    def _retire_rows(self, rows: list[int]) -> None:
        gone = set(rows)
        for row in rows:
            seq = self._running[row]
            if seq.snapshot is not None and self.pool is not None:
                self.pool.release(seq.snapshot)
        keep = [i for i in range(len(self._running)) if i not in gone]
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.select_rows(index)
        self._mask = self._mask.index_select(0, index)
        # Columns that are padding in every remaining row are dead weight for attention.
        used = self._mask.any(dim=0).nonzero()
        dead = int(used[0]) if used.numel() else 0
        if dead:
            self._cache.trim_left(dead)
            self._mask = self._mask[:, dead:]

    def _apply_aborts(self) -> None:
        with self._wakeup:
            aborted, self._aborted = self._aborted, set()
            if not aborted:
                return
            waiting = [s for s in self._waiting if s.request_id in aborted]
            self._waiting = collections.deque(
                s for s in self._waiting if s.request_id not in aborted
            )
        for seq in waiting:
            self._deliver(seq, self._abort_event(seq))
        rows = [i for i, s in enumerate(self._running) if s.request_id in aborted]
        for row in rows:
            self._deliver(self._running[row], self._abort_event(self._running[row]))
        if rows:
            self._retire_rows(rows)

    @staticmethod
    def _abort_event(seq: _Sequence) -> TokenEvent:
        version = seq.snapshot.version if seq.snapshot else 0
        return TokenEvent(seq.request_id, None, None, (), "abort", version, seq.routing)

    def _fail_all(self) -> None:
        running = {id(seq) for seq in self._running}
        # Admitted but not merged when the step broke: not queued nor running any more.
        stranded = [seq for seq in self._admitted if id(seq) not in running]
        for seq in stranded:
            if seq.snapshot is not None and self.pool is not None:
                self.pool.release(seq.snapshot)
        self._admitted = []
        with self._wakeup:
            seqs = list(self._waiting) + stranded + list(self._running)
            self._waiting.clear()
        for seq in seqs:
            self._deliver(seq, self._abort_event(seq))
        if self._running:
            self._retire_rows(list(range(len(self._running))))
        self._cache, self._mask = None, None
