"""MoRA routing and the rank-1 expert delta of one adapted linear layer.

Semantics (MORA_SPEC.md, per token x):
    z = A x;  s = z / ||z||;  keep the k_eff = min(max(k, 2), N) largest signed s;
    w = softmax(s_kept / tau);  w_i *= [s_i >= delta] (inference only, no renormalising);
    delta_y = scale * sum_i w_i * z_i * b_i.

Shape legend:
    T = tokens, D = layer input size, O = layer output size,
    N = expert slots scored, K = experts kept per token (k_eff), U = slots used by a batch.

Two implementations live here on purpose: `reference_delta` is a per-token loop that reads
like the spec, `mora_delta` / `route` + `apply_values` are the serving fast path. Tests
compare them; keep them in step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NORM_EPS = 1e-12
MIN_TOP_K = 2

# Value-side strategy: the compact product touches only the U slots some token kept, at the
# cost of a `unique` and a row gather; below this many slots the dense product always wins.
_COMPACT_MIN_SLOTS = 32
# Use the compact product when it needs at most this fraction of the dense FLOPs.
_COMPACT_MAX_FRACTION = 0.5

PerToken = float | int | Tensor


@dataclass(frozen=True)
class Routing:
    """Which experts each token kept and how much each contributes.

    slots  [T, K] long: slot index of each kept expert (meaningless where not `active`).
    coeff  [T, K]: w_i * z_i * scale_i, zero where the expert is inactive.
    active [T, K] bool: the expert passed top-k, the version mask and (at inference) delta.
    """

    slots: Tensor
    coeff: Tensor
    active: Tensor

    @property
    def active_per_token(self) -> Tensor:
        """[T] long: how many experts contribute to each token."""
        return self.active.sum(dim=-1)

    def used_slots(self) -> Tensor:
        """[U] long: sorted slots that at least one token activated."""
        return torch.unique(self.slots[self.active])


def effective_top_k(top_k: int, num_experts: int) -> int:
    """k_eff = min(max(k, 2), N): the budget is never below 2 nor above the pool."""
    return min(max(int(top_k), MIN_TOP_K), num_experts)


def _per_token(value: PerToken, like: Tensor) -> Tensor:
    """A scalar or [T] setting as a [T, 1] tensor broadcastable against [T, K]."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return t.reshape(-1, 1) if t.ndim else t.reshape(1, 1)


def route(
    z: Tensor,
    *,
    top_k: int | Tensor,
    tau: PerToken,
    threshold: PerToken,
    training: bool = False,
    slot_mask: Tensor | None = None,
    slot_scale: Tensor | None = None,
    scale: float = 1.0,
) -> Routing:
    """Route every token to its sparse set of experts from the raw scores `z` [T, N].

    `top_k`, `tau`, `threshold` are scalars or per-token tensors [T]. `slot_mask` [T|1, N]
    bool hides slots a token may not see (a pool version that does not contain them):
    hidden slots take no part in the norm, the top-k or the softmax, exactly as if absent.
    `slot_scale` [N] gives each slot its own output scale (one per expert set); otherwise
    `scale` applies to all.
    """
    num_slots = z.shape[1]  # z [T, N]
    if slot_mask is not None:
        z = z.masked_fill(~slot_mask, 0.0)  # [T, N]: hidden slots leave the norm untouched
    norm = z.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)  # [T, 1]
    s = z / norm  # [T, N]
    if slot_mask is not None:
        s = s.masked_fill(~slot_mask, float("-inf"))  # [T, N]: never selected

    per_token_k = isinstance(top_k, Tensor)
    k_max = int(top_k.max()) if per_token_k else int(top_k)
    k = effective_top_k(k_max, num_slots)
    kept_s, slots = s.topk(k, dim=-1, sorted=True)  # [T, K]
    valid = torch.isfinite(kept_s)  # [T, K]: false only for hidden slots
    if per_token_k:
        budget = top_k.to(z.device).clamp_min(MIN_TOP_K).reshape(-1, 1)  # [T, 1]
        valid &= torch.arange(k, device=z.device).reshape(1, -1) < budget  # [T, K]

    # Softmax over the kept experts only; written out so a token with nothing valid gets
    # all-zero weights instead of NaN.
    logits = (kept_s / _per_token(tau, z)).masked_fill(~valid, float("-inf"))  # [T, K]
    peak = logits.amax(dim=-1, keepdim=True).nan_to_num(0.0, neginf=0.0)  # [T, 1]
    e = torch.exp(logits - peak)  # [T, K]: exp(-inf) = 0 for invalid entries
    w = e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)  # [T, K]

    active = valid
    if not training:
        active = valid & (kept_s >= _per_token(threshold, z))  # [T, K]
        w = w * active  # no renormalisation after pruning (spec step 5)

    z_kept = z.gather(-1, slots)  # [T, K]: weights multiply the raw projection
    per_slot_scale = slot_scale[slots] if slot_scale is not None else scale
    coeff = w * z_kept * per_slot_scale  # [T, K]
    return Routing(slots=slots, coeff=coeff, active=active)


def apply_values(routing: Routing, B: Tensor, *, strategy: str = "auto") -> Tensor:
    """delta [T, O] = sum over kept experts of coeff * B[slot].

    strategy "dense" scatters coefficients into [T, N] and multiplies by all of B (what a
    rank-N LoRA costs); "compact" multiplies only by the U rows some token uses; "auto" picks
    the cheaper from the shapes.
    """
    num_tokens, k = routing.coeff.shape  # [T, K]
    num_slots, out_features = B.shape  # [N, O]
    if num_tokens == 0 or k == 0:
        return B.new_zeros(num_tokens, out_features)
    if strategy == "auto":
        strategy = "dense" if num_slots < _COMPACT_MIN_SLOTS else "compact"
    if strategy == "dense":
        weights = B.new_zeros(num_tokens, num_slots)  # [T, N]
        weights.scatter_add_(1, routing.slots, routing.coeff.to(B.dtype))
        return weights @ B  # [T, O]
    if strategy != "compact":
        raise ValueError(f"unknown value strategy {strategy!r}")

    used = routing.used_slots()  # [U]
    num_used = used.numel()
    if num_used == 0:
        return B.new_zeros(num_tokens, out_features)
    if num_used * (num_tokens + 1) > _COMPACT_MAX_FRACTION * num_tokens * num_slots:
        return apply_values(routing, B, strategy="dense")
    position = torch.zeros(num_slots, dtype=torch.long, device=B.device)  # [N]
    position[used] = torch.arange(num_used, device=B.device)
    weights = B.new_zeros(num_tokens, num_used)  # [T, U]
    # Inactive entries carry coeff 0, so scattering them into any column is harmless.
    weights.scatter_add_(1, position[routing.slots], routing.coeff.to(B.dtype))
    return weights @ B.index_select(0, used)  # [T, U] x [U, O] -> [T, O]


def mora_delta(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    *,
    top_k: int,
    tau: float,
    threshold: float,
    scale: float = 1.0,
    training: bool = False,
) -> Tensor:
    """Semantics: delta[t] = scale * sum_{i in kept(t)} w_i(t) * (A x_t)_i * B_i.

    x [T, D], A [N, D], B [N, O] -> [T, O] in x's dtype. Keys are scored densely (one
    [T, D] x [D, N] product); values touch only the rows kept after pruning when that is
    cheaper. `threshold` applies only when `training` is False. N = 0 gives zeros.
    """
    num_tokens = x.shape[0]
    if A.shape[0] == 0:
        return x.new_zeros(num_tokens, B.shape[1])
    z = x @ A.t()  # [T, N]
    routing = route(z, top_k=top_k, tau=tau, threshold=threshold, training=training, scale=scale)
    strategy = "dense" if training else "auto"  # autograd through the dense product is simplest
    return apply_values(routing, B, strategy=strategy)


def reference_delta(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    *,
    top_k: int,
    tau: float,
    threshold: float,
    scale: float = 1.0,
    training: bool = False,
) -> Tensor:
    """The spec, one token at a time, with no vectorised tricks. Slow; tests only."""
    num_experts = A.shape[0]
    out = torch.zeros(x.shape[0], B.shape[1], dtype=torch.float64)
    if num_experts == 0:
        return out.to(x.dtype)
    A64, B64 = A.double(), B.double()
    for t in range(x.shape[0]):
        z = (A64 @ x[t].double()).tolist()
        norm = max(sum(v * v for v in z) ** 0.5, NORM_EPS)
        s = [v / norm for v in z]
        k = min(max(top_k, 2), num_experts)
        kept = sorted(range(num_experts), key=lambda i: s[i], reverse=True)[:k]
        peak = max(s[i] / tau for i in kept)
        exps = {i: torch.exp(torch.tensor(s[i] / tau - peak, dtype=torch.float64)) for i in kept}
        total = sum(exps.values())
        for i in kept:
            w = exps[i] / total
            if not training and s[i] < threshold:
                w = 0.0
            out[t] += scale * w * z[i] * B64[i]
    return out.to(x.dtype)
