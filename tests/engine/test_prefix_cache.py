"""Prompt prefixes reused across requests: same outputs, keyed by what the experts saw."""

from __future__ import annotations

import torch

from mora_runtime.engine.params import SamplingParams
from mora_runtime.engine.prefix_cache import BLOCK, PrefixCache, block_keys
from mora_runtime.experts.patching import patch_model
from tests.engine.test_engine import VOCAB, make_engine, run_concurrently, tiny_llama, tokens
from tests.experts.test_patching import random_set

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, logprobs=1)


def chat_prompts(n: int, shared: int = 37, seed: int = 0) -> list[list[int]]:
    """`n` prompts with one shared start (like a chat template) and their own endings."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(1, VOCAB, (shared,), generator=g).tolist()
    return [head + torch.randint(1, VOCAB, (3 + 4 * i,), generator=g).tolist() for i in range(n)]


def outputs(engine, batch, params=GREEDY, together=False):
    if together:
        events = run_concurrently(engine, [(p, params) for p in batch])
    else:
        events = [engine.generate(p, params) for p in batch]
    picks = [tokens(e) for e in events]
    logprobs = [[ev.logprob for ev in e if ev.token_id is not None] for e in events]
    return picks, logprobs


def test_reused_prefixes_give_the_outputs_of_a_full_prefill():
    model = tiny_llama()
    batch = chat_prompts(6)
    off = make_engine(model, prefix_cache_blocks=0)
    on = make_engine(model)
    try:
        want, want_lp = outputs(off, batch)
        got, got_lp = outputs(on, batch)  # one by one: from the second on, 2 blocks reused
        assert on.prefix_cache.hits == 2 * (len(batch) - 1)
        together, together_lp = outputs(on, batch, together=True)  # all reuse, mixed rows
        assert on.prefix_cache.hits > 2 * len(batch)
    finally:
        off.shutdown()
        on.shutdown()
    assert off.prefix_cache.hits == 0 and len(off.prefix_cache) == 0
    assert got == want and together == want
    torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(want_lp), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(together_lp), torch.tensor(want_lp), atol=1e-4, rtol=0)


def test_a_row_without_a_cached_prefix_joins_rows_with_one():
    model = tiny_llama()
    shared = chat_prompts(3, seed=1)
    fresh = chat_prompts(2, shared=20, seed=2)  # other starts: nothing to reuse
    off = make_engine(model, prefix_cache_blocks=0)
    on = make_engine(model)
    try:
        on.generate(shared[0], GREEDY)  # stores the shared blocks
        mixed = [shared[1], fresh[0], shared[2], fresh[1]]
        got, _ = outputs(on, mixed, together=True)
        want, _ = outputs(off, mixed)
    finally:
        off.shutdown()
        on.shutdown()
    assert got == want


def test_blocks_are_not_shared_across_pool_versions_or_routing_overrides():
    model = tiny_llama()
    pool = patch_model(model)
    pool.add_set("a", random_set(pool, 4, seed=1, gain=5.0))
    engine = make_engine(model, pool=pool)
    off = make_engine(model, pool=pool, prefix_cache_blocks=0)
    batch = chat_prompts(2, seed=3)
    try:
        engine.generate(batch[0], GREEDY)
        engine.generate(batch[1], GREEDY)
        assert engine.prefix_cache.hits == 2
        other_k = SamplingParams(max_tokens=8, temperature=0.0, top_k=3)
        engine.generate(batch[1], other_k)  # other routing: other keys and values
        assert engine.prefix_cache.hits == 2
        engine.run_exclusive(lambda: pool.add_set("b", random_set(pool, 4, seed=2, gain=5.0)))
        got, _ = outputs(engine, batch[1:])  # a new version: its blocks are computed afresh
        assert engine.prefix_cache.hits == 2
        want, _ = outputs(off, batch[1:])
        again, _ = outputs(engine, batch[1:])  # now stored for the new version
        assert engine.prefix_cache.hits == 4
    finally:
        engine.shutdown()
        off.shutdown()
    assert got == want == again


def test_lookup_leaves_the_last_token_and_the_oldest_blocks_go_first():
    cache = PrefixCache(max_blocks=3)
    prompt = list(range(2 * BLOCK))  # exactly two blocks
    block = (torch.zeros(1, BLOCK, 2),)
    keys = block_keys("v", prompt)
    assert len(keys) == 2 and block_keys("v", [*prompt, 7]) == keys  # full blocks only
    assert block_keys("v", [1, *prompt[1:]])[1] != keys[1]  # a block's key covers the past
    for key in keys:
        cache.store(key, block)
    assert len(cache.lookup(keys, len(prompt))) == 1  # the second block holds the last token
    assert len(cache.lookup(keys, len(prompt) + 1)) == 2
    assert cache.lookup(block_keys("w", prompt), len(prompt) + 1) == []  # another context
    other = block_keys("v", [99, *prompt[1:]])
    cache.store(other[0], block)  # evicts the least recently used block
    cache.store(other[1], block)
    assert len(cache) == 3
    assert cache.lookup(keys, len(prompt) + 1) == []  # its first block is gone
    assert len(cache.lookup(other, len(prompt) + 1)) == 2
    off = PrefixCache(max_blocks=0)
    off.store(keys[0], block)
    assert len(off) == 0 and off.lookup(keys, len(prompt) + 1) == []
    assert off.keys("ctx", prompt) == [] and cache.keys("ctx", prompt) == block_keys("ctx", prompt)
