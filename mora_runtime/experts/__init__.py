"""MoRA's rank-1 experts: routing, the pool, the forward context, the adapted layer and its
layer backends.

`mora_delta` (experts/routing.py) is the public entry point for one layer's update. It loads
on first use so that importing the torch-free records here (stats.py) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mora_runtime.experts.routing import mora_delta

__all__ = ["mora_delta"]


def __getattr__(name: str) -> Any:
    if name == "mora_delta":
        from mora_runtime.experts.routing import mora_delta

        return mora_delta
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
