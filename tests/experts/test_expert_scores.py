"""The expert-score kernel (every key against every token) against the plain product: the
tiles the fused layer call (csrc/expert_layer.cpp) scores a decode step with."""

from __future__ import annotations

import pytest
import torch

from mora_runtime.cpu.build import kernels


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 7, 16, 17])
@pytest.mark.parametrize(("slots", "width"), [(1, 8), (5, 64), (160, 576), (9, 20), (6, 40)])
def test_kernel_computes_the_product(tokens, slots, width, kernel_isa):
    """Every tile shape and tail, with either instruction set: keys not a multiple of 4,
    tokens not of 3 or 4, D not of 8 or of 16."""
    g = torch.Generator().manual_seed(tokens * 1000 + slots)
    x = torch.randn(tokens, width, generator=g)
    keys = torch.randn(slots, width, generator=g)
    want = (x.double() @ keys.double().t()).float()
    got = kernels().expert_scores(x, keys)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * width**0.5)


def test_kernel_refuses_mismatched_inputs():
    with pytest.raises(RuntimeError, match="same D"):
        kernels().expert_scores(torch.zeros(2, 8), torch.zeros(3, 16))
    with pytest.raises(RuntimeError, match="float32"):
        kernels().expert_scores(torch.zeros(2, 8, dtype=torch.float64), torch.zeros(3, 8))
