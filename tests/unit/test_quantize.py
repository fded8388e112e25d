"""Weight-only int4/int8 layers for CPU serving, on tiny models built from configs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mora_runtime.engine import Engine
from mora_runtime.expert_set import base_fingerprint
from mora_runtime.lm import load_causal_lm, resolve_weights
from mora_runtime.materialize import MARKER_FILENAME
from mora_runtime.patching import find_target_modules, patch_model
from mora_runtime.quantize import (
    GROUP_SIZE,
    Int4Linear,
    Int8Linear,
    int4_supported,
    quantize_int4,
    quantize_model,
    set_prefill_float,
)
from mora_runtime.sampling import SamplingParams

from .test_engine import prompts, run_concurrently, tiny_llama, tokens
from .test_patching import random_set


def q4_1_weight(out_features: int, in_features: int, seed: int = 0):
    """A weight on a Q4_1 grid (per 32 inputs: fp16 scale d and minimum m, w = d * q + m)."""
    g = torch.Generator().manual_seed(seed)
    groups = in_features // GROUP_SIZE
    d = (torch.rand(out_features, groups, generator=g) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(out_features, groups, generator=g) * 0.1).half().float()
    q = torch.randint(0, 16, (out_features, groups, GROUP_SIZE), generator=g)
    q[..., 0], q[..., 1] = 0, 15  # Q4_1 maps each block's minimum to 0 and maximum to 15
    weight = (d[..., None] * q + m[..., None]).reshape(out_features, in_features)
    return weight, q.reshape(out_features, in_features)


def linear_with(weight: torch.Tensor, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def test_int4_brings_a_q4_1_grid_back_exactly():
    weight, q = q4_1_weight(32, 96)
    got_q, scale, minimum = quantize_int4(weight)
    assert torch.equal(got_q, q.int())
    groups = weight.reshape(32, 3, GROUP_SIZE)
    torch.testing.assert_close(minimum, groups.amin(-1), rtol=0, atol=0)
    torch.testing.assert_close(scale, (groups.amax(-1) - groups.amin(-1)) / 15)
    # The kernel keeps scales and zero points (and returns outputs) in bfloat16: the grid
    # comes back up to that rounding (8 significant bits).
    err = (Int4Linear(linear_with(weight)).dequantized() - weight).abs().max()
    assert err <= 2**-6 * weight.abs().max()


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_decode_takes_the_quantised_kernel_and_prefill_the_float_weight(kind):
    weight, _ = q4_1_weight(48, 64, seed=1)
    linear = linear_with(weight)
    layer = Int4Linear(linear) if kind == "int4" else Int8Linear(linear)
    g = torch.Generator().manual_seed(2)
    decode = torch.randn(5, 1, 64, generator=g)  # one position per sequence
    prefill = torch.randn(2, 7, 64, generator=g)
    with torch.inference_mode():
        y = layer(decode)
        want = linear(decode)
        assert torch.equal(layer(prefill), linear(prefill))
        set_prefill_float(layer, False)
        prefill_quantised = layer(prefill)
    assert y.shape == want.shape and y.dtype == torch.float32
    # bfloat16 inputs and outputs: about 3 significant digits
    torch.testing.assert_close(y, want, rtol=0.03, atol=0.03 * want.abs().max().item())
    assert not torch.equal(y, want)  # it really is the quantised path
    assert not torch.equal(prefill_quantised, linear(prefill))
    rows = torch.cat([layer(prefill[:, i : i + 1]) for i in range(7)], dim=1)
    assert torch.equal(prefill_quantised, rows)  # the kernels are batch-invariant


def on_a_4bit_grid(model: nn.Module) -> nn.Module:
    """The model with every block linear snapped to a Q4_1-style grid, like the bundled GGUF."""
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, nn.Linear):
                q, scale, minimum = quantize_int4(module.weight)
                grid = q.reshape(*scale.shape, GROUP_SIZE) * scale[..., None] + minimum[..., None]
                module.weight.copy_(grid.reshape(module.weight.shape))
    return model


def test_quantize_model_replaces_block_linears_and_the_head_only():
    """On a model that is 4-bit at its source, int4 costs only bfloat16 rounding."""
    model = on_a_4bit_grid(tiny_llama())
    float_model = on_a_4bit_grid(tiny_llama())
    counts = quantize_model(model)
    assert counts == {"int4": 2 * 7, "int8": 1, "float": 0}
    assert isinstance(model.lm_head, Int8Linear)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)
    assert type(model.model.embed_tokens) is nn.Embedding
    assert torch.equal(model.model.embed_tokens.weight, float_model.model.embed_tokens.weight)
    batch = torch.tensor(prompts(4, seed=3)[3:4] * 2)
    set_prefill_float(model, False)  # measure the quantised kernels on every position
    with torch.inference_mode():
        got = model(batch).logits.log_softmax(-1)
        want = float_model(batch).logits.log_softmax(-1)
    kl = (want.exp() * (want - got)).sum(-1).mean()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert kl < 1e-3 and agree >= 0.9, (kl, agree)


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


def reference_scores(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """HF greedy tokens and the logits [n, V] each was picked from."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, len(prompt) :].tolist(), torch.cat(out.logits)


def test_engine_on_int4_weights_follows_greedy_alone_and_batched():
    """Alone, the engine takes the same kernels as `generate` and matches it token for token.
    Batched, prompts prefill together in float32 (left-padded, other GEMM shapes), and the
    bfloat16 rounding in front of the int4 kernel can turn last-bit differences into a
    different pick: allowed only where the reference itself was a near tie."""
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
    with pytest.raises(ValueError, match="int4 weights need a CPU"):
        resolve_weights("int4", tiny_llama_dir, torch.device("cuda"))
    marker = {"source": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    (tiny_llama_dir / MARKER_FILENAME).write_text(json.dumps(marker))
    assert resolve_weights("auto", tiny_llama_dir, cpu) == "int4"
    assert resolve_weights("auto", tiny_llama_dir, torch.device("cuda")) == "float"
    assert int4_supported(cpu)


def test_load_causal_lm_serves_int4_from_a_directory(tiny_llama_dir):
    loaded = load_causal_lm(tiny_llama_dir, device="cpu", weights="int4")
    assert loaded.weights == "int4"
    assert isinstance(loaded.model.model.layers[0].self_attn.q_proj, Int4Linear)
    assert load_causal_lm(tiny_llama_dir, device="cpu").weights == "float"
