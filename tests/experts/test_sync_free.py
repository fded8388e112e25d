"""No host syncs inside the adapted layers: engine decode steps of a small patched Llama, with
sequences at two pool versions and per-request budgets, run every adapted layer under a guard
that records each call that makes the host wait for the device (.item(), .tolist(), .cpu(),
.numpy(), bool/int/float of a tensor, .to("cpu"), and ops whose output size the device
decides: nonzero, masked_select, unique, boolean-mask indexing). On a GPU the same steps run
with torch.cuda.set_sync_debug_mode("error") inside the layers as well, which also catches
syncs the guard cannot see (copies from pageable memory, kernels that read sizes back).

The torch backend runs with both value strategies, the Triton backend under triton's
interpreter on a CPU (its kernel launch is the interpreter's business: a CPU emulation that
copies tensors to and from numpy, so only the host code around it is guarded) and compiled
on a GPU. The cpu_fused backend is left out on purpose: a layer is one native call on CPU
tensors, with no device queue to wait for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from mora_runtime.engine.core import Engine
from mora_runtime.engine.params import SamplingParams
from mora_runtime.engine.types import TokenEvent
from mora_runtime.experts import routing as routing_module
from mora_runtime.experts.backends import select as select_module
from mora_runtime.experts.backends import torch_backend
from mora_runtime.experts.backends.base import LayerBackend
from mora_runtime.experts.backends.triton_backend import TritonBackend
from mora_runtime.experts.patching import MoRALinear, patch_model
from mora_runtime.experts.slots import RoutingConfig
from tests.engine.test_engine import prompts, tiny_llama

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no GPU"))]
# (backend, value strategy of the torch backend)
BACKENDS = [("torch", "dense"), ("torch", "gather"), ("triton", None)]

_SYNCING = {
    Tensor.item,
    Tensor.tolist,
    Tensor.cpu,
    Tensor.numpy,
    Tensor.__bool__,
    Tensor.__int__,
    Tensor.__float__,
    Tensor.__index__,
    Tensor.nonzero,
    torch.nonzero,
    Tensor.masked_select,
    torch.masked_select,
    Tensor.unique,
    torch.unique,
}


def _is_cpu(device: Any) -> bool:
    # A device written out as "cpu": one taken from the forward's tensors is the forward's own
    # device and moves nothing.
    return isinstance(device, str) and device.split(":")[0] == "cpu"


def _bool_index(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, Tensor) and p.dtype == torch.bool for p in parts)


class HostSyncGuard(TorchFunctionMode):
    """Records every call that reads device data on the host, with where it was made."""

    def __init__(self, found: list[str], paused: list[bool]) -> None:
        super().__init__()
        self.found = found
        self.paused = paused  # [flag], shared with the interpreter's kernel wrapper

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused[0] and self._syncs(func, args, kwargs):
            name = getattr(func, "__name__", repr(func))
            self.found.append(f"{name} at {_caller()}")
        return func(*args, **kwargs)

    @staticmethod
    def _syncs(func: Callable, args: tuple, kwargs: dict) -> bool:
        if func in _SYNCING:
            return True
        if func is Tensor.to:
            return any(_is_cpu(a) for a in (*args[1:], kwargs.get("device")))
        if func in (Tensor.__getitem__, Tensor.__setitem__):
            return len(args) > 1 and _bool_index(args[1])
        return False


def _caller() -> str:
    """The innermost frame in mora_runtime (the code to blame), else the innermost at all."""
    frames = [f for f in traceback.extract_stack() if "/tests/" not in f.filename]
    ours = [f for f in frames if "mora_runtime" in f.filename] or frames
    frame = ours[-1]
    return f"{frame.filename.rsplit('mora_runtime', 1)[-1]}:{frame.lineno}"


class _Watch:
    """What the guarded layers saw: the guard's findings and the forwards that routed."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self.paused = [False]
        self.routed: list[tuple[int, bool, bool]] = []  # (tokens, mixed versions, budgets)


@contextlib.contextmanager
def _sync_debug_errors(device: torch.device) -> Iterator[None]:
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch) -> _Watch:
    """Every adapted layer's forward runs under a fresh guard (and, on a GPU, with syncs
    raising); the layers' backend calls are counted with the layout they routed."""
    state = _Watch()
    layer_forward = MoRALinear.forward

    def guarded(self: MoRALinear, x: Tensor) -> Tensor:
        with HostSyncGuard(state.found, state.paused), _sync_debug_errors(x.device):
            return layer_forward(self, x)

    monkeypatch.setattr(MoRALinear, "forward", guarded)
    for backend in (torch_backend.TorchBackend, TritonBackend):
        apply = backend.apply

        def counted(self: LayerBackend, x: Tensor, y: Tensor, layer: Any, apply=apply) -> Tensor:
            layout = self.spec.layout
            if layout is not None:
                state.routed.append(
                    (layout.num_tokens, layout.mask is not None, layout.top_k is not None)
                )
            return apply(self, x, y, layer)

        monkeypatch.setattr(backend, "apply", counted)
    if importlib.util.find_spec("triton") is not None:
        _pause_in_interpreted_launches(monkeypatch, state)
    return state


def _pause_in_interpreted_launches(monkeypatch: pytest.MonkeyPatch, state: _Watch) -> None:
    from mora_runtime.experts.backends import triton_kernel

    real_compiled = triton_kernel.compiled

    class Interpreted:
        """The interpreted kernel, launched with the guard paused."""

        def __init__(self, kernel: Any) -> None:
            self.kernel = kernel

        def __getitem__(self, grid: Any) -> Callable[..., Any]:
            def launch(*args: Any, **kwargs: Any) -> Any:
                state.paused[0] = True
                try:
                    return self.kernel[grid](*args, **kwargs)
                finally:
                    state.paused[0] = False

            return launch

    def compiled() -> Any:
        kernel = real_compiled()
        return Interpreted(kernel) if triton_kernel.knobs.runtime.interpret else kernel

    monkeypatch.setattr(triton_kernel, "compiled", compiled)


def _force(monkeypatch: pytest.MonkeyPatch, backend: str, strategy: str | None, device: str):
    monkeypatch.setenv(select_module.BACKEND_ENV, backend)
    if backend == "triton":
        pytest.importorskip("triton")
        if device == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(TritonBackend, "disabled", None)
    if strategy is not None:
        monkeypatch.setattr(routing_module, "choose_strategy", lambda *shape: strategy)


def _steps_at_two_versions(device: str) -> tuple[list[list[TokenEvent]], Any]:
    """Three requests decoding together: one admitted at version 1 (with its own budget and
    threshold, sampled), two at version 2 (one greedy, one with a larger budget)."""
    model = tiny_llama().to(device)
    pool = patch_model(model, routing=RoutingConfig(top_k=4, tau=0.1, threshold=0.05))
    g = torch.Generator().manual_seed(0)

    def expert_set(rank: int) -> dict[str, tuple[Tensor, Tensor]]:
        return {
            path: (
                torch.randn(rank, layer.in_features, generator=g),
                torch.randn(rank, layer.out_features, generator=g) * 0.5,
            )
            for path, layer in pool.layers.items()
        }

    pool.add_set("a", expert_set(24))
    engine = Engine(model, eos_token_ids=(), max_context=256, pool=pool)
    first, second, third = prompts(3, seed=6)
    events: list[list[TokenEvent]] = [[], [], []]
    engine.submit(
        first,
        SamplingParams(max_tokens=6, temperature=0.8, seed=1, top_k=3, threshold=0.1),
        events[0].append,
    )
    engine.step()
    engine.run_exclusive(lambda: pool.add_set("b", expert_set(24)))
    engine.submit(second, SamplingParams(max_tokens=4, temperature=0.0), events[1].append)
    engine.submit(third, SamplingParams(max_tokens=4, temperature=0.0, top_k=6), events[2].append)
    for _ in range(40):  # bounded
        if all(e and e[-1].finish_reason is not None for e in events):
            break
        engine.step()
    return events, pool


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("backend", "strategy"), BACKENDS)
def test_decode_steps_make_no_host_sync_inside_the_adapted_layers(
    monkeypatch: pytest.MonkeyPatch,
    watch: _Watch,
    device: str,
    backend: str,
    strategy: str | None,
) -> None:
    _force(monkeypatch, backend, strategy, device)
    events, pool = _steps_at_two_versions(device)

    assert watch.found == [], "host syncs inside adapted layers:\n" + "\n".join(watch.found)
    assert TritonBackend.disabled is None  # the backend under test ran every layer itself
    # The guard saw what it is meant to: decode steps (one token per sequence) of sequences
    # at two versions with per-request budgets, in every adapted layer.
    layers = len(pool.layers)
    mixed_decodes = [r for r in watch.routed if r[0] == 3 and r[1] and r[2]]
    assert len(mixed_decodes) >= 3 * layers
    for request in events:
        assert request[-1].finish_reason == "length"
        routing = request[-1].routing
        assert routing is not None and routing.observations > 0 and routing.active_ranks > 0


def test_the_guard_catches_a_sync_added_to_a_layer(
    monkeypatch: pytest.MonkeyPatch, watch: _Watch
) -> None:
    """The guard can fail: an `.item()` slipped into the torch backend's value product is
    reported, with where it was made."""
    _force(monkeypatch, "torch", None, "cpu")
    apply_values = torch_backend.apply_values

    def with_item(routing: Any, B: Tensor, **kwargs: Any) -> Tensor:
        if routing.coeff.abs().sum().item() < 0:  # a sync that changes nothing
            raise AssertionError
        return apply_values(routing, B, **kwargs)

    monkeypatch.setattr(torch_backend, "apply_values", with_item)
    _steps_at_two_versions("cpu")
    assert watch.found and all(f.startswith("item at ") for f in watch.found)
    assert all("torch_backend.py" in f for f in watch.found)
