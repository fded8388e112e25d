"""One forward pass of the engine over a batch of sequences, kept apart from the engine's
own state (core.py): the model inputs of a prefill (left-padded, with the prompt blocks
reused from prefix_cache.py in front) or of a decode, the routing context of a patched
model, prompt logprobs, and sampling that can be undone.

Nothing here changes the engine's running batch: a caller that gets an exception can retry with
fewer rows (isolation.py).

Shape legend: n = sequences in the pass, C = cached prefix columns, P = prompt length
(without its cached prefix), L = cache columns, V = vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mora_runtime.engine.kv_cache import BatchKVCache
from mora_runtime.engine.prefix_cache import BLOCK, PrefixCache
from mora_runtime.engine.sampling import sample_next
from mora_runtime.engine.types import _Sequence
from mora_runtime.experts.context import ForwardContext, forward_context
from mora_runtime.experts.pool import ExpertPool
from mora_runtime.experts.stats import StepRouting
from mora_runtime.models.llama.model import compact_forward

if TYPE_CHECKING:
    from mora_runtime.engine.core import Engine

logger = logging.getLogger(__name__)


Runner = Callable[..., Tensor]  # (ids, mask, positions, cache, logits_to_keep) -> logits


def select_runner(model: torch.nn.Module, choice: str = "auto") -> Runner:
    """What runs the engine's forwards of `model`: the compact forward where `choice` is
    "auto" (or "ops": without whole-layer calls) and the model is of the Llama family, else
    HF's own forward."""
    if choice not in ("auto", "ops", "hf"):
        raise ValueError(f"forward must be 'auto', 'ops' or 'hf', got {choice!r}")
    if choice != "hf":
        compact = compact_forward(model, whole_layers=choice == "auto")
        if compact is not None:
            logger.info("engine forward: compact (%s)", type(model).__name__)
            return compact
    logger.info("engine forward: Hugging Face (%s)", type(model).__name__)
    return partial(_hf_forward, model)


def _hf_forward(
    model: torch.nn.Module,
    ids: Tensor,
    mask: Tensor,
    positions: Tensor,
    cache: BatchKVCache,
    logits_to_keep: int,
) -> Tensor:
    return model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=logits_to_keep,
    ).logits


def forward(
    runner: Runner,
    pool: ExpertPool | None,
    seqs: list[_Sequence],
    ids: Tensor,
    mask: Tensor,
    positions: Tensor,
    *,
    cache: BatchKVCache,
    all_logits: bool,
    valid: Tensor | None,
) -> tuple[Tensor, StepRouting | None]:
    """The logits of `seqs` (all positions with `all_logits`, else the last) and, on a
    patched model, the routing statistics of the pass."""
    keep = 0 if all_logits else 1
    if pool is None:
        return runner(ids, mask, positions, cache, keep), None
    ctx = ForwardContext(
        [s.snapshot for s in seqs],
        top_k=_overrides(seqs, "top_k", pool.routing.top_k),
        threshold=_overrides(seqs, "threshold", pool.routing.threshold),
        valid_tokens=valid,
    )
    with forward_context(pool, ctx):
        logits = runner(ids, mask, positions, cache, keep)
    return logits, ctx.collect()


def _overrides(seqs: list[_Sequence], name: str, default: float) -> list | None:
    values = [getattr(s.params, name) for s in seqs]
    if all(v is None for v in values):
        return None
    return [default if v is None else v for v in values]


def _prefix_context(seq: _Sequence) -> tuple:
    """What besides the tokens decides a prompt's keys and values (prefix_cache.py)."""
    version = seq.snapshot.version if seq.snapshot is not None else None
    return (version, seq.params.top_k, seq.params.threshold)


@dataclass(frozen=True)
class PrefillInputs:
    keys: list[list[bytes]]  # each prompt's block keys (prefix_cache.py)
    ids: Tensor  # [n, P] left-padded
    mask: Tensor  # [n, C + P] long: 1 for real tokens, 0 for padding
    positions: Tensor  # [n, P]
    cache: BatchKVCache  # the reused prompt blocks in its first C columns
    prefix_width: int  # C
    width: int  # P


def prefill_inputs(
    seqs: list[_Sequence],
    prefix_cache: PrefixCache,
    *,
    pad_token_id: int,
    num_layers: int,
    device: torch.device,
) -> PrefillInputs:
    """The inputs that prefill `seqs` together: left-padded, each row's cached prefix
    blocks (if any) in the cache columns in front, only the rest to compute."""
    keys = [prefix_cache.keys(_prefix_context(s), s.prompt) for s in seqs]
    reused = [
        # Prompt logprobs need every prompt position's logits: nothing reused for them.
        [] if s.params.prompt_logprobs is not None else prefix_cache.lookup(k, len(s.prompt))
        for s, k in zip(seqs, keys, strict=True)
    ]
    cached = [BLOCK * len(blocks) for blocks in reused]
    suffixes = [s.prompt[c:] for s, c in zip(seqs, cached, strict=True)]
    prefix_width, width = max(cached), max(map(len, suffixes))
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)  # [n, P]
    mask = torch.zeros(len(seqs), prefix_width + width, dtype=torch.long)  # [n, C + P]
    positions = torch.zeros(len(seqs), width, dtype=torch.long)  # [n, P]
    for row, (suffix, start) in enumerate(zip(suffixes, cached, strict=True)):
        ids[row, width - len(suffix) :] = torch.tensor(suffix)
        mask[row, prefix_width - start : prefix_width] = 1
        mask[row, prefix_width + width - len(suffix) :] = 1
        positions[row, width - len(suffix) :] = torch.arange(start, start + len(suffix))
    ids, mask, positions = (t.to(device) for t in (ids, mask, positions))
    if prefix_width:
        cache = BatchKVCache.from_blocks(num_layers, reused, BLOCK, prefix_width)
    else:
        cache = BatchKVCache(num_layers)
    return PrefillInputs(keys, ids, mask, positions, cache, prefix_width, width)


def store_prefixes(
    prefix_cache: PrefixCache,
    seqs: list[_Sequence],
    keys: list[list[bytes]],
    cache: BatchKVCache,
    end: int,
) -> None:
    """Keep the full prompt blocks not stored yet (prefix_cache.py). A computed prompt
    token j sits in column end - len(prompt) + j; stored blocks are all in front of the
    computed ones, so every block missing here was computed by this prefill."""
    for row, (seq, row_keys) in enumerate(zip(seqs, keys, strict=True)):
        offset = end - len(seq.prompt)
        for index, key in enumerate(row_keys):
            if key in prefix_cache:
                continue
            first = offset + index * BLOCK
            block = tuple(
                t[row, :, first : first + BLOCK].clone()
                for layer in cache.layers
                for t in (layer.keys, layer.values)
            )
            prefix_cache.store(key, block)


def logprobs_of_prompt(seq: _Sequence, logits: Tensor, width: int):
    """The prompt logprobs `seq` asked for (None if it did not), from its row's logits."""
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


def decode_inputs(
    seqs: list[_Sequence], mask: Tensor, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Ids, position ids and attention mask of one decode of `seqs`, whose cache rows
    have the attention mask `mask` ([n, L])."""
    ids = torch.tensor([[s.next_token] for s in seqs], device=device)  # [n, 1]
    positions = torch.tensor([[s.position] for s in seqs], device=device)  # [n, 1]
    ones = torch.ones(len(seqs), 1, dtype=torch.long, device=device)
    return ids, positions, torch.cat([mask, ones], dim=1)  # mask: [n, L + 1]


def decode_forward(
    engine: Engine, seqs: list[_Sequence], mask: Tensor, cache: BatchKVCache
) -> tuple[Tensor, Any, Tensor]:
    """One decode forward of `seqs` (cache rows `cache`, attention mask `mask` [n, L]):
    (logits [n, 1, V], the step's routing, the mask with the new column [n, L + 1])."""
    ids, positions, mask = decode_inputs(seqs, mask, engine.device)
    logits, routing = forward(
        engine.runner,
        engine.pool,
        seqs,
        ids,
        mask,
        positions,
        cache=cache,
        all_logits=False,
        valid=None,
    )
    return logits, routing, mask


def sample(seqs: list[_Sequence], logits: Tensor, *, trial: bool = False) -> list:
    """`sample_next` for `seqs` that leaves their generators as they were if it fails
    (always, with `trial`), so a retried step draws the same tokens."""
    for seq in seqs:
        if seq.params.penalised and seq.counts is None:
            # On the logits' device: counting a token and stacking the counts stay there.
            seq.counts = torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)
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
