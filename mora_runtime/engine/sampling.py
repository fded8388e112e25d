"""The batched next-token choice (per-request parameters: engine/params.py).

Greedy rows take an argmax over the whole batch at once; sampled rows draw from their own
`torch.Generator`, so a seeded request gives the same tokens whatever else is batched with it.

Shape legend: S = sequences in the step, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mora_runtime.engine.params import SamplingParams


@dataclass(frozen=True)
class Pick:
    token_id: int
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...]


def apply_penalties(logits: Tensor, params: SamplingParams, counts: Tensor) -> Tensor:
    """OpenAI's presence/frequency penalties over the tokens generated so far."""
    counts = counts.to(logits.device)
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)


def _top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Zero the tail outside the smallest set whose mass reaches top_p (the top token stays)."""
    sorted_probs, order = probs.sort(descending=True)  # [V]
    tail = sorted_probs.cumsum(0) - sorted_probs > top_p
    sorted_probs[tail] = 0.0
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)


def sample_next(
    logits: Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    counts: Sequence[Tensor | None],
) -> list[Pick]:
    """Choose the next token of every row of `logits` [S, V] (float32)."""
    rows = []
    for i, p in enumerate(params):
        row = logits[i]
        if p.penalised and counts[i] is not None:
            row = apply_penalties(row, p, counts[i])
        rows.append(row)
    processed = torch.stack(rows)  # [S, V]
    greedy = processed.argmax(dim=-1).tolist()  # [S]
    need_logprobs = any(p.logprobs is not None for p in params)
    logprobs = torch.log_softmax(processed, dim=-1) if need_logprobs else None  # [S, V]
    picks = []
    for i, p in enumerate(params):
        token = greedy[i]
        if p.temperature > 0:
            probs = torch.softmax(processed[i] / p.temperature, dim=-1).cpu()  # [V]
            if p.top_p < 1.0:
                probs = _top_p_filter(probs, p.top_p)
            token = int(torch.multinomial(probs, 1, generator=generators[i]))
        if p.logprobs is None or logprobs is None:
            picks.append(Pick(token, None, ()))
            continue
        row = logprobs[i]
        top: tuple[tuple[int, float], ...] = ()
        if p.logprobs:
            values, indices = row.topk(p.logprobs)
            top = tuple(zip(indices.tolist(), values.tolist(), strict=True))
        picks.append(Pick(token, float(row[token]), top))
    return picks
