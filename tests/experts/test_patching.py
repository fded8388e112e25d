"""Patching HF models and the pool's version snapshots, on tiny models built from configs."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mora_runtime.expert_sets.synthetic import random_tensors
from mora_runtime.experts.backends.trainable import trainable_experts
from mora_runtime.experts.context import ForwardContext, forward_context, use_snapshots
from mora_runtime.experts.patching import (
    MoRALinear,
    find_target_modules,
    patch_model,
    unpatch_model,
)
from mora_runtime.experts.pool import ExpertPool
from mora_runtime.experts.routing import mora_delta
from mora_runtime.experts.slots import PoolError, RoutingConfig

DEC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=128)
DEC_HEADS = dict(num_attention_heads=4, num_key_value_heads=2)


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(**DEC, **DEC_HEADS))


def tiny_qwen2():
    return Qwen2ForCausalLM(Qwen2Config(**DEC, **DEC_HEADS))


def tiny_mistral():
    return MistralForCausalLM(MistralConfig(**DEC, **DEC_HEADS))


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128))


def tiny_clip():
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    vision = dict(text, image_size=32, patch_size=8)
    return CLIPModel(CLIPConfig(text_config=dict(text, vocab_size=99), vision_config=vision))


CAUSAL = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral, "gpt2": tiny_gpt2}


def build(factory):
    torch.manual_seed(0)
    return factory().eval()


def random_set(pool: ExpertPool, rank: int, seed: int, gain: float = 1.0):
    return random_tensors(
        {path: (layer.in_features, layer.out_features) for path, layer in pool.layers.items()},
        rank=rank,
        generator=torch.Generator().manual_seed(seed),
        key_scale=1.0,
        value_scale=gain * 0.2,
    )


def ids(batch=2, length=9, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def clip_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        input_ids=torch.randint(0, 99, (3, 7), generator=g),
        pixel_values=torch.randn(2, 3, 32, 32, generator=g),
    )


@pytest.mark.parametrize("name", list(CAUSAL))
def test_empty_pool_is_bit_exact_and_unpatch_restores(name):
    model = build(CAUSAL[name])
    reference = copy.deepcopy(model)
    originals = {p: model.get_submodule(p) for p in find_target_modules(model)}
    x = ids()
    with torch.no_grad():
        want = reference(x).logits
        pool = patch_model(model)
        assert all(isinstance(model.get_submodule(p), MoRALinear) for p in originals)
        assert torch.equal(model(x).logits, want)
        # A set loaded then retired leaves slots allocated but nothing visible: still exact.
        pool.add_set("t", random_set(pool, 4, seed=1))
        assert not torch.equal(model(x).logits, want)
        pool.retire_set("t")
        assert torch.equal(model(x).logits, want)
        unpatch_model(model)
    assert all(model.get_submodule(p) is m for p, m in originals.items())
    assert not hasattr(model, "mora_pool")
    with torch.no_grad():
        assert torch.equal(model(x).logits, want)


def test_clip_both_towers_patched_and_empty_pool_exact():
    model = build(tiny_clip)
    reference = copy.deepcopy(model)
    inputs = clip_inputs()
    with torch.no_grad():
        want = reference(**inputs).logits_per_image
        pool = patch_model(model)
        towers = {p.split(".")[0] for p in pool.layers}
        assert towers == {"text_model", "vision_model"}
        kinds = {p.rsplit(".", 1)[-1] for p in pool.layers}
        assert kinds == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
        assert torch.equal(model(**inputs).logits_per_image, want)
        pool.add_set("task", random_set(pool, 8, seed=2, gain=5.0))
        assert not torch.allclose(model(**inputs).logits_per_image, want)


def test_gpt2_conv1d_shapes_and_mlp_preset():
    model = build(tiny_gpt2)
    shapes = find_target_modules(model)
    assert shapes["transformer.h.0.attn.c_attn"] == (64, 192)
    assert shapes["transformer.h.0.attn.c_proj"] == (64, 64)
    llama_mlp = find_target_modules(build(tiny_llama), ["gate_proj", "up_proj", "down_proj"])
    assert llama_mlp["model.layers.1.mlp.down_proj"] == (128, 64)
    with pytest.raises(ValueError, match="no linear module"):
        find_target_modules(model, ["nope"])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_batch_of_two_versions_equals_each_alone(name):
    model = build(CAUSAL[name])
    pool = patch_model(model, routing=RoutingConfig(top_k=4, tau=0.1, threshold=0.1))
    pool.add_set("a", random_set(pool, 8, seed=3))
    old = pool.acquire()
    pool.add_set("b", random_set(pool, 8, seed=4))  # changes old experts' weights too
    new = pool.acquire()
    x = ids()
    with torch.no_grad():
        with use_snapshots(pool, [old]):
            alone_old = model(x[:1]).logits
        with use_snapshots(pool, [new]):
            alone_new = model(x[1:]).logits
            latest_both = model(x).logits
        with use_snapshots(pool, [old, new]):
            mixed = model(x).logits
    torch.testing.assert_close(mixed[:1], alone_old, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1:], alone_new, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(latest_both[:1], alone_old, atol=1e-4)  # versions really differ


def test_packed_tokens_follow_token_seq():
    model = build(tiny_llama)
    pool = patch_model(model, routing=RoutingConfig(top_k=4, tau=0.1, threshold=0.1))
    pool.add_set("a", random_set(pool, 8, seed=5))
    v1 = pool.acquire()
    pool.add_set("b", random_set(pool, 8, seed=6))
    v2 = pool.acquire()
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(1, 10, 64)
    seq = torch.tensor([0] * 4 + [1] * 6)
    with torch.no_grad():
        with use_snapshots(pool, [v1, v2], token_seq=seq):
            packed = layer(x)
        with use_snapshots(pool, [v1]):
            first = layer(x[:, :4])
        with use_snapshots(pool, [v2]):
            second = layer(x[:, 4:])
    torch.testing.assert_close(packed, torch.cat([first, second], dim=1), rtol=1e-6, atol=1e-6)


def test_per_sequence_routing_overrides_and_stats():
    model = build(tiny_llama)
    pool = patch_model(model, routing=RoutingConfig(top_k=8, tau=0.1, threshold=0.0))
    pool.add_set("a", random_set(pool, 8, seed=7))
    pool.add_set("b", random_set(pool, 8, seed=8))
    snap = pool.acquire()
    x = ids()
    with torch.no_grad():
        ctx = ForwardContext([snap, snap], top_k=[2, 8], threshold=[0.0, 0.0])
        with forward_context(pool, ctx):
            model(x)
    stats = ctx.collect()
    layers = len(pool.layers)
    narrow, wide = stats.sequences
    assert narrow.observations == wide.observations == layers * x.shape[1]
    # threshold 0 keeps every selected expert with a non-negative score, never more than k.
    assert 0 < narrow.mean_active_ranks <= 2
    assert narrow.mean_active_ranks < wide.mean_active_ranks <= 8
    assert set(wide.set_activations) <= {"a", "b"} and sum(wide.set_activations.values()) > 0
    assert set(stats.per_token) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    q_means = stats.per_token["q_proj"]  # one mean over the q_proj layers per token
    assert len(q_means) == 2 * x.shape[1] and all(0 <= m <= 8 for m in q_means)
    total = sum(sum(v) * (layers // 4) for v in stats.per_token.values())
    assert total == pytest.approx(narrow.active_ranks + wide.active_ranks)


def test_pool_growth_retire_and_slot_reuse():
    model = build(tiny_llama)
    pool = patch_model(model, capacity=8, routing=RoutingConfig(top_k=4, tau=0.1, threshold=0.1))
    pool.add_set("a", random_set(pool, 8, seed=9))
    pinned = pool.acquire()
    x = ids()
    with torch.no_grad(), use_snapshots(pool, [pinned]):
        before = model(x).logits
    pool.add_set("b", random_set(pool, 8, seed=10))  # grows past capacity 8
    assert pool.capacity >= 16 and pool.num_slots == 16
    pool.retire_set("a")
    pool.add_set("c", random_set(pool, 8, seed=11))
    # "a" is still visible to the pinned snapshot, so "c" must not take its slots.
    assert {e.name: e.slot_start for e in pool.sets()} == {"b": 8, "c": 16}
    with torch.no_grad(), use_snapshots(pool, [pinned]):
        torch.testing.assert_close(model(x).logits, before, rtol=1e-6, atol=1e-6)
    pool.release(pinned)
    pool.retire_set("c")
    pool.add_set("d", random_set(pool, 4, seed=12))
    assert {e.name: e.slot_start for e in pool.sets()}["d"] == 0  # reclaimed slots reused
    assert pool.version == 6 and pool.num_experts == 12


def test_bad_sets_leave_pool_unchanged():
    model = build(tiny_llama)
    pool = patch_model(model)
    good = random_set(pool, 4, seed=13)
    pool.add_set("ok", good)
    version, slots = pool.version, pool.num_slots
    path = next(iter(good))
    bad_cases = {
        "unknown layer": {**good, "model.nope": good[path]},
        "no layer": {},
        "wrong width": {**good, path: (torch.zeros(4, 3), good[path][1])},
        "nan": {**good, path: (good[path][0] * float("nan"), good[path][1])},
        "ragged rank": {**good, path: (good[path][0][:2], good[path][1][:2])},
    }
    for case, tensors in bad_cases.items():
        with pytest.raises(PoolError):
            pool.add_set(case, tensors)
    with pytest.raises(PoolError, match="already loaded"):
        pool.add_set("ok", good)
    with pytest.raises(PoolError, match="not loaded"):
        pool.retire_set("ghost")
    assert (pool.version, pool.num_slots, [e.name for e in pool.sets()]) == (version, slots, ["ok"])


def test_partial_set_is_absent_from_layers_it_skips():
    # A set on q_proj only must act, in every other layer, as if it did not exist there.
    model = build(tiny_llama)
    pool = patch_model(model, routing=RoutingConfig(top_k=4, tau=0.1, threshold=0.05))
    full = random_set(pool, 8, seed=14)
    q_only = {p: t for p, t in random_set(pool, 8, seed=15).items() if p.endswith("q_proj")}
    pool.add_set("full", full)
    pool.add_set("q", q_only)
    hidden = torch.randn(1, 5, 64)
    kw = dict(top_k=4, tau=0.1, threshold=0.05)
    q_path, k_path = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    with torch.no_grad():
        for path, experts in [(k_path, [full]), (q_path, [full, q_only])]:
            layer = model.get_submodule(path)
            A = torch.cat([e[path][0] for e in experts])
            B = torch.cat([e[path][1] for e in experts])
            want = layer.base_layer(hidden) + mora_delta(hidden[0], A, B, **kw).unsqueeze(0)
            torch.testing.assert_close(layer(hidden), want, rtol=1e-5, atol=1e-5)
    pool.retire_set("q")
    assert all(layer.absent_slots == 0 for layer in pool.layers.values())


def test_fingerprint_is_the_same_patched_or_not():
    from mora_runtime.expert_sets.fingerprint import base_fingerprint

    model = build(tiny_llama)
    modules = find_target_modules(model)
    before = base_fingerprint(model, modules)
    patch_model(model)
    assert base_fingerprint(model, find_target_modules(model)) == before


def test_trainable_experts_share_routing_and_get_the_only_gradients():
    model = build(tiny_llama).requires_grad_(False)  # the trainer freezes the base
    pool = patch_model(model, routing=RoutingConfig(top_k=4, tau=0.1, threshold=0.1))
    old = random_set(pool, 8, seed=16)
    pool.add_set("old", old)
    new = {
        p: (torch.nn.Parameter(A.clone()), torch.nn.Parameter(B.clone()))
        for p, (A, B) in random_set(pool, 4, seed=17).items()
    }
    x = ids()
    latest = pool.latest()
    with trainable_experts(pool, new, scale=2.0), use_snapshots(pool, [latest], training=True):
        loss = model(x).logits.square().mean()
    loss.backward()
    assert all(A.grad is not None and B.grad is not None for A, B in new.values())
    assert all(p.grad is None for p in model.parameters())  # base stays frozen
    # Inference with the same experts loaded as a set gives the same model (threshold aside).
    with torch.no_grad():
        pool.add_set("new", {p: (A.detach(), B.detach()) for p, (A, B) in new.items()}, scale=2.0)
        with use_snapshots(pool, [pool.latest()], training=True):
            loaded = model(x).logits
        pool.retire_set("new")
        latest = pool.latest()
        with trainable_experts(pool, new, scale=2.0), use_snapshots(pool, [latest], training=True):
            attached = model(x).logits
    torch.testing.assert_close(attached, loaded, rtol=1e-5, atol=1e-5)
