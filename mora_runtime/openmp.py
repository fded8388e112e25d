"""Keep one long-lived thread doing torch's CPU work: the engine's.

torch on Linux parallelises its CPU ops with GNU OpenMP (libgomp), which keeps one pool of
worker threads per thread that ever ran a parallel region. When the workers of all pools
outnumber the cores, libgomp stops spinning between parallel regions and puts its workers
to sleep after about a hundred spins ("throttled" waiting), so every region pays a futex
wake-up. A decode step runs hundreds of small regions: on 2 cores, a model loaded (or a
baseline run) on the main thread and then served from the engine thread ran every op about
twice as slow as on the main thread alone (benchmarks/engine.py measured it; see README).

A pool lives as long as its thread, so torch work that is not the engine's (loading and
quantising the model, reading an expert set, a benchmark's baselines) runs on a thread
that exits when it is done: `in_fresh_thread`. Pool mutations run on the engine thread
itself (`Engine.run_exclusive`). Where torch does not use libgomp this costs one thread
start per call and changes nothing else.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def in_fresh_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on a new thread that ends with it (its OpenMP pool too).

    Exceptions propagate to the caller; torch's thread settings are global, so the thread
    uses the same number of cores as the caller."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name=f"mora-torch-{fn.__name__}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
