"""The tensor path: `experts.route` + `experts.apply_values` on any device and dtype,
differentiable (training uses it, and it serves wherever no other backend applies).

A layer's call reads nothing back from the device: the largest per-sequence budget comes
from the context's host values (`budget_bound`, once per forward), the value gather reads
every kept row rather than asking the device how many are active, and the statistics stay
in the context's device buffers until `ForwardContext.collect`. On a GPU the host then only
queues work, and a decode step never waits inside the model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mora_runtime.experts.backends.base import AdaptedLayer, ForwardSpec, LayerBackend
from mora_runtime.experts.routing import apply_values, effective_top_k, route


class TorchBackend(LayerBackend):
    name = "torch"

    def __init__(self, spec: ForwardSpec) -> None:
        super().__init__(spec)
        layout = spec.layout
        # With per-sequence budgets, route keeps this many candidates per token.
        self._max_top_k = (
            budget_bound(spec) if layout is not None and layout.top_k is not None else None
        )

    @classmethod
    def prepare(cls, spec: ForwardSpec) -> TorchBackend:
        return cls(spec)

    def apply(self, x: Tensor, y: Tensor, layer: AdaptedLayer) -> Tensor:
        if self.spec.trainable is not None:
            return self._apply_trainable(x, y, layer)
        spec, layout = self.spec, self.spec.layout
        assert layout is not None  # only the trainable path has none
        A, B, present = layer.weights(spec.num_slots)  # [N, D], [N, O], [N] | None
        x2 = x.reshape(-1, x.shape[-1])  # [T, D]
        if A.dtype != x2.dtype:
            A, B = A.to(x2.dtype), B.to(x2.dtype)
        routing = route(
            torch.mm(x2, A.t()),  # [T, N]: every expert, every token
            top_k=layout.token_top_k if layout.top_k is not None else spec.routing.top_k,
            tau=spec.routing.tau,
            threshold=(
                layout.token_threshold if layout.threshold is not None else spec.routing.threshold
            ),
            training=spec.training,
            slot_mask=_slot_mask(layout.token_mask, present),
            slot_scale=spec.slot_scale[: spec.num_slots].to(x2.dtype),
            max_top_k=self._max_top_k,
        )
        if spec.records:
            spec.context.record_routing(layer.kind, routing, layout)
        # prefix = K: the gather reads every kept row (zero coefficients past the active
        # ones) instead of reading the active count back from the device.
        delta = apply_values(routing, B, prefix=routing.slots.shape[1])  # [T, O]
        return y + delta.reshape(y.shape).to(y.dtype)

    def _apply_trainable(self, x: Tensor, y: Tensor, layer: AdaptedLayer) -> Tensor:
        """The visible frozen experts plus the ones being learned, with gradients only
        through the latter (and no pruning while training)."""
        spec, trainable = self.spec, self.spec.trainable
        assert trainable is not None and spec.visible is not None
        A_all, B_all, present = layer.weights(spec.num_slots)
        visible = spec.visible if present is None else spec.visible & present  # [N]
        x2 = x.reshape(-1, x.shape[-1])  # [T, D]
        A_parts, B_parts = [A_all[visible]], [B_all[visible]]
        scales = [spec.slot_scale[: spec.num_slots][visible]]
        if layer.path in trainable.tensors:
            A_new, B_new = trainable.tensors[layer.path]
            A_parts.append(A_new)
            B_parts.append(B_new)
            scales.append(A_new.new_full((A_new.shape[0],), trainable.scale))
        A, B = torch.cat(A_parts).to(x2.dtype), torch.cat(B_parts).to(x2.dtype)  # [N', D|O]
        if A.shape[0] == 0:
            return y
        routing = route(
            x2 @ A.t(),  # [T, N']
            top_k=spec.routing.top_k,
            tau=spec.routing.tau,
            threshold=spec.routing.threshold,
            training=spec.training,
            slot_scale=torch.cat(scales).to(x2.dtype),
        )
        delta = apply_values(routing, B, strategy="dense")  # [T, O]
        return y + delta.reshape(y.shape).to(y.dtype)


def budget_bound(spec: ForwardSpec) -> int:
    """The largest effective budget any token of the forward has, from host values where
    the context has them (the engine's always do; a layout's per-sequence budgets are
    otherwise read back from the device once, here, when the backend is prepared)."""
    layout = spec.layout
    assert layout is not None
    budgets = [spec.routing.top_k]
    if layout.top_k is not None:
        context = spec.context
        if context is not None and context.top_k is not None:
            budgets.extend(int(k) for k in context.top_k)
        else:
            budgets.append(int(layout.top_k.max()))
    return effective_top_k(max(budgets), spec.num_slots)


def _slot_mask(token_mask: Tensor | None, present: Tensor | None) -> Tensor | None:
    """[T|1, N] bool: the slots each token may see in this layer (None: all)."""
    if present is not None:
        return present.unsqueeze(0) if token_mask is None else token_mask & present.unsqueeze(0)
    return token_mask
