"""A request that makes a step fail ends alone; the batch it was in goes on unchanged."""

from __future__ import annotations

import pytest
import torch

from mora_runtime.engine.core import Engine
from mora_runtime.engine.params import SamplingParams
from mora_runtime.engine.types import TokenEvent
from mora_runtime.experts.patching import patch_model
from mora_runtime.experts.slots import RoutingConfig
from tests.engine.test_engine import VOCAB, prompts, tiny_llama, tokens

MAX_STEPS = 200  # bounded loops: a request that never ends fails the test instead of hanging


def poison(model: torch.nn.Module, *, token: int | None = None, position: int | None = None):
    """Make the model's forward raise when `token` is among its input ids, or when a position
    id reaches `position`: a failure only some sequences of a batch bring. Planted in the
    embedding and the rotary tables, which every forward of a Llama model calls (HF's and
    the engine's compact one alike)."""
    embed, rotary = model.get_input_embeddings(), model.model.rotary_emb
    embed_forward, rotary_forward = embed.forward, rotary.forward

    def embedding(ids):
        if token is not None and bool((ids == token).any()):
            raise IndexError("poisoned token in the batch")
        return embed_forward(ids)

    def rotary_tables(x, position_ids):
        if position is not None and bool((position_ids >= position).any()):
            raise RuntimeError("poisoned position in the batch")
        return rotary_forward(x, position_ids)

    embed.forward = embedding
    rotary.forward = rotary_tables


def with_pool(model: torch.nn.Module):
    pool = patch_model(model, routing=RoutingConfig(top_k=4, tau=0.1, threshold=0.05))
    g = torch.Generator().manual_seed(0)
    pool.add_set(
        "a",
        {
            p: (torch.randn(8, lay.in_features, generator=g), torch.randn(8, lay.out_features))
            for p, lay in pool.layers.items()
        },
    )
    return pool


def clean_items() -> list[tuple[list[int], SamplingParams]]:
    """Eight requests: greedy ones and seeded sampled ones (whose generators must not be
    advanced by any retry or probe)."""
    items = []
    for i, prompt in enumerate(prompts(8, seed=11)):
        if i % 2:
            params = SamplingParams(max_tokens=12, temperature=0.9, seed=100 + i)
        else:
            params = SamplingParams(max_tokens=12, temperature=0.0)
        items.append((prompt, params))
    return items


def run_stepped(
    engine: Engine, items: list[tuple[list[int], SamplingParams]]
) -> tuple[list[list[TokenEvent]], list[int]]:
    """Submit everything (so it is admitted together), then step until all ended; returns
    each request's events and the step in which its final event came."""
    events: list[list[TokenEvent]] = [[] for _ in items]
    ended = [0] * len(items)
    for i, (prompt, params) in enumerate(items):
        engine.submit(prompt, params, events[i].append, f"r{i}")
    for step in range(1, MAX_STEPS + 1):
        engine.step()
        for i, got in enumerate(events):
            if got and got[-1].finish_reason is not None and not ended[i]:
                ended[i] = step
        if all(ended):
            return events, ended
    pytest.fail(f"requests never ended: {[i for i, e in enumerate(ended) if not e]}")


def test_a_poison_prompt_fails_alone_in_the_prefill_and_the_others_match_a_clean_run():
    model = tiny_llama()
    pool = with_pool(model)
    items = clean_items()
    clean, _ = run_stepped(Engine(model, eos_token_ids=(), max_context=256, pool=pool), items)
    seen = {t for (prompt, _), ev in zip(items, clean, strict=True) for t in prompt + tokens(ev)}
    bad = max(set(range(1, VOCAB)) - seen)  # a valid id no clean request ever feeds in
    poison(model, token=bad)
    engine = Engine(model, eos_token_ids=(), max_context=256, pool=pool)
    poisoned_items = [*items[:4], ([5, bad, 7], SamplingParams(max_tokens=12)), *items[4:]]
    got, ended = run_stepped(engine, poisoned_items)
    bad_events = got.pop(4)
    assert [e.finish_reason for e in bad_events] == ["error"]
    assert bad_events[0].error is not None and "poisoned token" in bad_events[0].error
    assert ended[4] == 1  # in the very step that failed, not at some timeout
    for want, have in zip(clean, got, strict=True):
        assert tokens(have) == tokens(want)
        assert [e.finish_reason for e in have] == [e.finish_reason for e in want]
    assert engine.num_running == 0
    assert pool.live_versions() == {}  # every snapshot was released, the failed one's too


def test_a_sequence_failing_mid_decode_ends_alone_and_the_others_match_a_clean_run():
    model = tiny_llama()
    items = clean_items()
    clean, _ = run_stepped(Engine(model, eos_token_ids=(), max_context=256), items)
    longest = max(len(p) + params.max_tokens for p, params in items)
    long_prompt = prompts(1, seed=12)[0] * 12  # long enough to reach the poisoned position
    assert len(long_prompt) > longest
    limit = len(long_prompt) + 4  # the long request fails on its 5th decode step
    poison(model, position=limit)
    engine = Engine(model, eos_token_ids=(), max_context=256)
    got, ended = run_stepped(engine, [(long_prompt, SamplingParams(max_tokens=20)), *items])
    bad_events = got.pop(0)
    assert [e.finish_reason for e in bad_events] == [None] * 5 + ["error"]
    assert bad_events[-1].error is not None and "poisoned position" in bad_events[-1].error
    assert ended[0] == 6  # the prefill, four decodes, then the step that failed
    for want, have in zip(clean, got, strict=True):
        assert tokens(have) == tokens(want)
        assert [e.finish_reason for e in have] == [e.finish_reason for e in want]
    assert engine.num_running == 0


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 999_999_999, -1])
def test_admission_refuses_token_ids_outside_the_vocabulary(bad):
    engine = Engine(tiny_llama(), eos_token_ids=(), max_context=256)
    assert engine.vocab_size == VOCAB
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([1, bad, 2], SamplingParams(), lambda event: None)
    assert engine.num_waiting == 0
