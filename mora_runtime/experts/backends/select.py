"""The selector: one backend per forward pass, chosen by device, dtype, grad mode and
availability, cached with the forward's layout so every adapted layer reuses it."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from mora_runtime.experts.backends.base import BackendUnavailable, ForwardSpec, LayerBackend
from mora_runtime.experts.backends.cpu_fused import CpuFusedBackend
from mora_runtime.experts.backends.torch_backend import TorchBackend
from mora_runtime.experts.backends.trainable import TrainableExperts, installed
from mora_runtime.experts.backends.triton_backend import TritonBackend
from mora_runtime.experts.context import ForwardContext, Layout, current_context
from mora_runtime.experts.pool import ExpertPool
from mora_runtime.experts.slots import RoutingConfig

BACKENDS: dict[str, type[LayerBackend]] = {
    CpuFusedBackend.name: CpuFusedBackend,
    TritonBackend.name: TritonBackend,
    TorchBackend.name: TorchBackend,
}
# "auto" takes the first of these that accepts the forward; the tensor path accepts all.
AUTO_ORDER: tuple[str, ...] = (CpuFusedBackend.name, TritonBackend.name, TorchBackend.name)
# Backends "auto" considers only for forwards on these devices: the Triton kernel runs on a
# CPU only under its interpreter, which is for tests, never for serving.
AUTO_DEVICES: dict[str, tuple[str, ...]] = {TritonBackend.name: ("cuda",)}
BACKEND_ENV = "MORA_BACKEND"  # a process-wide choice for forwards that ask for "auto"
_PLAN_KEYS = {False: "plan", True: "plan/grad"}  # where a layout keeps its backend


def select_backend(spec: ForwardSpec, backend: str = "auto") -> LayerBackend:
    """The backend that runs the forward described by `spec`: `backend` by name, or with
    "auto" (the default, overridable by $MORA_BACKEND) the first of `AUTO_ORDER` that
    accepts it. Raises BackendUnavailable when a named backend cannot run it."""
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto").strip() or "auto"
    if backend == "auto":
        for name in AUTO_ORDER:
            if name in AUTO_DEVICES and spec.device.type not in AUTO_DEVICES[name]:
                continue
            prepared = BACKENDS[name].prepare(spec)
            if not isinstance(prepared, str):
                return prepared
        raise AssertionError("the torch backend accepts every forward")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: one of auto, {', '.join(BACKENDS)}")
    prepared = BACKENDS[backend].prepare(spec)
    if isinstance(prepared, str):
        raise BackendUnavailable(f"backend {backend!r} cannot run this forward: {prepared}")
    return prepared


def forward_plan(pool: ExpertPool, x: Tensor) -> LayerBackend | None:
    """The backend every adapted layer of this forward through `pool` calls, or None when
    nothing is added to the base output (no slot, or no token sees any expert)."""
    ctx = current_context(pool)
    trainable = installed(pool)
    if trainable is not None:
        return _trainable_plan(pool, trainable, ctx, x.device)
    num_slots = pool.num_slots
    if num_slots == 0:
        return None  # empty pool: the base output, bit for bit
    batch_rows = x.shape[0] if x.ndim > 2 else 1
    layout = ctx.layout(x.numel() // x.shape[-1], batch_rows, num_slots, x.device)
    if layout is None:
        return None
    grad = torch.is_grad_enabled()  # a cached layout may serve forwards in either mode
    key = _PLAN_KEYS[grad]
    plan = layout.extras.get(key)
    if plan is None:
        plan = layout.extras[key] = select_backend(_spec(pool, layout, ctx, grad), ctx.backend)
    return plan


def _spec(pool: ExpertPool, layout: Layout, ctx: ForwardContext, grad: bool) -> ForwardSpec:
    return ForwardSpec(
        num_slots=layout.num_slots,
        device=layout.seq.device,
        dtype=pool.dtype,
        routing=pool.routing,
        slot_scale=pool.slot_scale,
        layout=layout,
        training=ctx.training,
        needs_grad=grad,
        context=ctx,
    )


def _trainable_plan(
    pool: ExpertPool, trainable: TrainableExperts, ctx: ForwardContext, device: torch.device
) -> LayerBackend:
    """The tensor path with the installed trainable experts, built once per forward."""
    latest = pool.latest()
    key = (ctx, latest, pool.num_slots, device, ctx.training, torch.is_grad_enabled())
    cached = trainable.cached
    if cached is not None and cached[0] == key:
        return cached[1]
    num_slots = pool.num_slots
    spec = ForwardSpec(
        num_slots=num_slots,
        device=device,
        dtype=pool.dtype,
        routing=pool.routing,
        slot_scale=pool.slot_scale,
        layout=None,
        training=ctx.training,
        needs_grad=torch.is_grad_enabled(),
        context=None,
        trainable=trainable,
        visible=latest.mask(num_slots, device),
    )
    plan = select_backend(spec, "torch")
    trainable.cached = (key, plan)
    return plan


class _Experts:
    """One layer's experts given as tensors (`delta`): every slot present."""

    path = kind = ""

    def __init__(self, A: Tensor, B: Tensor) -> None:
        self._weights = (A, B, None)

    def weights(self, num_slots: int) -> tuple[Tensor, Tensor, None]:
        return self._weights


def delta(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    *,
    routing: RoutingConfig,
    scale: float = 1.0,
    training: bool = False,
    backend: str = "auto",
) -> Tensor:
    """One layer's MoRA delta [T, O] in x's dtype for x [T, D], A [N, D], B [N, O] (N > 0),
    every token one sequence seeing every expert: `experts.mora_delta`, through the same
    selector and backends as a served forward."""
    num_tokens, num_slots = x.shape[0], A.shape[0]
    layout = Layout(
        num_tokens=num_tokens,
        num_slots=num_slots,
        num_sequences=1,
        seq=torch.zeros(num_tokens, dtype=torch.long, device=x.device),
        mask=None,
        top_k=None,
        threshold=None,
    )
    spec = ForwardSpec(
        num_slots=num_slots,
        device=A.device,
        dtype=A.dtype,
        routing=routing,
        slot_scale=torch.full((num_slots,), float(scale), dtype=A.dtype, device=A.device),
        layout=layout,
        training=training,
        needs_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (x, A, B)),
    )
    plan = select_backend(spec, backend)
    out = torch.zeros(num_tokens, B.shape[1], dtype=x.dtype, device=x.device)  # [T, O]
    return plan.apply(x, out, _Experts(A.contiguous(), B.contiguous()))
