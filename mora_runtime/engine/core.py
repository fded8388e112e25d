"""Continuous-batching generation engine: scheduler and step loop.

One background thread runs `step()` forever. A step either prefills newly admitted requests
(batched, left-padded) and merges them into the running batch, or decodes one token for
every running sequence. Finished and aborted sequences leave the batch at once. Every
sequence is pinned to the pool version it was admitted at; pool mutations run between steps
through `run_exclusive`, so a forward never sees a half-loaded expert set.
Prompt blocks already prefilled under the same pool version and routing are reused
(prefix_cache.py): a row's cached prefix goes into the cache columns in front of its
remaining tokens.

A step that raises never takes its whole batch down: only the sequences that fail on their
own end, with an "error" event (isolation.py). How a step changes the running batch is in
batch.py, its forward pass (which changes no engine state) in forward.py, the value types
(`EngineConfig`, `TokenEvent`, ...) in types.py.

Shape legend: S = running sequences, L = cache columns.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from mora_runtime.cpu.openmp import in_fresh_thread
from mora_runtime.engine.batch import retire_rows
from mora_runtime.engine.forward import select_runner
from mora_runtime.engine.isolation import decode_isolated, end_with_error, prefill_isolated
from mora_runtime.engine.kv_cache import BatchKVCache
from mora_runtime.engine.params import SamplingParams
from mora_runtime.engine.prefix_cache import PrefixCache
from mora_runtime.engine.types import (
    EngineConfig,
    EngineOverloaded,
    TokenEvent,
    _Sequence,
    final_event,
)
from mora_runtime.experts.pool import ExpertPool
from mora_runtime.experts.stats import StepTiming

logger = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["Engine", "EngineConfig", "EngineOverloaded", "SamplingParams", "TokenEvent"]


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
        # Fusing the compact forward's projections runs torch ops: on a thread that ends, so
        # the caller's thread keeps no torch thread pool (mora_runtime/cpu/openmp.py).
        self.runner = in_fresh_thread(select_runner, model, self.config.forward)

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
            # Running slots not yet taken count as waiting room: a burst that arrives
            # within one step must not be refused while those slots are empty. (The engine
            # thread changes `_running` outside this lock; a stale length moves the bound
            # by the rows of one step at most.)
            room = self.config.max_waiting + max(0, self.config.max_running - len(self._running))
            if len(self._waiting) >= room:
                raise EngineOverloaded(
                    f"{len(self._waiting)} requests are already waiting "
                    f"({len(self._running)} running)"
                )
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
                    per_token = prefill_isolated(self, admitted)
                finally:
                    self._admitted = []
                prefill_tokens = sum(len(s.prompt) for s in admitted)
            elif self._running:
                decode_tokens = len(self._running)
                per_token = decode_isolated(self)
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
                end_with_error(self, seq, error)
                continue
            ready.append(seq)
        return ready

    def _deliver(self, seq: _Sequence, event: TokenEvent) -> None:
        try:
            seq.on_event(event)
        except Exception:  # a consumer's bug must not stop the other sequences
            logger.exception("event callback of %s failed; aborting it", seq.request_id)
            self._aborted.add(seq.request_id)

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
            self._deliver(seq, final_event(seq, "abort"))
        rows = [i for i, s in enumerate(self._running) if s.request_id in aborted]
        for row in rows:
            self._deliver(self._running[row], final_event(self._running[row], "abort"))
        if rows:
            retire_rows(self, rows)

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
            self._deliver(seq, final_event(seq, "abort"))
        if self._running:
            retire_rows(self, list(range(len(self._running))))
        self._cache, self._mask = None, None
