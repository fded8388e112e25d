"""The decode-step attention kernel against a readable reference, and as a model's attention."""

from __future__ import annotations

import pytest
import torch

from mora_runtime.cpu.build import kernels
from mora_runtime.engine.core import Engine
from mora_runtime.engine.params import SamplingParams
from mora_runtime.models import decode_attention
from tests.engine.test_engine import VOCAB, prompts, run_concurrently, tiny_llama, tokens


def reference(q, k, v, mask, scale):
    """q [B, H, d], k/v [B, KH, L, d], mask [B, L] bool or None -> [B, H, d], step by step."""
    batch, heads, _ = q.shape
    group = heads // k.shape[1]
    out = torch.empty_like(q)
    for b in range(batch):
        for h in range(heads):
            keys, values = k[b, h // group], v[b, h // group]  # [L, d]
            scores = (keys @ q[b, h]) * scale  # [L]
            if mask is not None:
                scores = scores.masked_fill(~mask[b], float("-inf"))
            out[b, h] = torch.softmax(scores, dim=0) @ values
    return out


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"), [(4, 2, 16), (9, 3, 64), (2, 2, 72), (6, 1, 8)]
)
@pytest.mark.parametrize("length", [1, 7, 33])
def test_kernel_computes_its_reference(heads, kv_heads, dim, length):
    g = torch.Generator().manual_seed(length * 100 + dim)
    batch = 5
    q = torch.randn(batch, heads, dim, generator=g)
    # Views into a larger buffer, as the engine's cache hands them over.
    k = torch.randn(batch, kv_heads, length + 9, dim, generator=g)[:, :, 3 : 3 + length]
    v = torch.randn(batch, kv_heads, length + 9, dim, generator=g)[:, :, 3 : 3 + length]
    mask = torch.rand(batch, length, generator=g) > 0.3
    mask[:, -1] = True  # every row attends to at least its own token
    scale = dim**-0.5
    for m in (mask, None):
        empty = torch.empty(0, dtype=torch.bool)
        got = kernels().decode_attention(q, k, v, empty if m is None else m, scale)
        torch.testing.assert_close(got, reference(q, k, v, m, scale), rtol=1e-5, atol=1e-6)


def test_kernel_masks_exactly_and_refuses_bad_shapes():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 16, generator=g)
    k, v = torch.randn(2, 2, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g)
    mask = torch.tensor([[False, False, True, True, True]] * 2)
    huge = k.clone()
    huge[:, :, :2] = 1e30  # masked columns must not count, whatever they hold
    got = kernels().decode_attention(q, huge, v, mask, 0.25)
    torch.testing.assert_close(got, reference(q, k, v, mask, 0.25), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="mask must be"):
        kernels().decode_attention(q, k, v, mask[:, :4].contiguous(), 0.25)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        kernels().decode_attention(q[..., :12].contiguous(), k[..., :12], v[..., :12], mask, 1.0)


def test_installed_model_matches_sdpa_and_falls_back_off_the_decode_path():
    """Prefill and training keep SDPA (bit-identical); decode steps agree to rounding."""
    reference_model, model = tiny_llama(), tiny_llama()
    assert decode_attention.install(model)
    assert model.config._attn_implementation == decode_attention.NAME
    batch = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    width = batch.shape[1]
    with torch.inference_mode():
        want = reference_model(batch, use_cache=True)
        got = model(batch, use_cache=True)
        assert torch.equal(got.logits, want.logits)  # prefill: SDPA itself
        step = torch.tensor([[5], [6], [7]])
        mask = torch.ones(3, width + 1, dtype=torch.long)
        mask[0, 0] = 0  # a padded column in one row
        args = dict(input_ids=step, attention_mask=mask, use_cache=True)
        want_step = reference_model(cache=want.cache, **args).logits
        got_step = model(cache=got.cache, **args).logits
    assert not torch.equal(got_step, want_step)  # it really is another kernel
    torch.testing.assert_close(got_step, want_step, rtol=1e-4, atol=1e-4)
    # With gradients (training), one-token forwards stay on SDPA.
    one = torch.tensor([[5], [6], [7]])  # outside inference mode
    got_grad = model(one, use_cache=False).logits
    assert torch.equal(got_grad, reference_model(one, use_cache=False).logits)
    got_grad.sum().backward()  # SDPA has a backward; the kernel would not


def test_engine_with_the_kernel_follows_greedy_alone_and_batched():
    model = tiny_llama()
    decode_attention.install(model)
    engine = Engine(model, eos_token_ids=(), max_context=256)
    engine.start()
    try:
        greedy = SamplingParams(max_tokens=12, temperature=0.0)
        batch = prompts(8, seed=4)
        together = [tokens(ev) for ev in run_concurrently(engine, [(p, greedy) for p in batch])]
        alone = [tokens(engine.generate(p, greedy)) for p in batch]
    finally:
        engine.shutdown()
    with torch.inference_mode():
        for prompt, got in zip(batch, alone, strict=True):
            ids = torch.tensor([prompt])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=12,
                min_new_tokens=12,
                do_sample=False,
                pad_token_id=0,
            )
            assert got == out[0, len(prompt) :].tolist()
    assert sum(a == b for a, b in zip(alone, together, strict=True)) >= len(batch) - 1
