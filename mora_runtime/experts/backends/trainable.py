"""Experts being learned, installed beside a frozen pool for the forwards of one thread.

    with trainable_experts(pool, {path: (A [r, D], B [r, O]), ...}, scale=2.0):
        loss = model(batch)...    # every adapted layer scores the frozen experts and these

The pool is not touched: the experts live here, and `select.forward_plan` hands forwards
through `pool` on this thread to the torch backend's trainable path while they are installed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor

from mora_runtime.experts.pool import ExpertPool

_state = threading.local()


class TrainableExperts:
    """The experts of one training run (usually `nn.Parameter`s) and their output scale.

    They share the normalisation, top-k and softmax with the frozen experts of the pool's
    latest version, exactly as they will once saved and loaded as a set."""

    def __init__(self, tensors: Mapping[str, tuple[Tensor, Tensor]], scale: float) -> None:
        self.tensors = dict(tensors)
        self.scale = float(scale)
        # The plan of the latest forward: (what it was made for, the plan).
        self.cached: tuple[tuple[Any, ...], Any] | None = None


def installed(pool: ExpertPool) -> TrainableExperts | None:
    """The trainable experts installed for `pool` on this thread, if any."""
    return getattr(_state, "by_pool", {}).get(id(pool))


@contextlib.contextmanager
def trainable_experts(
    pool: ExpertPool, tensors: Mapping[str, tuple[Tensor, Tensor]], scale: float = 1.0
) -> Iterator[TrainableExperts]:
    """Score `tensors` (module path -> (A [r, D], B [r, O])) beside `pool`'s experts in every
    forward through `pool` on this thread, until the block ends. Not for serving."""
    pool.check_tensors("<trainable>", tensors)
    experts = TrainableExperts(tensors, scale)
    by_pool: dict[int, TrainableExperts] = _state.__dict__.setdefault("by_pool", {})
    previous = by_pool.get(id(pool))
    by_pool[id(pool)] = experts
    try:
        yield experts
    finally:
        if previous is None:
            by_pool.pop(id(pool), None)
        else:
            by_pool[id(pool)] = previous
