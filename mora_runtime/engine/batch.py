"""The engine's running batch (core.py): rows of sequences kept aligned with the rows of
one KV cache and one attention mask. A prefill merges its new rows in after the running
ones, a decode adds one column to every row, and finished rows leave at once, together
with the cache columns no remaining row uses. Plain functions over the engine's state,
called from its step under the step lock.

Shape legend: S = running sequences, L = cache columns.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mora_runtime.engine.forward import (
    decode_forward,
    forward,
    logprobs_of_prompt,
    prefill_inputs,
    sample,
    store_prefixes,
)
from mora_runtime.engine.kv_cache import BatchKVCache
from mora_runtime.engine.types import TokenEvent, _Sequence

if TYPE_CHECKING:
    from mora_runtime.engine.core import Engine


def prefill(engine: Engine, seqs: list[_Sequence]) -> dict[str, tuple[float, ...]]:
    """Prefill the admitted prompts together and merge them into the running batch."""
    inputs = prefill_inputs(
        seqs,
        engine.prefix_cache,
        pad_token_id=engine.pad_token_id,
        num_layers=engine.num_layers,
        device=engine.device,
    )
    want_prompt_logprobs = any(s.params.prompt_logprobs is not None for s in seqs)
    # Everything that may fail comes before the first change to the engine's state, so a
    # failed prefill can be retried on fewer rows (isolation.py).
    logits, routing = forward(
        engine.runner,
        engine.pool,
        seqs,
        inputs.ids,
        inputs.mask,
        inputs.positions,
        cache=inputs.cache,
        all_logits=want_prompt_logprobs,
        valid=inputs.mask[:, inputs.prefix_width :].reshape(-1).bool(),
    )
    per_prompt = (
        [logprobs_of_prompt(s, logits[row], inputs.width) for row, s in enumerate(seqs)]
        if want_prompt_logprobs
        else [None] * len(seqs)
    )
    picks = sample(seqs, logits[:, -1].float())
    store_prefixes(
        engine.prefix_cache, seqs, inputs.keys, inputs.cache, inputs.prefix_width + inputs.width
    )
    for seq in seqs:
        seq.position = len(seq.prompt) - 1  # the last prompt token's; _emit_step moves it
    first_row = len(engine._running) if engine._cache is not None else 0
    _merge(engine, seqs, inputs.cache, inputs.mask)  # the new rows go after the running ones
    _emit_step(engine, seqs, picks, routing, per_prompt, first_row)
    return routing.per_token if routing is not None else {}


def _merge(engine: Engine, seqs: list[_Sequence], cache: BatchKVCache, mask: Tensor) -> None:
    if engine._cache is None or not engine._running:
        engine._cache, engine._mask, engine._running = cache, mask, list(seqs)
        return
    pad_old, pad_new = engine._cache.add_rows(cache)
    old_mask = torch.nn.functional.pad(engine._mask, (pad_old, 0))
    new_mask = torch.nn.functional.pad(mask, (pad_new, 0))
    engine._mask = torch.cat([old_mask, new_mask])
    engine._running = engine._running + list(seqs)


def decode(engine: Engine) -> dict[str, tuple[float, ...]]:
    """One token for every running sequence. On failure the cache and mask are as
    before the call (the forward may have written a column into some layers)."""
    seqs = engine._running
    length = engine._cache.length
    try:
        logits, routing, mask = decode_forward(engine, seqs, engine._mask, engine._cache)
        picks = sample(seqs, logits[:, -1].float())
    except Exception:
        engine._cache.truncate(length)
        raise
    engine._mask = mask
    _emit_step(engine, seqs, picks, routing, [None] * len(seqs))
    return routing.per_token if routing is not None else {}


def _emit_step(
    engine: Engine, seqs, picks: list, routing, prompt_logprobs, first_row: int = 0
) -> None:
    """Send the events of this step's `picks` (one per sequence) and retire finished
    rows.

    `seqs` occupy batch rows `first_row ...` (a prefill's new rows follow the running
    ones)."""
    finished: list[int] = []
    now = time.perf_counter()
    for row, (seq, pick) in enumerate(zip(seqs, picks, strict=True)):
        if routing is not None:
            seq.routing = seq.routing.merge(routing.sequences[row])
        reason = _finish_reason(engine, seq, pick.token_id)
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
        engine._deliver(seq, event)
        if reason is not None:
            finished.append(first_row + row)
    if finished:
        retire_rows(engine, finished)


def _finish_reason(engine: Engine, seq: _Sequence, token: int) -> str | None:
    params = seq.params
    if token in params.stop_token_ids or (not params.ignore_eos and token in engine.eos_token_ids):
        return "stop"
    if len(seq.output) + 1 >= params.max_tokens:
        return "length"
    if len(seq.prompt) + len(seq.output) + 1 >= engine.max_context:
        return "length"
    return None


def retire_rows(engine: Engine, rows: list[int]) -> None:
    """Take `rows` out of the batch and release their pool snapshots. The rows left
    may change places (`BatchKVCache.remove_rows` moves rows from the tail into the
    holes), and the running list and mask follow the cache's order."""
    for row in rows:
        seq = engine._running[row]
        if seq.snapshot is not None and engine.pool is not None:
            engine.pool.release(seq.snapshot)
    if len(set(rows)) == len(engine._running):
        engine._running, engine._cache, engine._mask = [], None, None
        return
    order = engine._cache.remove_rows(rows)
    engine._running = [engine._running[i] for i in order]
    engine._mask = engine._mask.index_select(0, torch.tensor(order, device=engine.device))
    # Columns that are padding in every remaining row are dead weight for attention.
    used = engine._mask.any(dim=0).nonzero()
    dead = int(used[0]) if used.numel() else 0
    if dead:
        engine._cache.trim_left(dead)
        engine._mask = engine._mask[:, dead:]
