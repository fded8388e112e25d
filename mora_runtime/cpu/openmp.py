"""Keep one long-lived thread doing torch's CPU work: the engine's.

torch on Linux parallelises its CPU ops with GNU OpenMP (libgomp), which keeps one pool of
worker threads per thread that ever ran a parallel region. When the workers of all pools
outnumber the cores, libgomp switches to its short "throttled" spin between parallel
regions and its workers go to sleep, so every region pays a wake-up. A decode step runs
hundreds of small regions, so once the main thread has run torch ops, the same ops on a
second thread are much slower (docs/performance.md, Threads); a second thread in a process
whose main thread never ran torch ops is as fast as the main thread.

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
