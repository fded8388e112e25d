"""The Triton layer backend on CPU, under triton's interpreter (TRITON_INTERPRET=1), in float32:
against the float64 reference, with per-sequence visible slots and overrides, with the same
statistics as the tensor path, and never chosen by "auto" on a CPU."""

from __future__ import annotations

import itertools

import pytest
import torch

from mora_runtime.cpu import build as cpu_kernels
from mora_runtime.experts.backends import select as select_module
from mora_runtime.experts.backends.base import BackendUnavailable, ForwardSpec
from mora_runtime.experts.backends.select import select_backend
from mora_runtime.experts.backends.torch_backend import TorchBackend
from mora_runtime.experts.backends.triton_backend import TritonBackend
from mora_runtime.experts.context import ForwardContext
from mora_runtime.experts.routing import mora_delta, reference_delta
from mora_runtime.experts.slots import ExpertSetEntry, PoolSnapshot, RoutingConfig
from tests.experts.test_backends import _spec
from tests.experts.test_routing import SETTINGS, make_case

pytest.importorskip("triton")

DISTRIBUTIONS = ["uniform", "skewed", "zipf", "all_negative", "below_threshold"]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    """The kernel is decorated per interpreter mode at its first launch in that mode, so
    setting the variable here (before any launch) is enough."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(select_module.BACKEND_ENV, raising=False)


@pytest.mark.parametrize("num_experts,num_tokens", list(itertools.product([1, 2, 16, 40], [1, 7])))
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_triton_matches_the_float64_reference(dist, num_experts, num_tokens):
    x, A, B = make_case(dist, num_tokens, num_experts, seed=num_experts * 3 + num_tokens)
    for top_k, tau, threshold in SETTINGS:
        kwargs = dict(top_k=top_k, tau=tau, threshold=threshold, scale=0.5)
        with torch.inference_mode():
            got = mora_delta(x, A, B, backend="triton", **kwargs)
        want = reference_delta(x.double(), A.double(), B.double(), **kwargs)
        assert got.dtype == torch.float32 and got.shape == (num_tokens, B.shape[1])
        atol = 1e-4 * max(1.0, want.abs().max().item() / 4)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=atol, msg=f"{kwargs}")


class _Layer:
    path = "model.layers.0.q_proj"
    kind = "q_proj"

    def __init__(self, A, B, present):
        self._weights = (A, B, present)

    def weights(self, num_slots):
        return self._weights


def _entries(num_slots: int) -> tuple[ExpertSetEntry, ...]:
    """Four expert sets of N/4 slots each, so per-set statistics are compared too."""
    rank = num_slots // 4
    return tuple(ExpertSetEntry(f"s{i}", i * rank, rank, 1.0, 1) for i in range(4))


def _served(backend, ctx, x, y, layer, num_slots, slot_scale, routing):
    """One adapted layer through the selector, as `forward_plan` builds its spec."""
    layout = ctx.layout(x.shape[0], 1, num_slots, x.device)
    spec = ForwardSpec(
        num_slots=num_slots,
        device=x.device,
        dtype=torch.float32,
        routing=routing,
        slot_scale=slot_scale,
        layout=layout,
        context=ctx,
    )
    plan = select_backend(spec, backend)
    with torch.inference_mode():
        return plan.apply(x, y.clone(), layer), layout


@pytest.mark.parametrize("overrides", [False, True])
@pytest.mark.parametrize("dist", ["uniform", "skewed", "below_threshold"])
def test_sequences_seeing_different_slots(dist, overrides):
    """Two sequences at different pool versions (plus one that sees nothing), a layer that
    lacks some slots, per-slot scales, per-sequence budgets and thresholds, and a padding
    token: the output against the reference over each token's visible slots, and the
    statistics equal to the tensor path's."""
    num_slots, num_tokens = 16, 7
    x, A, B = make_case(dist, num_tokens, num_slots, seed=5)
    y = torch.randn(num_tokens, B.shape[1], generator=torch.Generator().manual_seed(9))
    present = torch.ones(num_slots, dtype=torch.bool)
    present[[3, 12]] = False  # slots this layer does not have
    slot_scale = torch.linspace(0.25, 2.0, num_slots)
    sets = _entries(num_slots)
    snapshots = [
        PoolSnapshot(1, tuple(range(8)), sets[:2]),
        PoolSnapshot(2, tuple(range(16)), sets),
        PoolSnapshot(0, (), ()),
    ]
    seq = torch.tensor([0, 0, 1, 1, 1, 2, 0])
    valid = torch.tensor([True] * 6 + [False])  # the last token is padding
    top_k = [1, 5, 3] if overrides else None
    thresholds = [0.0, 0.25, 0.1] if overrides else None
    routing = RoutingConfig(top_k=4, tau=0.3, threshold=0.1)
    results = {}
    for backend in ("triton", "torch"):
        ctx = ForwardContext(
            snapshots, token_seq=seq, top_k=top_k, threshold=thresholds, valid_tokens=valid
        )
        layer = _Layer(A, B, present)
        out, layout = _served(backend, ctx, x, y, layer, num_slots, slot_scale, routing)
        hits = ctx.slot_hits(layout).clone()
        results[backend] = (out, hits, ctx.collect())
    out, hits, stats = results["triton"]
    for t in range(num_tokens):
        s = int(seq[t])
        visible = snapshots[s].mask(num_slots) & present
        kwargs = dict(
            top_k=top_k[s] if overrides else routing.top_k,
            tau=routing.tau,
            threshold=thresholds[s] if overrides else routing.threshold,
        )
        want = y[t].double()
        if visible.any():
            scaled_B = B.double() * slot_scale.double().unsqueeze(1)  # folds in the slot scale
            want = want + reference_delta(
                x[t : t + 1].double(), A[visible].double(), scaled_B[visible], **kwargs
            ).squeeze(0)
        torch.testing.assert_close(out[t].double(), want, rtol=1e-4, atol=1e-4, msg=f"token {t}")
    torch_out, torch_hits, torch_stats = results["torch"]
    torch.testing.assert_close(out, torch_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(hits, torch_hits) and hits.sum() > 0
    assert hits[2].sum() == 0 and hits[:, [3, 12]].sum() == 0 and hits[0, 8:].sum() == 0
    assert stats == torch_stats


def test_statistics_off_when_the_context_does_not_record():
    x, A, B = make_case("uniform", 4, 16, seed=3)
    ctx = ForwardContext([PoolSnapshot(1, tuple(range(16)), _entries(16))], record=False)
    out, layout = _served(
        "triton", ctx, x, torch.zeros(4, B.shape[1]), _Layer(A, B, None), 16, torch.ones(16),
        RoutingConfig(top_k=4, tau=0.3, threshold=0.0),
    )  # fmt: skip
    want = reference_delta(x.double(), A.double(), B.double(), top_k=4, tau=0.3, threshold=0.0)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    assert ctx.slot_hits(layout) is None


def test_auto_never_picks_triton_on_a_cpu(monkeypatch):
    """Even under the interpreter and without the CPU extension, where triton would accept
    the forward, "auto" keeps a CPU forward on the CPU backends."""
    monkeypatch.setattr(cpu_kernels, "layer_kernels", lambda: None)
    assert isinstance(TritonBackend.prepare(_spec()), TritonBackend)
    for dtype in (torch.float32, torch.bfloat16):
        assert type(select_backend(_spec(dtype=dtype))) is TorchBackend
    # The device rule is what keeps it out: lifted, "auto" would take triton here.
    monkeypatch.setitem(select_module.AUTO_DEVICES, "triton", ("cuda", "cpu"))
    assert type(select_backend(_spec())) is TritonBackend


def test_prepare_refuses_training_gradients_and_a_cpu_without_the_interpreter(monkeypatch):
    for refused in (dict(training=True), dict(needs_grad=True), dict(dtype=torch.float64)):
        assert isinstance(TritonBackend.prepare(_spec(**refused)), str), refused
        with pytest.raises(BackendUnavailable):
            select_backend(_spec(**refused), "triton")
    x, A, B = make_case("uniform", 3, 8, seed=2)
    with pytest.raises(BackendUnavailable, match="inference only"):
        mora_delta(x, A, B, top_k=2, tau=0.1, threshold=0.0, training=True, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailable, match="CUDA tensors only"):
        select_backend(_spec(), "triton")


def test_a_failed_launch_serves_through_the_torch_backend_and_disables_triton(monkeypatch):
    """A kernel that cannot compile or launch on this GPU must not fail requests: that call
    is served by the tensor path, and the process stops choosing triton."""
    monkeypatch.setattr(TritonBackend, "disabled", None)

    def broken(self, x, y, layer):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(TritonBackend, "_launch", broken)
    x, A, B = make_case("uniform", 7, 16, seed=5)
    kwargs = dict(top_k=4, tau=0.1, threshold=0.0, scale=0.5)
    with torch.inference_mode():
        got = mora_delta(x, A, B, backend="triton", **kwargs)
        want = mora_delta(x, A, B, backend="torch", **kwargs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "no kernel for this GPU" in TritonBackend.disabled
    assert "failed launch" in TritonBackend.prepare(_spec())
    with pytest.raises(BackendUnavailable, match="failed launch"):
        mora_delta(x, A, B, backend="triton", **kwargs)
