"""A plain rank-r LoRA on the same modules as the expert pool: the evaluation's baselines.

`y = W0 x + bias + scale * B^T (A x)` with `A [r, D]` (kaiming-uniform, a = sqrt(5)) and
`B [r, O]` (zero): the trainable-parameter count of one MoRA task of rank r, initialised the
same way. It is applied with forward hooks on an *unpatched* copy of the base model, so the
same model serves the frozen base (`disabled()`), one LoRA trained sequentially over every
task, and one LoRA per task swapped in by `load_state` (the oracle-task-id upper bound).

Shape legend: T = tokens, D/O = layer sizes, r = rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mora_runtime.learn.trainer import init_experts

LoRAState = dict[str, tuple[Tensor, Tensor]]


class LoRA:
    """Hooks that add a rank-r update to every listed module of `model` while enabled."""

    def __init__(
        self,
        model: nn.Module,
        modules: Mapping[str, tuple[int, int]],
        rank: int,
        *,
        scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.rank = rank
        self.scale = float(scale)
        param = next(model.parameters())
        self.params = init_experts(modules, rank, torch.Generator().manual_seed(seed))
        for A, B in self.params.values():
            A.data = A.data.to(param.device, param.dtype)
            B.data = B.data.to(param.device, param.dtype)
        self._handles: list[Any] = []
        self.enable()

    def parameters(self) -> list[nn.Parameter]:
        return [p for pair in self.params.values() for p in pair]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _hook(self, path: str):
        A, B = self.params[path]

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            x = inputs[0]  # [..., D]
            return output + self.scale * ((x @ A.t()) @ B).to(output.dtype)  # [..., O]

        return hook

    def enable(self) -> None:
        if self._handles:
            return
        for path in self.params:
            module = self.model.get_submodule(path)
            self._handles.append(module.register_forward_hook(self._hook(path)))

    def disable(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The frozen base model, for as long as the block runs."""
        was_enabled = bool(self._handles)
        self.disable()
        try:
            yield
        finally:
            if was_enabled:
                self.enable()

    def state(self) -> LoRAState:
        return {p: (A.detach().clone(), B.detach().clone()) for p, (A, B) in self.params.items()}

    def load_state(self, state: LoRAState) -> None:
        with torch.no_grad():
            for path, (A, B) in self.params.items():
                A.copy_(state[path][0])
                B.copy_(state[path][1])

    def reset(self, seed: int) -> None:
        """Fresh initialisation (keys kaiming-uniform, values zero) from `seed`."""
        shapes = {p: (A.shape[1], B.shape[1]) for p, (A, B) in self.params.items()}
        fresh = init_experts(shapes, self.rank, torch.Generator().manual_seed(seed))
        self.load_state({p: (A.data, B.data) for p, (A, B) in fresh.items()})
