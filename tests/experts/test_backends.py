"""Layer backends (mora_runtime/experts/backends): each against the float64 reference, the
selector's choices, explicit choices, and one selection per forward."""

from __future__ import annotations

import itertools

import pytest
import torch

from mora_runtime.cpu import build as cpu_kernels
from mora_runtime.cpu.build import kernels
from mora_runtime.experts.backends import select as select_module
from mora_runtime.experts.backends.base import BackendUnavailable, ForwardSpec
from mora_runtime.experts.backends.cpu_fused import CpuFusedBackend
from mora_runtime.experts.backends.select import select_backend
from mora_runtime.experts.backends.torch_backend import TorchBackend
from mora_runtime.experts.backends.trainable import trainable_experts
from mora_runtime.experts.context import ForwardContext, forward_context
from mora_runtime.experts.patching import patch_model
from mora_runtime.experts.routing import mora_delta, reference_delta
from mora_runtime.experts.slots import PoolSnapshot, RoutingConfig
from tests.experts.test_patching import CAUSAL, build, ids, random_set
from tests.experts.test_routing import SETTINGS, make_case

DISTRIBUTIONS = ["uniform", "skewed", "zipf", "all_negative", "below_threshold"]
needs_extension = pytest.mark.skipif(kernels() is None, reason="needs the AVX2 CPU extension")
LIMIT = 256  # MORA_MAX_K in csrc/mora_route.h


@pytest.mark.parametrize(
    "num_experts,num_tokens", list(itertools.product([1, 2, 16, 160, 1000], [1, 7, 64, 100]))
)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("backend", [pytest.param("cpu_fused", marks=needs_extension), "torch"])
def test_backend_matches_the_float64_reference(backend, num_experts, num_tokens, dist):
    """64 tokens: the fused extension's own score kernel; 100: past it (at::mm)."""
    x, A, B = make_case(dist, num_tokens, num_experts, seed=num_experts * 3 + num_tokens)
    x64, A64, B64 = x.double(), A.double(), B.double()
    for top_k, tau, threshold in SETTINGS:
        kwargs = dict(top_k=top_k, tau=tau, threshold=threshold, scale=0.5)
        with torch.inference_mode():
            got = mora_delta(x, A, B, backend=backend, **kwargs)
        want = reference_delta(x64, A64, B64, **kwargs)
        assert got.dtype == torch.float32 and got.shape == (num_tokens, B.shape[1])
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=f"{kwargs}")


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_torch_backend_in_training_and_float64_matches_the_reference(dist):
    x, A, B = make_case(dist, 7, 160, seed=11)
    x, A, B = x.double(), A.double(), B.double()
    for (top_k, tau, threshold), training in itertools.product(SETTINGS, [False, True]):
        kwargs = dict(top_k=top_k, tau=tau, threshold=threshold, scale=0.5, training=training)
        got = mora_delta(x, A, B, **kwargs)  # auto: float64 is the torch backend's
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, reference_delta(x, A, B, **kwargs), rtol=1e-9, atol=1e-9)


def _spec(**overrides):
    """The spec a served forward would get, fields overridable."""
    snapshot = PoolSnapshot(1, tuple(range(16)), ())
    layout = ForwardContext([snapshot]).layout(4, 1, 16, torch.device("cpu"))
    fields = dict(
        num_slots=16,
        device=torch.device("cpu"),
        dtype=torch.float32,
        routing=RoutingConfig(),
        slot_scale=torch.ones(16),
        layout=layout,
    )
    fields.update(overrides)
    return ForwardSpec(**fields)


@needs_extension
def test_auto_picks_the_fused_extension_only_for_cpu_float32_inference(monkeypatch):
    monkeypatch.delenv(select_module.BACKEND_ENV, raising=False)
    assert isinstance(select_backend(_spec()), CpuFusedBackend)
    for refused in (
        dict(training=True),
        dict(needs_grad=True),
        dict(dtype=torch.float64),
        dict(device=torch.device("meta")),
    ):
        backend = select_backend(_spec(**refused))
        assert type(backend) is TorchBackend, refused
        with pytest.raises(BackendUnavailable):
            select_backend(_spec(**refused), "cpu_fused")
    monkeypatch.setenv(select_module.BACKEND_ENV, "torch")
    assert type(select_backend(_spec())) is TorchBackend  # the process-wide choice
    assert isinstance(select_backend(_spec(), "cpu_fused"), CpuFusedBackend)  # an explicit one wins


def test_without_an_extension_build_the_torch_backend_serves(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "layer_kernels", lambda: None)
    assert not CpuFusedBackend.available()
    assert type(select_backend(_spec())) is TorchBackend
    with pytest.raises(BackendUnavailable, match="could not be built"):
        select_backend(_spec(), "cpu_fused")


def test_explicit_choices_and_unknown_names():
    assert type(select_backend(_spec(), "torch")) is TorchBackend
    with pytest.raises(ValueError, match="unknown backend"):
        select_backend(_spec(), "triton-someday")
    x, A, B = make_case("uniform", 3, 8, seed=2)
    with pytest.raises(BackendUnavailable, match="inference only"):
        mora_delta(x, A, B, top_k=2, tau=0.1, threshold=0.0, training=True, backend="cpu_fused")


@needs_extension
def test_a_budget_over_the_extension_limit_takes_the_torch_backend():
    x, A, B = make_case("uniform", 3, LIMIT + 10, seed=4)
    kwargs = dict(top_k=LIMIT + 1, tau=1.0, threshold=0.0)
    with torch.inference_mode():
        with pytest.raises(BackendUnavailable, match="over the extension's limit"):
            mora_delta(x, A, B, backend="cpu_fused", **kwargs)
        got = mora_delta(x, A, B, **kwargs)
    torch.testing.assert_close(got, reference_delta(x, A, B, **kwargs), rtol=1e-4, atol=1e-4)


def test_gradients_select_the_torch_backend_and_reach_the_experts():
    x, A, B = make_case("uniform", 8, 16, seed=7)
    A.requires_grad_(True)
    mora_delta(x, A, B, top_k=4, tau=0.1, threshold=0.0).sum().backward()
    assert A.grad is not None and torch.count_nonzero(A.grad) > 0


def _count_selections(monkeypatch) -> list[str]:
    chosen: list[str] = []
    real = select_module.select_backend

    def spy(spec, backend="auto"):
        plan = real(spec, backend)
        chosen.append(plan.name)
        return plan

    monkeypatch.setattr(select_module, "select_backend", spy)
    return chosen


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_one_selection_per_forward_and_every_layer_applies_it(name, monkeypatch):
    model = build(CAUSAL[name])
    pool = patch_model(model)
    pool.add_set("a", random_set(pool, 4, seed=1, gain=3.0))
    chosen = _count_selections(monkeypatch)
    applied: list[str] = []
    for cls in (CpuFusedBackend, TorchBackend):
        real_apply = cls.apply

        def counting(self, x, y, layer, _real=real_apply):
            applied.append(self.name)
            return _real(self, x, y, layer)

        monkeypatch.setattr(cls, "apply", counting)
    expected = "cpu_fused" if kernels() is not None else "torch"
    with torch.inference_mode():
        model(ids())
    assert chosen == [expected]
    assert applied == [expected] * len(pool.layers)
    chosen.clear()
    model(ids())  # grad mode on: another choice, for that forward only
    assert chosen == ["torch"]


def test_trainable_experts_are_installed_only_inside_the_block():
    model = build(CAUSAL["llama"]).requires_grad_(False)
    pool = patch_model(model)
    new = {
        p: (torch.nn.Parameter(A.clone()), torch.nn.Parameter(B.clone()))
        for p, (A, B) in random_set(pool, 4, seed=17, gain=3.0).items()
    }
    x = ids()
    with torch.no_grad():
        base = model(x).logits
    training = ForwardContext([pool.latest()], training=True)
    with trainable_experts(pool, new, scale=2.0), forward_context(pool, training):
        trained = model(x).logits
    assert not torch.allclose(trained, base)  # an empty pool still scores the new experts
    with torch.no_grad():
        assert torch.equal(model(x).logits, base)  # gone once the block ends
    lacking = {"nope": next(iter(new.values()))}
    with pytest.raises(ValueError, match="layers the pool lacks"), trainable_experts(pool, lacking):
        pass
