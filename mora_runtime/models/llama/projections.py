"""Fused projections: several linear layers that read the same input, run as one product.

q/k/v read the same normed hidden state, and so do the MLP's gate and up: stacking their
weights by rows turns three (resp. two) products into one, which reads the input once and
pays one call's set-up. The members keep their weights as views of the stacked ones, so
nothing is stored twice and HF's own forward (which calls the members) sees the very same
numbers.

MoRA's adapted modules stay first-class: a member wrapped by `MoRALinear` gets its own delta
on its own slice of the fused output, through the same layer backend its wrapper would call
(`forward_plan`), with the same input, so the result equals the wrapper's.

Shape legend: T = tokens (any leading shape), D = in features, O = the members' out
features stacked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mora_runtime.experts.backends.select import forward_plan
from mora_runtime.experts.patching import MoRALinear
from mora_runtime.models.quantize import ROWS, Q4Linear, QuantizedLinear


def base(module: nn.Module) -> nn.Module:
    """The product a MoRA wrapper adds to, or the module itself."""
    return module.base_layer if isinstance(module, MoRALinear) else module


def products(layer: nn.Module) -> tuple[nn.Module, ...]:
    """A Llama-family decoder layer's seven products, wrapped by MoRA or not, as they are now."""
    attention, mlp = layer.self_attn, layer.mlp
    return (
        attention.q_proj,
        attention.k_proj,
        attention.v_proj,
        attention.o_proj,
        mlp.gate_proj,
        mlp.up_proj,
        mlp.down_proj,
    )


def _fusable(bases: Sequence[nn.Module]) -> str | None:
    kinds = {type(b) for b in bases}
    if len(kinds) != 1:
        return f"members of different kinds ({', '.join(k.__name__ for k in kinds)})"
    kind = kinds.pop()
    if len({b.in_features for b in bases}) != 1:
        return "members with different inputs"
    if len({b.bias is None for b in bases}) != 1:
        return "members with and without bias"
    if kind is nn.Linear:
        return None
    if kind is Q4Linear:
        if any(b.out_features % ROWS for b in bases):
            return f"int4 members whose rows are not a multiple of {ROWS}"
        return None
    return f"{kind.__name__} members"


def _stack(tensors: Sequence[Tensor | None]) -> Tensor | None:
    return None if tensors[0] is None else torch.cat([t.detach() for t in tensors])


def _fuse(bases: Sequence[nn.Module]) -> nn.Module:
    """One module whose output is the members' outputs side by side; each member's
    weights become views of its rows."""
    if type(bases[0]) is nn.Linear:
        bias = _stack([b.bias for b in bases])
        out_features = sum(b.out_features for b in bases)
        # On the meta device: no initialisation of a weight that is replaced at once.
        fused = nn.Linear(bases[0].in_features, out_features, bias is not None, device="meta")
        fused.weight = nn.Parameter(_stack([b.weight for b in bases]), requires_grad=False)
        if bias is not None:
            fused.bias = nn.Parameter(bias, requires_grad=False)
        start = 0
        for b in bases:
            rows = slice(start, start + b.out_features)
            b.weight = nn.Parameter(fused.weight[rows], requires_grad=False)
            if bias is not None:
                b.bias = nn.Parameter(fused.bias[rows], requires_grad=False)
            start += b.out_features
        return fused
    # Q4Linear: the packed buffers are grouped by ROWS output rows, so stacking groups is
    # stacking rows, and a member's groups are one contiguous slice of the stack.
    fused = Q4Linear.__new__(Q4Linear)
    QuantizedLinear.__init__(fused, _Shape(bases))
    for name in ("packed", "d", "m"):
        fused.register_buffer(name, _stack([getattr(b, name) for b in bases]))
    fused.prefill_float = bases[0].prefill_float
    start = group = 0
    for b in bases:
        groups = b.out_features // ROWS
        for name in ("packed", "d", "m"):
            setattr(b, name, getattr(fused, name)[group : group + groups])
        b.weight = fused.weight[start : start + b.out_features]
        if b.bias is not None:
            b.bias = fused.bias[start : start + b.out_features]
        start, group = start + b.out_features, group + groups
    return fused


class _Shape:
    """What QuantizedLinear's constructor reads of a linear: the stacked members."""

    def __init__(self, bases: Sequence[nn.Module]) -> None:
        self.in_features = bases[0].in_features
        self.out_features = sum(b.out_features for b in bases)
        self.weight = _stack([b.weight for b in bases])
        self.bias = _stack([b.bias for b in bases])


class FusedProjection:
    """The members of one fused product; `__call__` gives each member's output."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        bases = [base(m) for m in members]
        self.reason = _fusable(bases)
        self.sizes = [b.out_features for b in bases]
        self.module = _fuse(bases) if self.reason is None else None

    def __call__(self, x: Tensor, members: Sequence[nn.Module]) -> list[Tensor]:
        """Each member's output for x [..., D]; `members` are the modules as they are now
        (wrapped by MoRA or not: patching may come and go after fusing)."""
        y = self.module(x)  # [..., O]
        parts = list(y.split(self.sizes, dim=-1))
        for i, member in enumerate(members):
            if not isinstance(member, MoRALinear):
                continue
            plan = forward_plan(member.pool, x)
            if plan is None:
                continue  # no expert for any token: the base output, as the wrapper gives
            parts[i] = plan.apply(x, parts[i].contiguous(), member._layer)
        return parts
