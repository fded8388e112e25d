"""The batched next-token choice (per-request parameters: engine/params.py).

Every step is a few batched ops on the logits' device and one transfer to the host: the
penalties of all penalised rows at once, one argmax for the greedy rows, and for the sampled
rows one softmax at their temperatures, one sort, top-p over the sorted rows and
inverse-CDF sampling. The randomness of a sampled row is one uniform number drawn from its
own `torch.Generator` (on the CPU: a seeded request's generator, else torch's default one),
so a seeded request gives the same tokens whatever else is batched with it, on any device.
Logprobs and top logprobs of the rows that ask for them come out of the same transfer.

Shape legend: S = sequences in the step, n = sampled rows, r = rows with logprobs,
m = the most top logprobs any row asks for, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mora_runtime.engine.params import SamplingParams
from mora_runtime.experts.context import to_device


@dataclass(frozen=True)
class Pick:
    token_id: int
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...]


def apply_penalties(
    logits: Tensor, params: Sequence[SamplingParams], counts: Sequence[Tensor]
) -> Tensor:
    """OpenAI's presence/frequency penalties over the tokens generated so far, for rows
    `logits` [P, V] with their parameters and token counts ([V] each, any device)."""
    device = logits.device
    stacked = to_device(torch.stack([c.to(torch.float32) for c in counts]), device)  # [P, V]
    frequency = [[p.frequency_penalty] for p in params]
    presence = [[p.presence_penalty] for p in params]
    frequency_t = to_device(torch.tensor(frequency, dtype=logits.dtype), device)  # [P, 1]
    presence_t = to_device(torch.tensor(presence, dtype=logits.dtype), device)  # [P, 1]
    return logits - frequency_t * stacked - presence_t * (stacked > 0)


def uniforms(generators: Sequence[torch.Generator | None]) -> Tensor:
    """[n] float64 in [0, 1): one draw per sampled row, from its generator (None: torch's
    default CPU generator)."""
    draws = [
        torch.rand((), dtype=torch.float64, generator=g)
        if g is not None
        else torch.rand((), dtype=torch.float64)
        for g in generators
    ]
    return torch.stack(draws)


def sample_rows(
    logits: Tensor, temperature: Tensor, u: Tensor, top_p: Tensor | None = None
) -> Tensor:
    """[n] long: a token per row of `logits` [n, V] from softmax(logits / temperature), cut
    to its top-p nucleus when `top_p` ([n]) is given, by inverse CDF at the row's uniform `u`
    ([n] float64, in [0, 1)).

    The nucleus is the smallest set of the most likely tokens whose mass reaches top_p (the
    most likely token always stays): only then are the rows sorted, since a sort costs more
    than the rest together on a CPU. The CDF runs in float64."""
    probs = torch.softmax(logits / temperature.unsqueeze(1), dim=-1)  # [n, V]
    order = None
    if top_p is not None:
        probs, order = probs.sort(dim=-1, descending=True)  # [n, V]
        before = probs.cumsum(dim=-1) - probs  # mass ahead of each token
        probs = torch.where(before > top_p.unsqueeze(1), 0.0, probs)
    cdf = probs.double().cumsum(dim=-1)  # [n, V]
    target = (u * cdf[:, -1]).unsqueeze(1)  # [n, 1]: a point in [0, the row's mass)
    index = torch.searchsorted(cdf, target, right=True)  # [n, 1]
    # A rounding at the top end must not step past the last token of non-zero probability.
    mass = cdf[:, -1:].contiguous()  # [n, 1]
    last = torch.searchsorted(cdf, mass, right=False)  # [n, 1]: where the mass ends
    index = torch.minimum(index, last)
    return index.squeeze(1) if order is None else order.gather(1, index).squeeze(1)


def sample_next(
    logits: Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    counts: Sequence[Tensor | None],
) -> list[Pick]:
    """Choose the next token of every row of `logits` [S, V] (float32)."""
    device = logits.device
    processed = logits
    penalised = [i for i, p in enumerate(params) if p.penalised and counts[i] is not None]
    if penalised:
        rows = to_device(torch.tensor(penalised), device)
        processed = logits.clone()
        processed[rows] = apply_penalties(
            logits[rows], [params[i] for i in penalised], [counts[i] for i in penalised]
        )
    tokens = processed.argmax(dim=-1)  # [S]: greedy rows keep these
    # Rows with and without a nucleus are sampled apart: which token a uniform picks
    # depends on the order of the CDF, and each row's must not depend on its neighbours.
    for nucleus in (False, True):
        sampled = [
            i for i, p in enumerate(params) if p.temperature > 0 and (p.top_p < 1.0) == nucleus
        ]
        if not sampled:
            continue
        rows = to_device(torch.tensor(sampled), device)
        settings = torch.tensor([[params[i].temperature, params[i].top_p] for i in sampled])
        settings = to_device(settings.to(processed.dtype), device)  # [n, 2]
        u = to_device(uniforms([generators[i] for i in sampled]), device)
        top_p = settings[:, 1] if nucleus else None
        tokens = tokens.index_copy(0, rows, sample_rows(processed[rows], settings[:, 0], u, top_p))
    scored = [i for i, p in enumerate(params) if p.logprobs is not None]
    parts = [tokens.double()]
    width = max((params[i].logprobs or 0 for i in scored), default=0)  # m
    if scored:
        rows = to_device(torch.tensor(scored), device)
        logprobs = torch.log_softmax(processed[rows], dim=-1)  # [r, V]
        parts.append(logprobs.gather(1, tokens[rows].unsqueeze(1)).squeeze(1).double())
        if width:
            values, indices = logprobs.topk(width, dim=-1)  # [r, m]
            parts += [indices.reshape(-1).double(), values.reshape(-1).double()]
    # One transfer for the step; token ids are exact in float64.
    host = torch.cat(parts).tolist()
    num_rows = len(params)
    picks = [Pick(int(host[i]), None, ()) for i in range(num_rows)]
    top_at = num_rows + len(scored)
    for j, i in enumerate(scored):
        wanted = params[i].logprobs or 0
        first = top_at + j * width
        ids = host[first : first + wanted]
        values = host[first + len(scored) * width : first + len(scored) * width + wanted]
        top = tuple((int(t), v) for t, v in zip(ids, values, strict=True))
        picks[i] = Pick(picks[i].token_id, host[num_rows + j], top)
    return picks
