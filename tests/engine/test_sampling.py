"""`sample_next`, batched: the sampled distribution against softmax / top-p computed on its own
in float64, greedy rows and logprobs against plain references, seeded rows independent of
their neighbours, and never a token outside the nucleus (on CUDA too, where present)."""

from __future__ import annotations

import pytest
import torch

from mora_runtime.engine.params import SamplingParams
from mora_runtime.engine.sampling import sample_next, sample_rows

V = 16
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


def reference_probs(row: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """[V] float64: softmax(row / temperature), the smallest most-likely set reaching top_p
    kept and renormalised, written token by token."""
    probs = torch.softmax(row.double() / temperature, dim=0).tolist()
    kept, mass = set(), 0.0
    for token in sorted(range(len(probs)), key=lambda t: -probs[t]):
        if mass > top_p:
            break
        kept.add(token)
        mass += probs[token]
    out = torch.tensor([p if t in kept else 0.0 for t, p in enumerate(probs)], dtype=torch.float64)
    return out / out.sum()


def draw(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0, counts=None):
    """n tokens of one row, drawn in one batched call (one generator per copy of the row)."""
    rows = logits.unsqueeze(0).expand(n, -1).contiguous()
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    picks = sample_next(rows, [params] * n, generators, [counts] * n)
    return torch.tensor([p.token_id for p in picks])


def total_variation(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    empirical = torch.bincount(tokens, minlength=len(probs)).double() / len(tokens)
    return 0.5 * float((empirical - probs).abs().sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_sampled_rows_follow_the_reference_distribution(device, temperature, top_p):
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1)) * 2
    want = reference_probs(logits, temperature, top_p)
    n = 20_000
    tokens = draw(logits.to(device), SamplingParams(temperature=temperature, top_p=top_p), n)
    assert set(tokens.tolist()) <= set(torch.nonzero(want).flatten().tolist())
    # Fixed seeds: deterministic. With 20k draws over 16 tokens the expected distance is
    # about 0.01; moving 5% of the mass (a wrong temperature or nucleus) exceeds the bound.
    assert total_variation(tokens, want) < 0.025


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_shape_the_sampled_distribution(device):
    logits = torch.zeros(V)
    counts = torch.zeros(V)
    counts[:4] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    params = SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.25)
    penalised = logits - 0.25 * counts - 0.5 * (counts > 0).float()
    want = reference_probs(penalised, 1.0, 1.0)
    tokens = draw(logits.to(device), params, 20_000, counts=counts)
    assert total_variation(tokens, want) < 0.025


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_are_the_argmax_of_the_penalised_logits(device):
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(2))
    counts = torch.zeros(V)
    counts[logits[3].argmax()] = 1  # row 3's favourite is penalised away
    params = [SamplingParams(temperature=0.0)] * 6
    params[3] = SamplingParams(temperature=0.0, presence_penalty=100.0)
    params[4] = SamplingParams(temperature=0.9, top_p=0.5, seed=3)  # a sampled neighbour
    generators = [None] * 6
    generators[4] = torch.Generator().manual_seed(3)
    row_counts = [None, None, None, counts, None, None]
    picks = sample_next(logits.to(device), params, generators, row_counts)
    want = logits.argmax(dim=-1).tolist()
    want[3] = int((logits[3] - 100.0 * (counts > 0).float()).argmax())
    got = [p.token_id for p in picks]
    assert got[:4] + got[5:] == want[:4] + want[5:]
    assert got[3] != int(logits[3].argmax())


@pytest.mark.parametrize("device", DEVICES)
def test_a_seeded_row_draws_the_same_tokens_whatever_its_neighbours(device):
    steps = torch.randn(5, 40, V, generator=torch.Generator().manual_seed(4))
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=7)
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.2, seed=8),
        SamplingParams(temperature=0.5, top_p=0.7),
    ]

    def run(batch: list[SamplingParams]) -> list[int]:
        generators = [torch.Generator().manual_seed(p.seed) if p.seed else None for p in batch]
        out = []
        for logits in steps:
            rows = logits[: len(batch)]  # the seeded row's logits are the same in every batch
            picks = sample_next(rows.to(device), batch, generators, [None] * len(batch))
            out.append(picks[0].token_id)
        return out

    alone = run([seeded])
    assert run([seeded, *others]) == alone
    assert run([seeded, *others[::-1], *others]) == alone
    assert run([seeded]) == alone
    assert len(set(alone)) > 1  # it really samples


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_and_top_logprobs_per_row(device):
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(5)) * 3
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, logprobs=0, seed=1),
        SamplingParams(temperature=0.8, logprobs=5, seed=2),
    ]
    generators = [None, None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    picks = sample_next(logits.to(device), params, generators, [None] * 4)
    reference = torch.log_softmax(logits.double(), dim=-1)
    for row, (pick, p) in enumerate(zip(picks, params, strict=True)):
        if p.logprobs is None:
            assert pick.logprob is None and pick.top_logprobs == ()
            continue
        assert pick.logprob == pytest.approx(float(reference[row, pick.token_id]), abs=1e-5)
        values, indices = reference[row].topk(p.logprobs)
        assert [t for t, _ in pick.top_logprobs] == indices.tolist()
        assert [v for _, v in pick.top_logprobs] == pytest.approx(values.tolist(), abs=1e-5)


def test_inverse_cdf_never_steps_past_the_nucleus():
    """A uniform at the very top of [0, 1) picks the last kept token, never one of zero
    probability; at 0 the most likely one."""
    inf = float("inf")
    logits = torch.tensor([[3.0, 2.0, 1.0, -inf, -inf]])  # probabilities .67, .24, .09, 0, 0
    top = torch.tensor([1.0 - 2.0**-53], dtype=torch.float64)
    one = torch.ones(1)
    assert int(sample_rows(logits, one, top, torch.tensor([0.7]))) == 1  # nucleus {0, 1}
    assert int(sample_rows(logits, one, torch.zeros(1, dtype=torch.float64))) == 0
    assert int(sample_rows(logits, one, top)) == 2
