"""The routing fast path against the per-token reference (Punica-style selection table)."""

from __future__ import annotations

import itertools

import pytest
import torch

from mora_runtime.experts.routing import (
    apply_values,
    effective_top_k,
    mora_delta,
    reference_delta,
    route,
)

D, O = 24, 20


def make_case(dist: str, num_tokens: int, num_experts: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, D, generator=g)
    A = torch.randn(num_experts, D, generator=g) / D**0.5
    B = torch.randn(num_experts, O, generator=g)
    if dist == "all_negative":
        x, A = x.abs(), -A.abs()
    elif dist == "below_threshold":
        # Nearly identical keys: every normalised score sits near 1/sqrt(N), under delta.
        A = torch.ones(num_experts, D) + 0.3 * A
        x = x.abs()
    elif dist == "skewed" and num_experts:
        hot = torch.randperm(num_experts, generator=g)[: max(1, num_experts // 20)]
        A[hot] *= 10.0
    elif dist == "zipf" and num_experts:
        ranks = torch.arange(1, num_experts + 1, dtype=torch.float32)
        A *= (1.0 / ranks).unsqueeze(1) * 5
    return x, A, B


SETTINGS = [  # (top_k, tau, threshold)
    (8, 0.03, 0.2),
    (16, 0.01, 0.2),
    (1, 0.5, 0.0),
    (4, 1.0, -1.0),
]


@pytest.mark.parametrize(
    "num_experts,num_tokens",
    list(itertools.product([0, 1, 2, 16, 160, 1000], [1, 7, 512])),
)
@pytest.mark.parametrize("dist", ["uniform", "skewed", "zipf", "all_negative", "below_threshold"])
def test_fast_path_matches_reference(num_experts, num_tokens, dist):
    if num_tokens == 512 and dist in ("zipf", "below_threshold") and num_experts == 1000:
        num_tokens = 128  # the reference loop is slow; other cases cover T = 512
    x, A, B = make_case(dist, num_tokens, num_experts, seed=num_experts * 7 + num_tokens)
    for (top_k, tau, threshold), training in itertools.product(SETTINGS, [False, True]):
        kwargs = dict(top_k=top_k, tau=tau, threshold=threshold, scale=0.5, training=training)
        got = mora_delta(x, A, B, **kwargs)
        want = reference_delta(x, A, B, **kwargs)
        assert got.shape == (num_tokens, O)
        # float32 rounding grows with the largest output, not with each element's own size
        atol = 1e-4 * max(1.0, want.abs().max().item() / 4)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=atol, msg=f"{kwargs}")


def test_known_regimes_behave_as_specified():
    x, A, B = make_case("all_negative", 16, 160, seed=1)
    pruned = mora_delta(x, A, B, top_k=8, tau=0.03, threshold=0.2)
    assert torch.count_nonzero(pruned) == 0  # every score negative: zero-shot fallback
    assert torch.count_nonzero(mora_delta(x, A, B, top_k=8, tau=0.03, threshold=0.2, training=True))

    x, A, B = make_case("below_threshold", 16, 160, seed=2)
    assert torch.count_nonzero(mora_delta(x, A, B, top_k=8, tau=0.03, threshold=0.2)) == 0


def test_empty_pool_gives_zeros():
    x = torch.randn(5, D)
    out = mora_delta(x, torch.zeros(0, D), torch.zeros(0, O), top_k=8, tau=0.1, threshold=0.2)
    assert out.shape == (5, O) and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("top_k,n,expected", [(8, 1, 1), (1, 10, 2), (0, 10, 2), (8, 5, 5)])
def test_effective_top_k(top_k, n, expected):
    assert effective_top_k(top_k, n) == expected


def test_at_most_floor_inverse_delta_squared_experts_pass():
    # sum(s^2) = 1, so at most floor(1 / delta^2) experts can clear delta.
    x, A, _ = make_case("uniform", 256, 1000, seed=3)
    routing = route(x @ A.t(), top_k=64, tau=0.03, threshold=0.2)
    assert int(routing.active_per_token.max()) <= 25


@pytest.mark.parametrize("num_tokens,threshold", [(1, 0.05), (64, 0.05), (64, 0.9), (300, -1.0)])
def test_value_strategies_agree(num_tokens, threshold):
    x, A, B = make_case("skewed", num_tokens, 640, seed=4)
    routing = route(x @ A.t(), top_k=16, tau=0.03, threshold=threshold)
    dense = apply_values(routing, B, strategy="dense")
    for strategy in ("gather", "auto"):
        got = apply_values(routing, B, strategy=strategy)
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5, msg=strategy)
    with pytest.raises(ValueError):
        apply_values(routing, B, strategy="bogus")


def test_slot_mask_equals_dropping_hidden_experts():
    # Hidden slots must behave exactly as absent ones: norm, top-k and softmax ignore them.
    x, A, B = make_case("uniform", 32, 40, seed=5)
    visible = torch.zeros(40, dtype=torch.bool)
    visible[torch.tensor([0, 3, 4, 9, 10, 11, 30, 39])] = True
    z = x @ A.t()
    routing = route(z, top_k=4, tau=0.1, threshold=0.1, slot_mask=visible.unsqueeze(0))
    got = apply_values(routing, B)
    want = mora_delta(x, A[visible], B[visible], top_k=4, tau=0.1, threshold=0.1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_per_token_settings_equal_separate_runs():
    x, A, B = make_case("uniform", 6, 50, seed=6)
    top_k = torch.tensor([2, 2, 8, 8, 16, 16])
    threshold = torch.tensor([0.0, 0.3, 0.0, 0.3, 0.0, 0.3])
    routing = route(x @ A.t(), top_k=top_k, tau=0.05, threshold=threshold)
    got = apply_values(routing, B)
    for t in range(6):
        want = reference_delta(
            x[t : t + 1], A, B, top_k=int(top_k[t]), tau=0.05, threshold=float(threshold[t])
        )
        torch.testing.assert_close(got[t : t + 1], want, rtol=1e-4, atol=1e-5)


def test_gradients_reach_keys_and_values_in_training():
    x, A, B = make_case("uniform", 8, 16, seed=7)
    A.requires_grad_(True)
    B.requires_grad_(True)
    mora_delta(x, A, B, top_k=4, tau=0.1, threshold=0.2, training=True).sum().backward()
    assert A.grad is not None and torch.count_nonzero(A.grad) > 0
    assert B.grad is not None and torch.count_nonzero(B.grad) > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_cuda_matches_reference(dtype, tol):
    x, A, B = make_case("skewed", 64, 640, seed=8)
    want = reference_delta(x, A, B, top_k=8, tau=0.03, threshold=0.2)
    got = mora_delta(
        x.cuda().to(dtype), A.cuda().to(dtype), B.cuda().to(dtype), top_k=8, tau=0.03, threshold=0.2
    )
    torch.testing.assert_close(got.float().cpu(), want, rtol=tol, atol=tol * 10)
