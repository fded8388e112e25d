"""The interface of a MoRA layer backend: what one adapted layer adds to its base output.

Every adapted layer of a forward pass calls the same backend object, chosen once for the
whole forward by `select.py` and cached with the forward's layout (`context.Layout`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import Tensor

from mora_runtime.experts.slots import RoutingConfig

if TYPE_CHECKING:
    from mora_runtime.experts.backends.trainable import TrainableExperts
    from mora_runtime.experts.context import ForwardContext, Layout


class AdaptedLayer(Protocol):
    """What a backend reads of one adapted layer (`slots.PoolLayer` in serving)."""

    path: str  # module path: keys the trainable experts of this layer
    kind: str  # bounded statistics label, e.g. "q_proj"

    def weights(self, num_slots: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(A [N, D], B [N, O], present [N] bool, or None when every slot is present)."""
        ...


@dataclass(frozen=True)
class ForwardSpec:
    """What every adapted layer of one forward pass shares.

    num_slots   N: the slots every layer scores (the pool's high-water mark).
    device, dtype: where the experts' buffers live and their dtype.
    routing     the defaults (k, tau, delta) where the layout has no per-sequence override.
    slot_scale  [N'] (N' >= N): the output scale of each slot (one per expert set).
    layout      tokens -> sequences, visible slots, per-sequence overrides; None only on the
                trainable-experts path, which ignores it.
    training    no threshold pruning (docs/spec.md step 5 applies at inference only).
    needs_grad  the forward must be differentiable (grad mode on).
    context     where statistics go (None, or a context with record=False: nowhere).
    trainable   experts being learned, scored beside the frozen ones (training only).
    visible     [N] bool: the frozen slots the trainable-experts path scores.
    """

    num_slots: int
    device: torch.device
    dtype: torch.dtype
    routing: RoutingConfig
    slot_scale: Tensor
    layout: Layout | None
    training: bool = False
    needs_grad: bool = False
    context: ForwardContext | None = None
    trainable: TrainableExperts | None = None
    visible: Tensor | None = None

    @property
    def records(self) -> bool:
        return self.context is not None and self.context.record


class LayerBackend(ABC):
    """One implementation of MoRA's inference or training update of an adapted layer.

    Semantics (docs/spec.md steps 1-6), for every token t of the forward, with x_t its input
    row and N the slots of `ForwardSpec.num_slots`:
        z = A x_t                                    (all N slots, dense)
        visible = slots its sequence's snapshot shows (layout mask) and this layer has
                  (`present`); hidden slots take no part in the norm, top-k or softmax
        s = z / max(||z_visible||, 1e-12);  keep the k_eff = min(max(k, 2), N) largest s
        w = softmax(s_kept / tau);  w_i = 0 where s_i < delta (inference only, no
            renormalising)
        y_t += sum_{i kept} w_i * z_i * slot_scale[i] * B[i]
    with k and delta the sequence's overrides (layout) or the routing defaults. With
    trainable experts (training), their rows are appended after the visible frozen slots
    with the trainable scale, and gradients flow only to them.

    Inputs of `apply`: x [..., D] and y [..., O] with the same leading shape (T rows once
    flattened; x may be strided), y = the base layer's output for x; `layer` gives
    A [N, D], B [N, O] in the spec's dtype and present [N] | None.

    Output and in-place contract: `apply` returns the layer's output. A backend with
    `in_place = True` adds into y and returns y itself (y must then be contiguous and not
    need gradients); otherwise y is left untouched and a new tensor is returned. Callers
    use the return value either way.

    Statistics: when `spec.records`, each call takes one row of the context's recorder for
    `layer.kind` and writes every token's count of contributing experts into it, and adds
    one activation per (valid token, contributing slot) into the context's [S, N] hits.
    The trainable-experts path records nothing.

    Dtype rules: scores and the delta are computed in x's dtype (the experts are cast to it
    if they differ); the delta is added in y's dtype. A backend that only handles some
    dtypes or devices refuses the forward in `prepare`, never per layer.

    Errors: `prepare` returns a reason string when the backend cannot run this forward
    (device, dtype, grad mode, availability, a budget over its limit); once a backend is
    prepared, every layer of the forward must succeed, so nothing is recorded twice.
    """

    name: ClassVar[str]
    in_place: ClassVar[bool] = False

    def __init__(self, spec: ForwardSpec) -> None:
        self.spec = spec

    @classmethod
    def available(cls) -> bool:
        """Whether this backend can run in this process at all (built, right machine)."""
        return True

    @classmethod
    @abstractmethod
    def prepare(cls, spec: ForwardSpec) -> LayerBackend | str:
        """This backend set up for the forward described by `spec`, or why it cannot run it."""

    @abstractmethod
    def apply(self, x: Tensor, y: Tensor, layer: AdaptedLayer) -> Tensor:
        """The layer's output: y plus this layer's MoRA delta (see the class docstring)."""


class BackendUnavailable(RuntimeError):
    """An explicitly chosen backend cannot run the forward (the message says why)."""
