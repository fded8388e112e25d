"""The native routing kernel (csrc/mora_route.c) against the reference and the tensor path."""

from __future__ import annotations

import itertools

import pytest
import torch

from mora_runtime import native
from mora_runtime.context import ForwardContext
from mora_runtime.experts import apply_values, mora_delta, reference_delta, route
from mora_runtime.patching import forward_context, patch_model

from .test_experts import SETTINGS, make_case
from .test_patching import CAUSAL, build, ids, random_set


@pytest.mark.parametrize(
    "num_experts,num_tokens", list(itertools.product([1, 2, 16, 160, 1000], [1, 7, 64]))
)
@pytest.mark.parametrize("dist", ["uniform", "skewed", "zipf", "all_negative", "below_threshold"])
def test_kernel_matches_reference(num_experts, num_tokens, dist):
    x, A, B = make_case(dist, num_tokens, num_experts, seed=num_experts * 3 + num_tokens)
    for top_k, tau, threshold in SETTINGS:
        kwargs = dict(top_k=top_k, tau=tau, threshold=threshold, scale=0.5)
        got = mora_delta(x, A, B, kernel="native", **kwargs)
        want = reference_delta(x, A, B, **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"{kwargs}")


def _tensor_path(z, B, *, seq, mask, present, top_k, threshold, scale, valid, tau, num_seqs):
    """The same update through `route` + `apply_values`, with statistics recorded the way
    ForwardContext.record_routing does."""
    token_mask = mask[seq] & present.unsqueeze(0)  # [T, N]
    routing = route(
        z,
        top_k=top_k[seq],
        tau=tau,
        threshold=threshold[seq],
        slot_mask=token_mask,
        slot_scale=scale,
    )
    hits = torch.zeros(num_seqs, z.shape[1], dtype=torch.long)
    rows = seq.unsqueeze(1).expand_as(routing.slots)
    counted = (routing.active & valid[:, None]).long()
    hits.index_put_((rows, routing.slots), counted, accumulate=True)
    return apply_values(routing, B), routing.active_per_token.int(), hits


@pytest.mark.parametrize("seed", range(6))
def test_kernel_matches_tensor_path_with_versions_overrides_and_absent_slots(seed):
    g = torch.Generator().manual_seed(seed)
    num_tokens, num_slots, num_seqs, out_features = 37, 48, 4, 20
    z = torch.randn(num_tokens, num_slots, generator=g) * 3  # [T, N]
    B = torch.randn(num_slots, out_features, generator=g)
    seq = torch.randint(0, num_seqs, (num_tokens,), generator=g)
    mask = torch.rand(num_seqs, num_slots, generator=g) > 0.3  # versions see different slots
    mask[0] = False  # a sequence that sees nothing: the base output
    present = torch.rand(num_slots, generator=g) > 0.2  # a partial set skips this layer
    top_k = torch.tensor([3, 1, 8, 64])  # 1 is raised to 2; 64 exceeds what is visible
    threshold = torch.tensor([0.2, -1.0, 0.1, 0.3])
    valid = torch.rand(num_tokens, generator=g) > 0.2  # padding is computed, not counted
    scale = torch.rand(num_slots, generator=g) + 0.5
    tau = 0.05

    want, want_active, want_hits = _tensor_path(
        z,
        B,
        seq=seq,
        mask=mask,
        present=present,
        top_k=top_k,
        threshold=threshold,
        scale=scale,
        valid=valid,
        tau=tau,
        num_seqs=num_seqs,
    )
    args = native.ForwardArgs(
        top_k=8,
        threshold=0.2,
        tau=tau,
        slot_scale=scale,
        scratch=torch.empty(num_tokens, dtype=torch.int32),
        mask=mask,
        seq=seq,
        seq_top_k=top_k,
        seq_threshold=threshold,
        valid=valid,
    )
    base = torch.randn(num_tokens, out_features, generator=g)
    y = base.clone()
    active = torch.zeros(num_tokens, dtype=torch.int32)
    hits = torch.zeros(num_seqs, num_slots, dtype=torch.long)
    assert args.apply(z, B, y, present=present, active=active, hits=hits)
    torch.testing.assert_close(y - base, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(active, want_active)
    assert torch.equal(hits, want_hits)
    assert want_active.sum() > 0 and (active[seq == 0] == 0).all()


def test_strided_output_rows_are_updated_in_place():
    x, A, B = make_case("uniform", 5, 16, seed=3)
    z = x @ A.t()
    wide = torch.zeros(5, 2 * B.shape[1])
    view = wide[:, : B.shape[1]]  # row stride 2*O
    args = native.ForwardArgs(
        top_k=4,
        threshold=0.0,
        tau=0.5,
        slot_scale=torch.ones(16),
        scratch=torch.empty(5, dtype=torch.int32),
    )
    assert args.apply(z, B, view)
    want = reference_delta(x, A, B, top_k=4, tau=0.5, threshold=0.0)
    torch.testing.assert_close(view, want, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(wide[:, B.shape[1] :]) == 0


def test_budget_over_the_kernel_limit_is_refused_and_changes_nothing():
    limit = native.max_top_k()
    x, A, B = make_case("uniform", 3, limit + 10, seed=4)
    z = x @ A.t()
    y = torch.zeros(3, B.shape[1])
    args = native.ForwardArgs(
        top_k=limit + 1,
        threshold=0.0,
        tau=1.0,
        slot_scale=torch.ones(limit + 10),
        scratch=torch.empty(3, dtype=torch.int32),
    )
    assert not args.apply(z, B, y)
    assert torch.count_nonzero(y) == 0
    # mora_delta falls back to the tensor path for such budgets
    got = mora_delta(x, A, B, top_k=limit + 1, tau=1.0, threshold=0.0)
    want = reference_delta(x, A, B, top_k=limit + 1, tau=1.0, threshold=0.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_one_sequence_over_the_limit_refuses_the_whole_call_before_writing():
    # Token 0's sequence fits the kernel; the last token's does not. A refusal found only at
    # the last token would leave the first ones updated and the caller's fallback would add
    # their delta a second time.
    limit = native.max_top_k()
    x, A, B = make_case("uniform", 3, limit + 10, seed=5)
    z = x @ A.t()
    y = torch.zeros(3, B.shape[1])
    args = native.ForwardArgs(
        top_k=4,
        threshold=0.0,
        tau=1.0,
        slot_scale=torch.ones(limit + 10),
        scratch=torch.empty(3, dtype=torch.int32),
        seq=torch.tensor([0, 0, 1]),
        seq_top_k=torch.tensor([4, limit + 1]),
    )
    assert not args.apply(z, B, y)
    assert torch.count_nonzero(y) == 0


def _run_patched(model, pool, batch, snaps, overrides):
    ctx = ForwardContext(snaps, **overrides)
    with torch.inference_mode(), forward_context(pool, ctx):
        logits = model(batch).logits
    return logits, ctx.collect()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_patched_model_agrees_with_and_without_the_kernel(name, monkeypatch):
    """Mixed versions, a partial set and per-sequence overrides in one forward: the logits and
    every routing statistic are the same through the kernel and through tensors."""
    model = build(CAUSAL[name])
    pool = patch_model(model, routing=None)
    pool.add_set("a", random_set(pool, 4, seed=1, gain=3.0))
    old = pool.latest()
    partial = random_set(pool, 4, seed=2, gain=3.0)
    partial = dict(list(partial.items())[: len(partial) // 2])
    pool.add_set("b", partial)
    new = pool.latest()
    batch = ids(batch=3, length=11)
    snaps = [old, new, new]
    overrides = dict(top_k=[2, 8, 3], threshold=[0.0, 0.1, -1.0])

    monkeypatch.setenv(native.DISABLE_ENV, "1")
    native.refresh()
    assert native.available()
    logits_native, stats_native = _run_patched(model, pool, batch, snaps, overrides)
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    native.refresh()
    assert not native.available()
    logits_tensor, stats_tensor = _run_patched(model, pool, batch, snaps, overrides)
    monkeypatch.undo()
    native.refresh()

    torch.testing.assert_close(logits_native, logits_tensor, rtol=1e-4, atol=1e-4)
    assert stats_native == stats_tensor
    assert stats_native.total().active_ranks > 0
    assert set(stats_native.sequences[1].set_activations) == {"a", "b"}
    assert set(stats_native.sequences[0].set_activations) <= {"a"}  # old version: no "b"


def test_build_is_cached_per_source(tmp_path, monkeypatch):
    monkeypatch.setenv("MORA_CACHE", str(tmp_path))
    first = native.build()
    assert first is not None and first.is_file() and str(first).startswith(str(tmp_path))
    stamp = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == stamp  # not rebuilt
