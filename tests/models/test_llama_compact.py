"""The compact Llama forward equals HF's: logits, greedy tokens (alone, batched, with a
pool of mixed versions), on float and int4 weights; unsupported models keep HF's forward."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from mora_runtime.engine.core import Engine
from mora_runtime.engine.forward import select_runner
from mora_runtime.engine.kv_cache import BatchKVCache
from mora_runtime.engine.params import SamplingParams
from mora_runtime.engine.types import EngineConfig
from mora_runtime.experts.patching import patch_model
from mora_runtime.experts.slots import RoutingConfig
from mora_runtime.models.llama.config import unsupported_reason
from mora_runtime.models.llama.model import CompactLlama
from mora_runtime.models.quantize import int4_supported, quantize_model
from tests.engine.test_engine import (
    TINY_SHAPE,
    VOCAB,
    prompts,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
    tokens,
)

FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral}
llama = tiny_llama


def hf_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def compact_logits(model, ids: torch.Tensor, mask: torch.Tensor, split: int) -> torch.Tensor:
    """Prefill the first `split` columns, then decode the rest one column at a time."""
    return compact_run(CompactLlama(model), model, ids, mask, split)[0]


def compact_run(runner, model, ids: torch.Tensor, mask: torch.Tensor, split: int):
    """`compact_logits` with a given runner: (logits [n, columns, V], the cache)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = BatchKVCache(model.config.num_hidden_layers)
    with torch.inference_mode():
        out = [runner(ids[:, :split], mask[:, :split], positions[:, :split], cache, 0)]
        for column in range(split, ids.shape[1]):
            step = slice(column, column + 1)
            out.append(runner(ids[:, step], mask[:, : column + 1], positions[:, step], cache, 1))
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("native", [True, False], ids=["cpu-kernels", "torch-ops"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_hf_for_left_padded_prefill_then_decode(family, native, monkeypatch):
    if not native:  # the path of other devices and dtypes, run on the CPU
        monkeypatch.setattr("mora_runtime.models.llama.attention.kernels", lambda: None)
    model = FAMILIES[family]()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding, as the engine batches prompts
    mask[2, :7] = 0
    want = hf_logits(model, ids, mask)
    got = compact_logits(model, ids, mask, split=9)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() < 1e-4
    assert torch.equal(got[real].argmax(-1), want[real].argmax(-1))


def test_fusing_leaves_the_hf_forward_bit_for_bit_unchanged():
    model = llama()
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    before = hf_logits(model, ids, mask)
    CompactLlama(model)  # the members' weights become views of the fused products
    assert torch.equal(hf_logits(model, ids, mask), before)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_engine_runs_the_llama_family_on_the_compact_forward(family):
    # Its greedy tokens equal HF generate's, alone and batched: test_engine.py's
    # test_greedy_equals_hf_generate_alone_and_batched, over the same families.
    engine = Engine(FAMILIES[family](), eos_token_ids=(), max_context=256)
    assert isinstance(engine.runner, CompactLlama)


def _expert_set(pool, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {
        path: (
            torch.randn(6, layer.in_features, generator=g),
            torch.randn(6, layer.out_features, generator=g),
        )
        for path, layer in pool.layers.items()
    }


def _mixed_version_run(forward: str, targets: tuple[str, ...] | None, weights: str):
    """Six requests, three admitted at pool version 1 and three after a second set arrives
    mid-flight, run with the given engine forward: their events."""
    model = llama()
    if weights == "int4":
        quantize_model(model)
    pool = patch_model(model, targets, routing=RoutingConfig(top_k=4, tau=0.1, threshold=0.05))
    pool.add_set("a", _expert_set(pool, 0))
    engine = Engine(
        model, eos_token_ids=(), max_context=256, pool=pool, config=EngineConfig(forward=forward)
    )
    params = SamplingParams(max_tokens=8, temperature=0.0)
    events: dict[int, list] = {i: [] for i in range(6)}
    batch = prompts(6, seed=4)
    for i in range(3):
        engine.submit(batch[i], params, events[i].append)
    engine.step()
    engine.step()
    engine.run_exclusive(lambda: pool.add_set("b", _expert_set(pool, 1)))
    for i in range(3, 6):
        engine.submit(batch[i], params, events[i].append)
    while engine.num_running or engine.num_waiting:
        engine.step()
    return engine, [events[i] for i in range(6)]


@pytest.mark.parametrize(
    "targets", [None, ("q_proj", "v_proj", "up_proj", "down_proj")], ids=["qkvo", "mixed"]
)
@pytest.mark.parametrize("weights", ["float", "int4"])
def test_a_pool_of_mixed_versions_routes_as_in_the_hf_forward(targets, weights):
    if weights == "int4" and not int4_supported():
        pytest.skip("int4 kernels need an x86-64 CPU with AVX2 and FMA")
    compact, got = _mixed_version_run("auto", targets, weights)
    hf, want = _mixed_version_run("hf", targets, weights)
    assert isinstance(compact.runner, CompactLlama)
    assert not isinstance(hf.runner, CompactLlama)
    assert [e.pool_version for e in got[0]][:1] == [1] and got[5][0].pool_version == 2
    assert [tokens(e) for e in got] == [tokens(e) for e in want]
    # The routing each request saw: the same experts counted, layer kind by layer kind.
    for g, w in zip(got, want, strict=True):
        assert g[-1].routing == w[-1].routing


def test_unsupported_models_keep_the_hf_forward():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=VOCAB))
    assert "gpt2" in unsupported_reason(gpt2)
    assert not isinstance(select_runner(gpt2), CompactLlama)
    windowed = MistralForCausalLM(MistralConfig(**TINY_SHAPE, sliding_window=16))
    assert unsupported_reason(windowed) == "sliding-window attention"
    assert isinstance(select_runner(llama(), "auto"), CompactLlama)
    assert not isinstance(select_runner(llama(), "hf"), CompactLlama)
    with pytest.raises(ValueError, match="forward must be"):
        select_runner(llama(), "fast")


def test_the_engine_fuses_on_a_thread_that_ends(monkeypatch):
    """A thread that ran torch ops keeps a torch thread pool that slows the engine thread's
    every op (mora_runtime/cpu/openmp.py): an engine built on a server's long-lived thread
    must not leave one there."""
    import threading

    from mora_runtime.models.llama import projections

    fused_on: list[threading.Thread] = []
    fuse = projections._fuse

    def recording(bases):
        fused_on.append(threading.current_thread())
        return fuse(bases)

    monkeypatch.setattr(projections, "_fuse", recording)
    engine = Engine(llama(), eos_token_ids=(), max_context=256)
    assert isinstance(engine.runner, CompactLlama)
    assert fused_on and all(t is not threading.current_thread() for t in fused_on)
    assert not any(t.is_alive() for t in fused_on)
