"""The CPU kernels of the compact Llama forward (csrc/llama_ops.cpp) against HF's modules
and torch's ops, on strided inputs like the fused products' slices."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from mora_runtime.cpu.build import kernels

pytestmark = pytest.mark.skipif(kernels() is None, reason="needs the AVX2 CPU kernels")


def test_rms_norm_equals_hf():
    g = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5)
    norm.weight.data = torch.randn(96, generator=g)
    x = torch.randn(3, 5, 96, generator=g) * 4
    got = kernels().rms_norm(x, norm.weight.detach(), 1e-5)
    torch.testing.assert_close(got, norm(x).detach(), rtol=1e-5, atol=1e-5)


def test_rope_in_place_equals_hf_on_slices_of_a_fused_output():
    g = torch.Generator().manual_seed(1)
    n, p, heads, kv_heads, dim = 2, 3, 4, 2, 16
    fused = torch.randn(n, p, (heads + 2 * kv_heads) * dim, generator=g)
    q, k, _ = fused.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k = q.view(n, p, heads, dim), k.view(n, p, kv_heads, dim)
    angles = torch.rand(n, p, dim // 2, generator=g) * 6
    cos = torch.cat([angles, angles], -1).cos()
    sin = torch.cat([angles, angles], -1).sin()
    want_q, want_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    untouched = fused[..., (heads + kv_heads) * dim :].clone()
    kernels().rope_(q, k, cos, sin)
    torch.testing.assert_close(q, want_q.transpose(1, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k, want_k.transpose(1, 2), rtol=1e-5, atol=1e-6)
    assert torch.equal(fused[..., (heads + kv_heads) * dim :], untouched)  # v is not rotated


def test_silu_mul_equals_torch_on_strided_halves():
    g = torch.Generator().manual_seed(2)
    gate_up = torch.randn(7, 2 * 40, generator=g) * 5
    gate, up = gate_up.split(40, dim=-1)
    got = kernels().silu_mul(gate, up)
    torch.testing.assert_close(got, torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-6)
    assert got.is_contiguous()


def test_wrong_inputs_are_refused():
    with pytest.raises(RuntimeError, match="float32"):
        kernels().rms_norm(torch.ones(2, 4, dtype=torch.float64), torch.ones(4), 1e-5)
    with pytest.raises(RuntimeError, match="unit stride"):
        kernels().silu_mul(torch.ones(4, 3).t(), torch.ones(4, 3).t())


def test_add_rms_norm_adds_the_residual_in_place_then_normalises():
    g = torch.Generator().manual_seed(3)
    norm = LlamaRMSNorm(64, eps=1e-6)
    norm.weight.data = torch.randn(64, generator=g)
    hidden, delta = torch.randn(2, 3, 64, generator=g), torch.randn(2, 3, 64, generator=g)
    want_hidden = hidden + delta
    got = kernels().add_rms_norm_(hidden, delta, norm.weight.detach(), 1e-6)
    torch.testing.assert_close(hidden, want_hidden, rtol=0, atol=0)
    torch.testing.assert_close(got, norm(want_hidden).detach(), rtol=1e-5, atol=1e-5)
