"""Batched greedy generation for evaluation equals one-at-a-time greedy decoding."""

from __future__ import annotations

import torch

from mora_runtime.experts.patching import patch_model
from mora_runtime.experts.slots import RoutingConfig
from mora_runtime.learn.generation import _waves, generate_greedy
from mora_runtime.models.lm import greedy_generate, load_causal_lm

PROMPTS = ["the quick brown fox", "hello", "what is the capital of france?", "a", "every expert"]


def test_waves_respect_batch_and_token_budgets() -> None:
    ids = [[1] * n for n in (3, 3, 3, 10, 1)]
    assert _waves(ids, max_running=2, max_prefill_tokens=100) == [[0, 1], [2, 3], [4]]
    assert _waves(ids, max_running=8, max_prefill_tokens=10) == [[0, 1, 2], [3], [4]]
    assert _waves([], max_running=2, max_prefill_tokens=10) == []


def test_batched_waves_equal_sequential_greedy(tiny_llama_dir) -> None:
    lm = load_causal_lm(tiny_llama_dir, device="cpu", dtype=torch.float32)
    pool = patch_model(lm.model, routing=RoutingConfig(top_k=2, tau=0.1, threshold=0.0))
    g = torch.Generator().manual_seed(0)
    pool.add_set(
        "s",
        {
            p: (
                torch.randn(3, l.in_features, generator=g),
                torch.randn(3, l.out_features, generator=g) * 0.1,
            )
            for p, l in pool.layers.items()
        },
    )
    out = generate_greedy(
        lm.model,
        lm.tokenizer,
        PROMPTS,
        max_new_tokens=6,
        eos_token_ids=lm.eos_token_ids,
        max_context=lm.max_context,
        pool=pool,
        max_running=2,
    )
    assert [g.text for g in out] == [greedy_generate(lm, p, 6) for p in PROMPTS]
    assert all(g.routing.observations > 0 and g.routing.set_activations for g in out)
