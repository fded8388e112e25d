"""Weight-only int4/int8 layers for CPU serving, on tiny models built from configs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mora_runtime.cpu.build import kernels
from mora_runtime.engine.core import Engine
from mora_runtime.engine.params import SamplingParams
from mora_runtime.expert_sets.fingerprint import base_fingerprint
from mora_runtime.experts.patching import find_target_modules, patch_model
from mora_runtime.models.lm import load_causal_lm, resolve_weights
from mora_runtime.models.materialize import MARKER_FILENAME
from mora_runtime.models.quantize import (
    BLOCK,
    Q4Linear,
    Q8Linear,
    int4_supported,
    pack_q4_1,
    pack_q8_0,
    quantize_activations,
    quantize_model,
    set_prefill_float,
    unpack_q4_1,
    unpack_q8_0,
)
from tests.engine.test_engine import prompts, reference_scores, run_concurrently, tiny_llama, tokens
from tests.experts.test_patching import random_set


def q4_1_weight(out_features: int, in_features: int, seed: int = 0):
    """A weight on a Q4_1 grid (per 32 inputs: fp16 scale d and minimum m, w = d * n + m)."""
    g = torch.Generator().manual_seed(seed)
    groups = in_features // BLOCK
    d = (torch.rand(out_features, groups, generator=g) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(out_features, groups, generator=g) * 0.1).half().float()
    n = torch.randint(0, 16, (out_features, groups, BLOCK), generator=g)
    n[..., 0], n[..., 1] = 0, 15  # Q4_1 maps each block's minimum to 0 and maximum to 15
    weight = (d[..., None] * n + m[..., None]).reshape(out_features, in_features)
    return weight, n.reshape(out_features, in_features)


def linear_with(weight: torch.Tensor, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def test_packing_brings_gguf_grids_back():
    weight, n = q4_1_weight(32, 96)
    nibbles, d, m = pack_q4_1(weight)
    assert nibbles.shape == (32, 48) and nibbles.dtype == torch.uint8
    low, high = nibbles.reshape(32, 3, 16) & 0x0F, nibbles.reshape(32, 3, 16) >> 4
    assert torch.equal(torch.cat([low, high], -1).reshape(32, 96).long(), n)  # GGUF order
    torch.testing.assert_close(unpack_q4_1(nibbles, d, m), weight, rtol=1e-6, atol=1e-7)

    g = torch.Generator().manual_seed(1)
    scale = (torch.rand(8, 3, 1, generator=g) * 0.01).half().float()
    w8 = torch.randint(-127, 128, (8, 3, BLOCK), generator=g)
    w8[..., 0] = 127  # Q8_0: d = max|w| / 127
    q8_weight = (w8 * scale).reshape(8, 96)
    got_w8, got_d = pack_q8_0(q8_weight)
    assert torch.equal(got_w8.reshape(8, 3, BLOCK).long(), w8)
    torch.testing.assert_close(unpack_q8_0(got_w8, got_d), q8_weight, rtol=1e-6, atol=1e-8)


def test_scales_are_float16_as_in_a_gguf():
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(16, 64, generator=g) * 0.1  # not on any grid: scales get rounded
    _, d, m = pack_q4_1(weight)
    _, d8 = pack_q8_0(weight)
    for scales in (d, m, d8):
        assert torch.equal(scales.half().float(), scales)
    for layer in (Q4Linear(linear_with(weight)), Q8Linear(linear_with(weight))):
        assert layer.d.dtype == torch.float16
        # rounding the scales moves the weight by at most half a step of the grid and a bit
        step = (d if isinstance(layer, Q4Linear) else d8).max()
        assert (layer.dequantized() - weight).abs().max() <= step * 0.51 + 1e-3


@pytest.mark.parametrize("pack", [pack_q4_1, pack_q8_0])
def test_scales_beyond_float16_are_refused(pack):
    weight = torch.zeros(8, 32)
    weight[0, 1] = 3e7  # its block's scale is far beyond float16's 65504
    with pytest.raises(ValueError, match="float16"):
        pack(weight)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("out_features", [1, 48, 49])
def test_kernels_compute_their_reference(kind, out_features):
    """The kernel against a readable reference: 8-bit activations times the dequantised
    weight, for token counts that fill and miss the kernel's tiles."""
    g = torch.Generator().manual_seed(out_features)
    linear = linear_with(torch.randn(out_features, 96, generator=g) * 0.1)
    layer = Q4Linear(linear) if kind == "q4_1" else Q8Linear(linear)
    for count in (1, 3, 4, 5, 17):
        x = torch.randn(count, 1, 96, generator=g) * 3  # one position per row: decode
        with torch.inference_mode():
            got = layer(x).reshape(count, out_features)
        want = quantize_activations(x.reshape(count, 96)) @ layer.dequantized().t()
        want = want + linear.bias.detach()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture
def avx2_kernels():
    """Switches the products to the AVX2 kernels; back to the default afterwards."""
    module = kernels()
    if module is None or not module.avx512_available():
        pytest.skip("this CPU has no AVX-512 VNNI kernels to compare")
    yield lambda enabled: module.set_avx512(not enabled)
    module.set_avx512(True)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("out_features", [1, 8, 16, 24, 49, 200])
def test_vnni_kernels_equal_the_avx2_kernels_bit_for_bit(kind, out_features, avx2_kernels):
    """Two row groups per AVX-512 vector and vpdpbusd compute the same integers and the same
    float steps as the AVX2 kernels: odd and even group counts, padded last groups, tiles
    filled and not, weights and activations at the ends of their 8-bit ranges."""
    g = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, 160, generator=g) * 0.1
    weight[:, ::7] *= 20  # blocks whose largest weight sits far from the rest
    layer = (Q4Linear if kind == "q4_1" else Q8Linear)(linear_with(weight))
    layer.prefill_float = False
    for count in (1, 3, 4, 5, 17):
        x = torch.randn(count, 160, generator=g) * 3
        x[:, 5] = -1e3  # the block's activations at -127 and its neighbours near 0
        with torch.inference_mode():
            avx2_kernels(True)
            want = layer(x)
            avx2_kernels(False)
            got = layer(x)
        assert torch.equal(got, want), (kind, out_features, count)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_decode_takes_the_quantised_kernel_and_prefill_the_float_weight(kind):
    weight, _ = q4_1_weight(48, 64, seed=1)
    linear = linear_with(weight)
    layer = Q4Linear(linear) if kind == "q4_1" else Q8Linear(linear)
    g = torch.Generator().manual_seed(2)
    decode = torch.randn(5, 1, 64, generator=g)  # one position per sequence
    prefill = torch.randn(2, 7, 64, generator=g)
    with torch.inference_mode():
        y = layer(decode)
        want = linear(decode)
        assert torch.equal(layer(prefill), linear(prefill))
        set_prefill_float(layer, False)
        prefill_quantised = layer(prefill)
        rows = torch.cat([layer(prefill[:, i : i + 1]) for i in range(7)], dim=1)
    assert y.shape == want.shape and y.dtype == torch.float32
    # 8-bit activations per block of 32: within a percent or so of the float product
    torch.testing.assert_close(y, want, rtol=0.03, atol=0.03 * want.abs().max().item())
    assert not torch.equal(y, want)  # it really is the quantised path
    assert not torch.equal(prefill_quantised, linear(prefill))
    assert torch.equal(prefill_quantised, rows)  # a token's result ignores the batch


def on_a_4bit_grid(model: nn.Module) -> nn.Module:
    """The model with every block linear snapped to a Q4_1-style grid, like the bundled GGUF."""
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(unpack_q4_1(*pack_q4_1(module.weight)))
    return model


def test_quantize_model_replaces_block_linears_and_the_head_only():
    """On a model that is 4-bit at its source, int4 costs only the 8-bit activations."""
    model = on_a_4bit_grid(tiny_llama())
    float_model = on_a_4bit_grid(tiny_llama())
    counts = quantize_model(model)
    assert counts == {"q4_1": 2 * 7, "q8_0": 1, "float": 0}
    assert isinstance(model.lm_head, Q8Linear)
    assert isinstance(model.model.layers[0].mlp.down_proj, Q4Linear)
    assert type(model.model.embed_tokens) is nn.Embedding
    assert torch.equal(model.model.embed_tokens.weight, float_model.model.embed_tokens.weight)
    batch = torch.tensor(prompts(4, seed=3)[3:4] * 2)
    set_prefill_float(model, False)  # measure the quantised kernels on every position
    with torch.inference_mode():
        got = model(batch).logits.log_softmax(-1)
        want = float_model(batch).logits.log_softmax(-1)
    kl = (want.exp() * (want - got)).sum(-1).mean()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert kl < 5e-3 and agree >= 0.9, (kl, agree)


def test_a_layer_whose_scales_overflow_float16_keeps_its_float_weights():
    model = tiny_llama()
    huge = model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        huge.weight[0, 0] = 3e7  # its block's scale is far beyond float16's range
    counts = quantize_model(model)
    assert counts == {"q4_1": 2 * 7 - 1, "q8_0": 1, "float": 1}
    assert model.model.layers[1].mlp.up_proj is huge
    assert isinstance(model.model.layers[1].mlp.down_proj, Q4Linear)


def test_expert_sets_of_the_float_model_fit_the_quantised_one():
    float_model, model = tiny_llama(), tiny_llama()
    quantize_model(model)
    modules = find_target_modules(float_model)
    assert find_target_modules(model) == modules
    assert base_fingerprint(model, modules) == base_fingerprint(float_model, modules)
    other = tiny_llama()
    with torch.no_grad():
        other.model.layers[1].self_attn.v_proj.weight.mul_(2)
    quantize_model(other)
    assert base_fingerprint(other, modules) != base_fingerprint(float_model, modules)


def test_empty_pool_on_quantised_weights_is_bit_exact_and_experts_apply():
    model = tiny_llama()
    quantize_model(model)
    batch = torch.tensor(prompts(3, seed=5)[2:3])
    with torch.inference_mode():
        before = model(batch).logits
        pool = patch_model(model)
        assert torch.equal(model(batch).logits, before)
        pool.add_set("s", random_set(pool, 4, seed=1, gain=5.0))
        after = model(batch).logits
    assert not torch.allclose(after, before)


def test_engine_on_int4_weights_follows_greedy_alone_and_batched():
    """Alone, the engine takes the same kernels as `generate` and matches it token for token.
    Batched, prompts prefill together in float32 (left-padded, other GEMM shapes), and the
    8-bit rounding of activations in front of the kernel can turn last-bit differences into
    a different pick: allowed only where the reference itself was a near tie."""
    model = tiny_llama()
    quantize_model(model)
    engine = Engine(model, eos_token_ids=(), max_context=256)
    engine.start()
    try:
        greedy = SamplingParams(max_tokens=10, temperature=0.0)
        batch = prompts(12, seed=7)
        alone = [tokens(engine.generate(p, greedy)) for p in batch]
        together = [tokens(ev) for ev in run_concurrently(engine, [(p, greedy) for p in batch])]
    finally:
        engine.shutdown()
    identical = 0
    for prompt, got_alone, got_together in zip(batch, alone, together, strict=True):
        want, logits = reference_scores(model, prompt, 10)
        assert got_alone == want
        if got_together == want:
            identical += 1
            continue
        at = next(i for i, (a, b) in enumerate(zip(got_together, want, strict=True)) if a != b)
        top2 = logits[at].topk(2).values
        assert got_together[at] in logits[at].topk(2).indices.tolist()
        assert top2[0] - top2[1] < 0.05 * top2[0].abs(), (at, top2)
    assert identical >= len(batch) - 2


def test_auto_quantises_only_what_was_4bit_at_its_source(tiny_llama_dir):
    cpu = torch.device("cpu")
    assert resolve_weights("auto", tiny_llama_dir, cpu) == "float"
    assert resolve_weights("float", tiny_llama_dir, cpu) == "float"
    assert resolve_weights("int4", tiny_llama_dir, cpu) == "int4"
    with pytest.raises(ValueError, match="int4 weights need an x86-64 CPU"):
        resolve_weights("int4", tiny_llama_dir, torch.device("cuda"))
    marker = {"source": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    (tiny_llama_dir / MARKER_FILENAME).write_text(json.dumps(marker))
    assert resolve_weights("auto", tiny_llama_dir, cpu) == "int4"
    assert resolve_weights("auto", tiny_llama_dir, torch.device("cuda")) == "float"
    assert int4_supported(cpu)


def test_load_causal_lm_serves_int4_from_a_directory(tiny_llama_dir):
    loaded = load_causal_lm(tiny_llama_dir, device="cpu", weights="int4")
    assert loaded.weights == "int4"
    assert isinstance(loaded.model.model.layers[0].self_attn.q_proj, Q4Linear)
    assert load_causal_lm(tiny_llama_dir, device="cpu").weights == "float"
