"""The fused layer kernel (csrc/expert_layer.cpp, the cpu_fused backend) against the tensor
path (`route` + `apply_values`, the torch backend), in float32 and float64."""

from __future__ import annotations

import pytest
import torch

from mora_runtime.cpu.build import kernels, portable_kernels
from mora_runtime.experts.backends import select as select_module
from mora_runtime.experts.backends.cpu_fused import KERNEL_MAX_TOKENS, CpuFusedBackend
from mora_runtime.experts.context import ForwardContext, forward_context
from mora_runtime.experts.patching import patch_model
from mora_runtime.experts.routing import apply_values, route
from tests.experts.test_patching import CAUSAL, build, ids, random_set

# Every test with the kernels' AVX2 paths and with their AVX-512 paths (tests/conftest.py).
pytestmark = [
    pytest.mark.skipif(kernels() is None, reason="needs the AVX2 CPU extension"),
    pytest.mark.usefixtures("kernel_isa"),
]
TAU = 0.05
LIMIT = 256  # the largest budget the kernels take (MORA_MAX_K, csrc/mora_route.h)


def _tensor_path(z, B, *, seq, mask, present, top_k, threshold, scale, valid, tau, num_seqs):
    """The same update through `route` + `apply_values`, with statistics recorded the way
    ForwardContext.record_routing does."""
    token_mask = mask[seq] & present.unsqueeze(0)  # [T, N]
    routing = route(
        z,
        top_k=top_k[seq],
        tau=tau,
        threshold=threshold[seq].to(z.dtype),
        slot_mask=token_mask,
        slot_scale=scale.to(z.dtype),
    )
    hits = torch.zeros(num_seqs, z.shape[1], dtype=torch.long)
    rows = seq.unsqueeze(1).expand_as(routing.slots)
    counted = (routing.active & valid[:, None]).long()
    hits.index_put_((rows, routing.slots), counted, accumulate=True)
    return apply_values(routing, B), routing.active_per_token.int(), hits


def _run_patched(model, pool, batch, snaps, overrides, backend="auto"):
    ctx = ForwardContext(snaps, backend=backend, **overrides)
    with torch.inference_mode(), forward_context(pool, ctx):
        logits = model(batch).logits
    return logits, ctx.collect()


def _case(seed: int, num_tokens: int):
    """A layer's inputs with mixed versions, per-sequence overrides, a partial set and
    padding, as one forward of continuous batching has them."""
    g = torch.Generator().manual_seed(seed)
    num_slots, num_seqs, width, out_features = 48, 4, 40, 24
    x = torch.randn(num_tokens, width, generator=g)
    A = torch.randn(num_slots, width, generator=g) * 0.5
    B = torch.randn(num_slots, out_features, generator=g)
    seq = torch.randint(0, num_seqs, (num_tokens,), generator=g)
    seq[0] = 2  # at least one token of a sequence that sees experts
    mask = torch.rand(num_seqs, num_slots, generator=g) > 0.3
    mask[0] = False  # a sequence that sees nothing: the base output
    return dict(
        x=x,
        A=A,
        B=B,
        seq=seq,
        mask=mask,
        present=torch.rand(num_slots, generator=g) > 0.2,
        top_k=torch.tensor([3, 1, 8, 64]),  # 1 is raised to 2; 64 exceeds what is visible
        threshold=torch.tensor([0.2, -1.0, 0.1, 0.3]),
        valid=torch.rand(num_tokens, generator=g) > 0.2,
        scale=torch.rand(num_slots, generator=g) + 0.5,
        base=torch.randn(num_tokens, out_features, generator=g),
        num_seqs=num_seqs,
    )


def _plan(case: dict, build=kernels, **overrides):
    """The extension's plan for the case (`build`: the AVX2 or the portable build)."""
    kwargs = dict(
        num_tokens=case["x"].shape[0],
        top_k=8,
        threshold=0.2,
        tau=TAU,
        slot_scale=case["scale"],
        kernel_max_tokens=KERNEL_MAX_TOKENS,
        mask=case["mask"],
        seq=case["seq"],
        seq_top_k=case["top_k"],
        seq_threshold=case["threshold"],
        valid=case["valid"],
    )
    kwargs.update(overrides)
    return build().ExpertLayerPlan(**kwargs)


def _outputs(case: dict):
    num_tokens, num_slots = case["x"].shape[0], case["A"].shape[0]
    return (
        case["base"].clone(),
        torch.zeros(num_tokens, dtype=torch.int32),
        torch.zeros(case["num_seqs"], num_slots, dtype=torch.long),
    )


def _reference(case: dict, dtype: torch.dtype = torch.float32, **overrides):
    """The readable tensor path (route + apply_values) on the case, fields overridable."""
    kwargs = dict(
        seq=case["seq"],
        mask=case["mask"],
        present=case["present"],
        top_k=case["top_k"],
        threshold=case["threshold"],
        scale=case["scale"],
        valid=case["valid"],
        tau=TAU,
        num_seqs=case["num_seqs"],
    )
    kwargs.update(overrides)
    x, A, B = (case[k].to(dtype) for k in ("x", "A", "B"))
    return _tensor_path(x @ A.t(), B, **kwargs)


# 1 and 16: the score kernel (a decode step); 100: past KERNEL_MAX_TOKENS, at::mm (prefill).
@pytest.mark.parametrize("num_tokens", [1, 16, 37, 100])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("build", [kernels, portable_kernels], ids=["avx2", "portable"])
def test_plan_equals_the_tensor_path(num_tokens, seed, build):
    """The portable build (no AVX2: scores through at::mm) holds to the same."""
    case = _case(seed, num_tokens)
    y, active, hits = _outputs(case)
    with torch.inference_mode():
        assert _plan(case, build).apply(
            case["x"], case["A"], case["B"], y, case["present"], active[None], 0, hits
        )
    # The same routing decisions and statistics as the float32 tensor path; the update
    # within float error of it, and closer still to the same path in float64.
    want, want_active, want_hits = _reference(case)
    torch.testing.assert_close(y - case["base"], want, rtol=1e-4, atol=1e-4)
    assert torch.equal(active, want_active)
    assert torch.equal(hits, want_hits)
    assert want_active.sum() > 0 and (active[case["seq"] == 0] == 0).all()
    want64, active64, hits64 = _reference(case, torch.float64)
    assert torch.equal(active, active64) and torch.equal(hits, hits64)
    torch.testing.assert_close((y - case["base"]).double(), want64, rtol=1e-5, atol=1e-5)


def test_batched_and_strided_inputs_and_one_row_of_a_recording_buffer():
    """x and y as a model hands them over ([B, L, D], x possibly strided), and the counts
    written into the given row of an [L, T] buffer only: the same as the flat call."""
    case = _case(5, 12)
    y_flat, active_flat, hits_flat = _outputs(case)
    y, _, hits = _outputs(case)
    buffer = torch.full((4, 12), -7, dtype=torch.int32)
    x3 = case["x"].reshape(3, 4, -1)
    x_strided = x3.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not x_strided.is_contiguous()
    with torch.inference_mode():
        assert _plan(case).apply(
            case["x"],
            case["A"],
            case["B"],
            y_flat,
            case["present"],
            active_flat[None],
            0,
            hits_flat,
        )
        y3 = y.view(3, 4, -1)
        assert _plan(case).apply(
            x_strided, case["A"], case["B"], y3, case["present"], buffer, 2, hits
        )
    torch.testing.assert_close(y, y_flat, rtol=0, atol=0)
    assert torch.equal(buffer[2], active_flat) and active_flat.sum() > 0
    assert (buffer[[0, 1, 3]] == -7).all()
    assert torch.equal(hits, hits_flat)
    y_bad, _, hits = _outputs(case)
    with pytest.raises(RuntimeError, match="row inside it"):
        _plan(case).apply(case["x"], case["A"], case["B"], y_bad, None, buffer, 4, hits)
    with pytest.raises(RuntimeError, match="y must be a contiguous"):
        _plan(case).apply(case["x"], case["A"], case["B"], y_bad.t(), None, None, 0, None)
    assert torch.equal(y_bad, case["base"])  # refused before writing


def test_unrecorded_counts_and_one_shared_mask_row():
    case = _case(7, 16)
    y, _, _ = _outputs(case)
    shared = case["mask"][1:2]  # [1, N]: every token sees the same slots
    plan = _plan(case, mask=shared, seq=None, seq_top_k=None, seq_threshold=None, valid=None)
    with torch.inference_mode():
        assert plan.apply(case["x"], case["A"], case["B"], y, None, None, 0, None)
    want, _, _ = _reference(
        case,
        seq=torch.zeros(16, dtype=torch.long),
        mask=shared,
        present=torch.ones(48, dtype=torch.bool),
        top_k=torch.tensor([8]),
        threshold=torch.tensor([0.2]),
        valid=torch.ones(16, dtype=torch.bool),
        num_seqs=1,
    )
    torch.testing.assert_close(y - case["base"], want, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(want) > 0


def test_one_shared_mask_row_with_several_sequences():
    """Every sequence at one version (one mask row) but with overrides of its own."""
    case = _case(11, 20)
    y, active, hits = _outputs(case)
    shared = case["mask"][2:3]  # [1, N]
    with torch.inference_mode():
        assert _plan(case, mask=shared).apply(
            case["x"], case["A"], case["B"], y, None, active[None], 0, hits
        )
    want, want_active, want_hits = _reference(
        case,
        mask=shared.expand(case["num_seqs"], -1),
        present=torch.ones(48, dtype=torch.bool),
    )
    torch.testing.assert_close(y - case["base"], want, rtol=1e-4, atol=1e-4)
    assert torch.equal(active, want_active) and torch.equal(hits, want_hits)
    assert want_active.sum() > 0


def test_sequence_ids_beyond_the_per_sequence_tensors_raise():
    case = _case(2, 6)
    case["seq"][3] = case["num_seqs"]  # one sequence too many
    with pytest.raises(RuntimeError, match="beyond the per-sequence tensors"):
        _plan(case)
    case = _case(2, 6)
    y, active, hits = _outputs(case)
    with pytest.raises(RuntimeError, match="hits must be"):
        _plan(case).apply(case["x"], case["A"], case["B"], y, None, active[None], 0, hits[:2])


def test_a_budget_over_the_limit_is_refused_before_anything_is_written():
    limit = LIMIT
    g = torch.Generator().manual_seed(0)
    num_slots = limit + 10
    x, A = torch.randn(3, 16, generator=g), torch.randn(num_slots, 16, generator=g)
    B = torch.randn(num_slots, 8, generator=g)
    # Token 0's sequence fits; the last token's does not: nothing may be half-written.
    plan = kernels().ExpertLayerPlan(
        num_tokens=3,
        top_k=4,
        threshold=0.0,
        tau=1.0,
        slot_scale=torch.ones(num_slots),
        kernel_max_tokens=64,
        mask=None,
        seq=torch.tensor([0, 0, 1]),
        seq_top_k=torch.tensor([4, limit + 1]),
        seq_threshold=None,
        valid=None,
    )
    assert not plan.accepts(num_slots)
    assert plan.accepts(limit)  # k_eff is clamped to N
    y = torch.zeros(3, 8)
    with torch.inference_mode():
        assert not plan.apply(x, A, B, y, None, None, 0, None)
    assert torch.count_nonzero(y) == 0


def test_mismatched_shapes_raise():
    case = _case(1, 5)
    y, active, hits = _outputs(case)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        narrow = case["x"][:, :-1].contiguous()
        _plan(case).apply(narrow, case["A"], case["B"], y, None, active[None], 0, hits)
    with pytest.raises(RuntimeError, match="one entry per token"):
        _plan(case, num_tokens=6)
    with pytest.raises(RuntimeError, match="hits must be"):
        _plan(case).apply(case["x"], case["A"], case["B"], y, None, active[None], 0, hits[:, :-1])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_patched_models_route_every_layer_through_the_plan(name, monkeypatch):
    """Mixed versions, a partial set and overrides in one forward: every adapted layer takes
    the fused call; logits match the torch backend's and statistics equal them."""
    model = build(CAUSAL[name])
    pool = patch_model(model, routing=None)
    pool.add_set("a", random_set(pool, 4, seed=1, gain=3.0))
    old = pool.latest()
    partial = random_set(pool, 4, seed=2, gain=3.0)
    pool.add_set("b", dict(list(partial.items())[: len(partial) // 2]))
    new = pool.latest()
    batch = ids(batch=3, length=11)
    snaps = [old, new, new]
    overrides = dict(top_k=[2, 8, 3], threshold=[0.0, 0.1, -1.0])

    calls = []
    real_apply = CpuFusedBackend.apply

    def counting(self, x, y, layer):
        calls.append(layer.path)
        return real_apply(self, x, y, layer)

    with monkeypatch.context() as patched:
        patched.setattr(CpuFusedBackend, "apply", counting)
        logits_fused, stats_fused = _run_patched(model, pool, batch, snaps, overrides)
        logits_torch, stats_torch = _run_patched(model, pool, batch, snaps, overrides, "torch")
    assert sorted(calls) == sorted(pool.layers)  # every layer once, and only auto
    torch.testing.assert_close(logits_fused, logits_torch, rtol=1e-4, atol=1e-4)
    assert stats_fused == stats_torch
    assert stats_fused.total().active_ranks > 0
    assert set(stats_fused.sequences[1].set_activations) == {"a", "b"}
    assert set(stats_fused.sequences[0].set_activations) <= {"a"}  # old version: no "b"


def test_a_forward_whose_budget_exceeds_the_kernel_takes_the_tensor_path(monkeypatch):
    """A per-request top_k over the kernels' limit: the selector refuses the extension once
    for the whole forward, and the output is the torch backend's (statistics recorded once
    per layer)."""
    model = build(CAUSAL["llama"])
    pool = patch_model(model, routing=None, capacity=LIMIT + 16)
    pool.add_set("big", random_set(pool, LIMIT + 8, seed=3, gain=3.0))
    snaps = [pool.latest(), pool.latest()]
    overrides = dict(top_k=[4, LIMIT + 1], threshold=[0.0, 0.0])
    batch = ids(batch=2, length=5)

    chosen = []
    real = select_module.select_backend

    def spy(spec, backend="auto"):
        plan = real(spec, backend)
        chosen.append(plan.name)
        return plan

    monkeypatch.setattr(select_module, "select_backend", spy)
    logits, stats = _run_patched(model, pool, batch, snaps, overrides)
    assert chosen == ["torch"]
    want_logits, want_stats = _run_patched(model, pool, batch, snaps, overrides, "torch")
    assert torch.equal(logits, want_logits)
    assert stats == want_stats
    layers = len(pool.layers)
    assert stats.total().observations == 2 * 5 * layers  # one row per layer, none twice
