"""The engine's value types: its configuration, the events a request receives, and the state
the engine keeps for one sequence (core.py).

Shape legend: V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mora_runtime.engine.params import SamplingParams
from mora_runtime.experts.slots import PoolSnapshot
from mora_runtime.experts.stats import SequenceRouting


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the caller should retry later."""


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 32  # sequences decoded together
    # Queued requests before `submit` refuses, beyond the running slots still free.
    max_waiting: int = 256
    max_prefill_tokens: int = 4096  # prompt tokens prefilled in one step
    prefix_cache_blocks: int = 128  # prompt blocks of 16 tokens kept for reuse (0: off)
    # "auto": the compact forward (mora_runtime/models/llama) where the model is of the
    # Llama family, else HF's; "ops": the compact forward with every layer run op by op (no
    # whole-layer C++ calls); "hf": always HF's forward (the reference path).
    forward: str = "auto"


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
    """One request inside the engine (not part of the public API)."""

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


def final_event(seq: _Sequence, reason: str, *, error: str | None = None) -> TokenEvent:
    """The last event of a sequence that ends without a token ("abort" or "error")."""
    version = seq.snapshot.version if seq.snapshot else 0
    return TokenEvent(seq.request_id, None, None, (), reason, version, seq.routing, error=error)
