"""Failure isolation of the engine's steps (core.py): one bad request must not end the
requests batched with it.

A step that raises never takes its whole batch down: the state it touched is rolled back,
the rows are split in halves until the failing sequences are found, and only those end,
with an "error" event; the others go on as if nothing happened (see `prefill_isolated`
and `decode_isolated`). These are plain functions over the engine's own state, called from
its step under the step lock.

Shape legend: S' = rows under trial, L = cache columns.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from mora_runtime.engine.batch import decode, prefill, retire_rows
from mora_runtime.engine.forward import decode_forward, sample
from mora_runtime.engine.types import _Sequence, final_event

if TYPE_CHECKING:
    from mora_runtime.engine.core import Engine

logger = logging.getLogger("mora_runtime.engine.core")  # the engine's records, under its name


def prefill_isolated(engine: Engine, seqs: list[_Sequence]) -> dict[str, tuple[float, ...]]:
    """Prefill `seqs`; if that fails, prefill each half on its own, down to single
    sequences: one that fails alone ends with an "error" event, the rest run."""
    try:
        return prefill(engine, seqs)
    except Exception as error:
        if len(seqs) == 1:
            end_with_error(engine, seqs[0], error)
            return {}
        logger.warning("prefill of %d sequences failed (%r); splitting", len(seqs), error)
    half = len(seqs) // 2
    first = prefill_isolated(engine, seqs[:half])
    second = prefill_isolated(engine, seqs[half:])
    return {k: first.get(k, ()) + second.get(k, ()) for k in first.keys() | second.keys()}


def decode_isolated(engine: Engine) -> dict[str, tuple[float, ...]]:
    """Decode; if that fails, find the sequences that fail on their own (by halves, on
    copies of their cache rows), end them with an "error" event and decode the others.
    If none fails on its own the decode is retried once; failing again, it ends all."""
    try:
        return decode(engine)
    except Exception as error:
        logger.warning("decode of %d sequences failed (%r); isolating", len(engine._running), error)
        failing = _failing_rows(engine, list(range(len(engine._running))), error)
    for row, row_error in failing:
        end_with_error(engine, engine._running[row], row_error, retire=False)
    if failing:
        retire_rows(engine, [row for row, _ in failing])
    if not engine._running:
        return {}
    try:
        return decode(engine)
    except Exception as error:
        logger.exception("decode failed again; ending its %d sequences", len(engine._running))
        for seq in engine._running:
            end_with_error(engine, seq, error, retire=False)
        retire_rows(engine, list(range(len(engine._running))))
        return {}


def _failing_rows(
    engine: Engine, rows: list[int], error: BaseException
) -> list[tuple[int, BaseException]]:
    """The rows among `rows` (whose decode raised `error`) that fail on their own."""
    if len(rows) == 1:
        return [(rows[0], error)]
    half = len(rows) // 2
    failing: list[tuple[int, BaseException]] = []
    for part in (rows[:half], rows[half:]):
        part_error = _try_decode(engine, part)
        if part_error is not None:
            failing += _failing_rows(engine, part, part_error)
    return failing


def _try_decode(engine: Engine, rows: list[int]) -> BaseException | None:
    """Run the decode of `rows` on copies of their cache rows, changing nothing."""
    seqs = [engine._running[row] for row in rows]
    index = torch.tensor(rows, device=engine.device)
    cache = engine._cache.copy_rows(index)
    try:
        logits, _, _ = decode_forward(engine, seqs, engine._mask.index_select(0, index), cache)
        sample(seqs, logits[:, -1].float(), trial=True)
    except Exception as error:
        return error
    return None


def end_with_error(
    engine: Engine, seq: _Sequence, error: BaseException, *, retire: bool = True
) -> None:
    """End one sequence that failed on its own. Not running yet (`retire`): its pool
    snapshot is released here; a running row is retired by the caller."""
    logger.error("request %s failed in the engine; ending it", seq.request_id, exc_info=error)
    message = f"{type(error).__name__}: {error}"[:300]
    event = final_event(seq, "error", error=message)
    if retire:
        engine._admitted = [s for s in engine._admitted if s is not seq]
        if seq.snapshot is not None and engine.pool is not None:
            engine.pool.release(seq.snapshot)
    engine._deliver(seq, event)
