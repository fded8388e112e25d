"""Wrap the target linear layers of a Hugging Face model with MoRA expert layers.

Like PEFT, the wrapper keeps the original module as `base_layer` and unpatching puts it
back; unlike PEFT there is no Python loop over adapters: every layer reads one slot buffer
of the shared `ExpertPool` and the `ForwardContext` of the current forward pass.

Supported: `nn.Linear` (Llama/Qwen/Mistral families, CLIP) and GPT-2's `Conv1D`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import cpu_kernels, native
from .context import ForwardContext, Layout
from .experts import apply_values, route
from .pool import ExpertPool, PoolSnapshot, RoutingConfig
from .quantize import QuantizedLinear

# Module-name suffixes adapted by default, per model family (docs/spec.md settings).
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "llama-mlp": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("attn.c_attn", "attn.c_proj"),
    "clip": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}


def default_targets(model: nn.Module) -> tuple[str, ...]:
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type == "gpt2":
        return TARGET_PRESETS["gpt2"]
    if model_type.startswith("clip"):
        return TARGET_PRESETS["clip"]
    return TARGET_PRESETS["llama"]


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: weight [D, O], y = x @ W + b.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features D, out_features O) of an adaptable module, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, QuantizedLinear):
        return module.in_features, module.out_features
    return None


def _matches(path: str, targets: Sequence[str]) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


def find_target_modules(
    model: nn.Module, targets: Sequence[str] | None = None
) -> dict[str, tuple[int, int]]:
    """Module path -> (D, O) for every adaptable module whose name matches `targets`."""
    targets = tuple(targets or default_targets(model))
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, MoRALinear):
            found[path] = linear_shape(module.base_layer)
            continue
        if ".base_layer" in path or not _matches(path, targets):
            continue
        shape = linear_shape(module)
        if shape is not None:
            found[path] = shape
    if not found:
        raise ValueError(f"no linear module of {type(model).__name__} matches {targets}")
    return found


def module_kind(path: str) -> str:
    """Bounded metric label for a module path: its last name, e.g. "q_proj"."""
    return path.rsplit(".", 1)[-1]


class MoRALinear(nn.Module):
    """y = base_layer(x) + the MoRA delta of this layer's experts (docs/spec.md step 6)."""

    def __init__(self, base_layer: nn.Module, pool: ExpertPool, path: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.path = path
        self.kind = module_kind(path)
        # Plain attributes, not submodules: the pool is shared by every wrapped layer.
        object.__setattr__(self, "_pool", pool)
        object.__setattr__(self, "_layer", pool.layers[path])

    @property
    def pool(self) -> ExpertPool:
        return self._pool

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        pool = self._pool
        if pool.trainable is not None:
            return self._forward_training(x, y)
        num_slots = pool.num_slots
        if num_slots == 0:
            return y  # empty pool: the base output, bit for bit
        ctx = current_context(pool)
        batch_rows = x.shape[0] if x.ndim > 2 else 1
        layout = ctx.layout(x.numel() // x.shape[-1], batch_rows, num_slots, x.device)
        if layout is None:
            return y  # no sequence of this forward sees any expert
        layer = self._layer
        A, B, present = layer.views(num_slots)  # [N, D], [N, O], [N]
        if not ctx.training and self._fused_update(x, y, A, B, present, layout, ctx):
            return y
        x2 = x.reshape(-1, x.shape[-1])  # [T, D]
        if A.dtype != x2.dtype:
            A, B = A.to(x2.dtype), B.to(x2.dtype)
        z = _scores(x2, A, inference=not ctx.training)  # [T, N]: every expert, every token
        if not ctx.training and self._native_update(y, z, B, present, layout, ctx):
            return y
        routing_cfg = pool.routing
        routing = route(
            z,
            top_k=layout.token_top_k if layout.top_k is not None else routing_cfg.top_k,
            tau=routing_cfg.tau,
            threshold=(
                layout.token_threshold if layout.threshold is not None else routing_cfg.threshold
            ),
            training=ctx.training,
            slot_mask=self._slot_mask(layout, present if layer.absent_slots else None),
            slot_scale=pool.slot_scale.to(x2.dtype),
        )
        ctx.record_routing(self.kind, routing, layout)
        delta = apply_values(routing, B)  # [T, O]
        return y + delta.reshape(y.shape).to(y.dtype)

    @staticmethod
    def _slot_mask(layout: Layout, present: Tensor | None) -> Tensor | None:
        """[T|1, N] bool: the slots each token may see in this layer (None: all)."""
        mask = layout.token_mask
        if present is not None:
            mask = present.unsqueeze(0) if mask is None else mask & present.unsqueeze(0)
        return mask

    def _fused_update(
        self,
        x: Tensor,
        y: Tensor,
        A: Tensor,
        B: Tensor,
        present: Tensor,
        layout: Layout,
        ctx: ForwardContext,
    ) -> bool:
        """Scores, routing and update of this layer in one extension call, if it applies
        (csrc/expert_layer.cpp: the same arithmetic as `_scores` + `_native_update`).

        No tensor op on the way: a decode step makes this call in every adapted layer, and
        each op would release the GIL, which a server replica's other threads may then
        hold for a while (in-process, a busy second Python thread raised what the pool adds
        to a decode step from 3-10 ms to 28-37 ms; README, Performance)."""
        plan = layout.extras.get("plan", _UNSET)
        if plan is _UNSET:
            plan = layout.extras["plan"] = _layer_plan(self._pool, layout, ctx)
        if (
            plan is None
            or y.requires_grad
            or y.dtype != torch.float32
            or x.dtype != torch.float32
            or A.dtype != torch.float32
            or not y.is_contiguous()
        ):
            return False
        active, row, hits = ctx.recording_buffers(self.kind, layout)
        return plan.apply(
            x, A, B, y, present if self._layer.absent_slots else None, active, row, hits
        )

    def _native_update(
        self,
        y: Tensor,
        z: Tensor,
        B: Tensor,
        present: Tensor,
        layout: Layout,
        ctx: ForwardContext,
    ) -> bool:
        """Add this layer's delta to `y` in place with the native kernel, if it applies."""
        args = layout.extras.get("native", _UNSET)
        if args is _UNSET:
            args = layout.extras["native"] = _native_args(self._pool, layout, ctx)
        if args is None or y.requires_grad or y.dtype != torch.float32 or not y.is_contiguous():
            return False
        active, hits = ctx.recording(self.kind, layout)
        return args.apply(
            z,
            B,
            y.view(-1, y.shape[-1]),
            present if self._layer.absent_slots else None,
            active,
            hits,
        )

    def _forward_training(self, x: Tensor, y: Tensor) -> Tensor:
        """The frozen experts of the latest version plus the ones being learned, with
        gradients only through the latter (and no pruning while training)."""
        pool = self.pool
        layer = pool.layers[self.path]
        ctx = current_context(pool)
        num_slots = pool.num_slots
        visible = pool.latest().mask(num_slots, x.device) & layer.present[:num_slots]  # [N]
        x2 = x.reshape(-1, x.shape[-1])  # [T, D]
        A_parts, B_parts = [layer.A[:num_slots][visible]], [layer.B[:num_slots][visible]]
        scales = [pool.slot_scale[visible]]
        if self.path in pool.trainable:
            A_new, B_new = pool.trainable[self.path]
            A_parts.append(A_new)
            B_parts.append(B_new)
            scales.append(A_new.new_full((A_new.shape[0],), pool.trainable_scale))
        A, B = torch.cat(A_parts).to(x2.dtype), torch.cat(B_parts).to(x2.dtype)  # [N', D|O]
        if A.shape[0] == 0:
            return y
        routing = route(
            x2 @ A.t(),  # [T, N']
            top_k=pool.routing.top_k,
            tau=pool.routing.tau,
            threshold=pool.routing.threshold,
            training=ctx.training,
            slot_scale=torch.cat(scales).to(x2.dtype),
        )
        delta = apply_values(routing, B, strategy="dense")  # [T, O]
        return y + delta.reshape(y.shape).to(y.dtype)


_UNSET = object()
_KERNEL_MAX_TOKENS = 64  # beyond a decode step's size, BLAS is the faster GEMM


def _scores(x2: Tensor, A: Tensor, *, inference: bool) -> Tensor:
    """x2 [T, D] @ A [N, D]^T. CPU inference at decode sizes takes the extension's kernel
    (csrc/expert_scores.cpp: ~2x faster than torch.mm there, once per adapted layer)."""
    if (
        inference
        and x2.shape[0] <= _KERNEL_MAX_TOKENS
        and x2.device.type == "cpu"
        and x2.dtype == A.dtype == torch.float32
        and not torch.is_grad_enabled()
    ):
        compiled = cpu_kernels.kernels()
        if compiled is not None:
            return compiled.expert_scores(x2.contiguous(), A.contiguous())
    return torch.mm(x2, A.t())


def _layer_plan(pool: ExpertPool, layout: Layout, ctx: ForwardContext) -> Any | None:
    """The extension's per-forward `ExpertLayerPlan`, or None when this forward must take
    another path (training, not the CPU, not float32, no extension, or `MORA_NATIVE=0`,
    which turns every native routing path off)."""
    if (
        ctx.training
        or layout.seq.device.type != "cpu"
        or pool.dtype != torch.float32
        or torch.is_grad_enabled()
        or not native.enabled()
    ):
        return None
    compiled = cpu_kernels.kernels()
    if compiled is None:
        return None
    routing = pool.routing
    mask = layout.mask
    plan = compiled.ExpertLayerPlan(
        layout.num_tokens,
        routing.top_k,
        routing.threshold,
        routing.tau,
        pool.slot_scale.contiguous(),
        _KERNEL_MAX_TOKENS,
        None if mask is None else mask.contiguous(),
        layout.seq if layout.num_sequences > 1 else None,
        layout.top_k,
        layout.threshold,
        ctx.valid_mask(layout),
    )
    # Every layer of the forward has layout.num_slots slots: a budget over the kernel's
    # limit is refused once here, before any layer records statistics.
    return plan if plan.accepts(layout.num_slots) else None


def _native_args(
    pool: ExpertPool, layout: Layout, ctx: ForwardContext
) -> native.ForwardArgs | None:
    """The kernel's per-forward arguments, or None when this forward must use tensors."""
    routing = pool.routing
    if (
        ctx.training
        or layout.seq.device.type != "cpu"
        or pool.dtype != torch.float32
        or not native.available()
    ):
        return None
    # A budget over the kernel's limit: tensors for the whole forward, decided here, before
    # any layer records statistics (a refusal per layer would record its row twice).
    largest = routing.top_k if layout.top_k is None else int(layout.top_k.max())
    if min(max(largest, 2), layout.num_slots) > native.max_top_k():
        return None
    return native.ForwardArgs(
        top_k=routing.top_k,
        threshold=routing.threshold,
        tau=routing.tau,
        slot_scale=pool.slot_scale.contiguous(),
        scratch=torch.empty(layout.num_tokens, dtype=torch.int32),
        mask=layout.mask,
        seq=layout.seq if layout.num_sequences > 1 else None,
        seq_top_k=layout.top_k,
        seq_threshold=layout.threshold,
        valid=ctx.valid_mask(layout),
    )


# Context plumbing ------------------------------------------------------------------------
_state = threading.local()


def current_context(pool: ExpertPool) -> ForwardContext:
    """The context set for `pool` on this thread, else the latest version for all tokens."""
    contexts: dict[int, ForwardContext] = getattr(_state, "contexts", {})
    ctx = contexts.get(id(pool))
    if ctx is not None:
        return ctx
    # No context set (a plain model call): every token sees the latest version. One context
    # per version is kept, so its per-forward layout is not rebuilt at every layer.
    defaults: dict[int, ForwardContext] = _state.__dict__.setdefault("defaults", {})
    latest = pool.latest()
    ctx = defaults.get(id(pool))
    if ctx is None or ctx.snapshots[0] is not latest:
        ctx = defaults[id(pool)] = ForwardContext([latest], record=False)
    return ctx


@contextlib.contextmanager
def forward_context(pool: ExpertPool, ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Make `ctx` the routing context of every forward through `pool` on this thread."""
    contexts = _state.__dict__.setdefault("contexts", {})
    previous = contexts.get(id(pool))
    contexts[id(pool)] = ctx
    try:
        yield ctx
    finally:
        if previous is None:
            contexts.pop(id(pool), None)
        else:
            contexts[id(pool)] = previous


def use_snapshots(
    pool: ExpertPool, snapshots: Sequence[PoolSnapshot], **kwargs
) -> contextlib.AbstractContextManager[ForwardContext]:
    """Shorthand: `with use_snapshots(pool, [snap_a, snap_b]): model(batch_of_two)`."""
    return forward_context(pool, ForwardContext(snapshots, **kwargs))


# Patching --------------------------------------------------------------------------------
def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def patch_model(
    model: nn.Module,
    targets: Sequence[str] | None = None,
    *,
    capacity: int = 64,
    routing: RoutingConfig | None = None,
    pool: ExpertPool | None = None,
) -> ExpertPool:
    """Wrap every target module of `model`; returns the (new or given) pool it reads."""
    if getattr(model, "mora_pool", None) is not None:
        raise ValueError("model is already patched; unpatch it first")
    shapes = find_target_modules(model, targets)
    param = next(model.parameters())
    if pool is None:
        pool = ExpertPool(
            shapes, capacity=capacity, routing=routing, device=param.device, dtype=param.dtype
        )
    elif set(pool.layers) != set(shapes):
        raise ValueError("the given pool was built for different modules")
    for path in shapes:
        _set_submodule(model, path, MoRALinear(model.get_submodule(path), pool, path))
    object.__setattr__(model, "mora_pool", pool)
    return pool


def unpatch_model(model: nn.Module) -> None:
    """Put every original module back; the model is then exactly the unpatched model."""
    for path, module in list(model.named_modules()):
        if isinstance(module, MoRALinear):
            _set_submodule(model, path, module.base_layer)
    if "mora_pool" in model.__dict__:
        del model.__dict__["mora_pool"]
