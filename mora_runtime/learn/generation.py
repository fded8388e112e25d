"""Batched greedy generation for evaluation, on the runtime's continuous-batching engine.

Prompts go to the engine in waves of up to `max_running`, stepped on the calling thread; each
wave is prefilled in one step and decoded as a batch (pinned to one pool version, since
nothing mutates the pool meanwhile), and the engine reports, per sequence, what its tokens
activated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from mora_runtime.engine.core import Engine
from mora_runtime.engine.params import SamplingParams
from mora_runtime.engine.types import EngineConfig, TokenEvent
from mora_runtime.experts.pool import ExpertPool
from mora_runtime.experts.stats import SequenceRouting


@dataclass(frozen=True)
class Generation:
    text: str
    routing: SequenceRouting  # empty without a pool


def _waves(ids: Sequence[list[int]], max_running: int, max_prefill_tokens: int) -> list[list[int]]:
    """Prompt indices in waves that the engine admits in one prefill step each.

    Each wave is prefilled into an empty batch and drained before the next: a prefill merged
    into a running batch retires finished rows by their index among the new sequences, not
    among all running ones (an engine issue), which aborts requests that stop at once."""
    waves: list[list[int]] = [[]]
    tokens = 0
    for index, prompt in enumerate(ids):
        wave = waves[-1]
        if wave and (len(wave) >= max_running or tokens + len(prompt) > max_prefill_tokens):
            waves.append([])
            tokens = 0
        waves[-1].append(index)
        tokens += len(prompt)
    return [wave for wave in waves if wave]


def _run_wave(
    engine: Engine,
    wave: list[int],
    ids: Sequence[list[int]],
    params: SamplingParams,
    outputs: list[list[int]],
    finals: list[TokenEvent | None],
) -> None:
    remaining = len(wave)

    def on_event(index: int, event: TokenEvent) -> None:
        nonlocal remaining
        if event.token_id is not None:
            outputs[index].append(event.token_id)
        if event.finish_reason is not None:
            finals[index] = event
            remaining -= 1

    for index in wave:
        engine.submit(ids[index], params, lambda event, i=index: on_event(i, event))
    # Stepped on this thread, the one that trains: a second thread doing torch work would
    # slow both (mora_runtime/cpu/openmp.py).
    while remaining:
        if not (engine.num_running or engine.num_waiting):
            raise RuntimeError("the engine went idle with requests unanswered")
        engine.step()


def generate_greedy(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    max_context: int,
    pool: ExpertPool | None = None,
    max_running: int = 32,
) -> list[Generation]:
    """Greedy continuations of `prompts` (special tokens dropped), in prompt order."""
    pad = tokenizer.pad_token_id
    engine = Engine(
        model,
        eos_token_ids=tuple(eos_token_ids),
        max_context=max_context,
        pad_token_id=pad if pad is not None else 0,
        pool=pool,
        config=EngineConfig(max_running=max_running, max_waiting=max(256, len(prompts))),
    )
    outputs: list[list[int]] = [[] for _ in prompts]
    finals: list[TokenEvent | None] = [None] * len(prompts)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    ids = [list(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    for wave in _waves(ids, max_running, engine.config.max_prefill_tokens):
        _run_wave(engine, wave, ids, params, outputs, finals)
    results = []
    for tokens, final in zip(outputs, finals, strict=True):
        if final is None or final.finish_reason in ("abort", "error"):
            raise RuntimeError("generation was aborted (see the engine's log)")
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        results.append(Generation(text, final.routing or SequenceRouting()))
    return results
