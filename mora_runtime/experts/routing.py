"""MoRA routing and the rank-1 expert delta of one adapted linear layer.

Semantics (docs/spec.md, per token x):
    z = A x;  s = z / ||z||;  keep the k_eff = min(max(k, 2), N) largest signed s;
    w = softmax(s_kept / tau);  w_i *= [s_i >= delta] (inference only, no renormalising);
    delta_y = scale * sum_i w_i * z_i * b_i.

Shape legend:
    T = tokens, D = layer input size, O = layer output size,
    N = expert slots scored, K = experts kept per token (k_eff), P = active prefix of K.

Two implementations live here on purpose: `reference_delta` is a per-token loop that reads
like the spec, `route` + `apply_values` are the tensor path (the torch layer backend).
`mora_delta` runs one layer through the layer backends as a served forward does. Tests
compare them; keep them in step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mora_runtime.experts.slots import RoutingConfig

NORM_EPS = 1e-12
MIN_TOP_K = 2

# Below these sizes the dense value product beats gathering rows: the gather's index_select
# and batched product have a fixed cost that only a large [T, N] x [N, O] product repays.
_GATHER_MIN_SLOTS = 32
_GATHER_MIN_MACS = 1 << 20

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


def effective_top_k(top_k: int, num_experts: int) -> int:
    """k_eff = min(max(k, 2), N): the budget is never below 2 nor above the pool."""
    return min(max(int(top_k), MIN_TOP_K), num_experts)


def _per_token(value: PerToken, like: Tensor) -> Tensor | float:
    """A scalar stays a Python number (no tensor op); a [T] setting becomes [T, 1]."""
    if isinstance(value, Tensor):
        return value.to(device=like.device, dtype=like.dtype).reshape(-1, 1)
    return float(value)


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
    max_top_k: int | None = None,
) -> Routing:
    """Route every token to its sparse set of experts from the raw scores `z` [T, N].

    `top_k`, `tau`, `threshold` are scalars or per-token tensors [T]. `slot_mask` [T|1, N]
    bool hides slots a token may not see (a pool version that does not contain them):
    hidden slots take no part in the norm, the top-k or the softmax, exactly as if absent.
    `slot_scale` [N] gives each slot its own output scale (one per expert set); otherwise
    `scale` applies to all. `max_top_k`: with a per-token `top_k`, a bound the caller knows
    on the host (at least its largest entry); without it the largest is read back from the
    device, one host sync. A larger bound keeps more candidates, which the per-token budget
    then cuts: the result is the same.
    """
    num_slots = z.shape[1]  # z [T, N]
    candidates = z
    if slot_mask is not None:
        z = z.masked_fill(~slot_mask, 0.0)  # [T, N]: hidden slots leave the norm untouched
        candidates = z.masked_fill(~slot_mask, float("-inf"))  # [T, N]: never selected
    # Top-k on z picks the same experts as on s = z / ||z|| (a positive per-token scalar),
    # so the [T, N] division is skipped: only the kept scores get normalised.
    norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True)  # [T, 1]
    inv_norm = norm.clamp_min(NORM_EPS).reciprocal()  # [T, 1]

    per_token_k = isinstance(top_k, Tensor)
    if per_token_k and max_top_k is None:
        max_top_k = int(top_k.max())  # one host sync
    k = effective_top_k(max_top_k if per_token_k else int(top_k), num_slots)
    kept_z, slots = candidates.topk(k, dim=-1, sorted=True)  # [T, K]
    kept_s = kept_z * inv_norm  # [T, K]; -inf where hidden

    valid: Tensor | None = None
    if slot_mask is not None or per_token_k:
        valid = torch.isfinite(kept_s)  # [T, K]: false only for hidden slots
        if per_token_k:
            budget = top_k.to(z.device).clamp_min(MIN_TOP_K).reshape(-1, 1)  # [T, 1]
            valid &= torch.arange(k, device=z.device).reshape(1, -1) < budget
        kept_z = z.gather(-1, slots)  # [T, K]: finite raw scores (0 where hidden)

    logits = kept_s / _per_token(tau, z)  # [T, K]
    if valid is None:
        w = torch.softmax(logits, dim=-1)  # [T, K]: every kept expert is valid
    else:
        # Written out so that a token with nothing valid gets zero weights, not NaN.
        logits = logits.masked_fill(~valid, float("-inf"))
        peak = logits.amax(dim=-1, keepdim=True).nan_to_num(0.0, neginf=0.0)  # [T, 1]
        e = torch.exp(logits - peak)  # [T, K]: exp(-inf) = 0 for invalid entries
        w = e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)

    if training:
        active = valid if valid is not None else torch.ones_like(slots, dtype=torch.bool)
    else:
        active = kept_s >= _per_token(threshold, z)  # [T, K]
        if valid is not None:
            active &= valid
        w = torch.where(active, w, 0.0)  # no renormalisation after pruning (spec step 5)

    # The weights multiply the raw projection z_i, not s_i (spec step 6).
    coeff = w * kept_z  # [T, K]
    if slot_scale is not None:
        coeff = coeff * slot_scale[slots]
    elif scale != 1.0:
        coeff = coeff * scale
    return Routing(slots=slots, coeff=coeff, active=active)


def choose_strategy(num_tokens: int, top_k: int, num_slots: int, out_features: int) -> str:
    """The cheaper value-side product for these shapes (see `apply_values`)."""
    # Dense costs T*N*O multiply-adds; gather about T*K*O plus a few fixed-cost ops, which
    # only pays once the dense product is big (thresholds from benchmarks/routing.py).
    dense_macs = num_tokens * num_slots * out_features
    if num_slots < max(_GATHER_MIN_SLOTS, 4 * top_k) or dense_macs < _GATHER_MIN_MACS:
        return "dense"
    return "gather"


def apply_values(
    routing: Routing, B: Tensor, *, strategy: str = "auto", prefix: int | None = None
) -> Tensor:
    """delta [T, O] = sum over active experts of coeff * B[slot].

    "dense" scatters coefficients into [T, N] and multiplies by all of B (what a rank-N LoRA
    costs). "gather" uses that the active experts of a token are a prefix of its kept list
    (the list is sorted by score, and hiding, budgets and the threshold all cut from the
    bottom): it reads only the first P rows of B for each token, so its cost follows the
    experts kept, not N. "auto" picks from the shapes.

    `prefix`: P for the gather. None reads P = the most experts any token has active back
    from the device (one host sync; the rows past it would add zeros); an int is used as
    given, clipped to K: P = K reads every kept row (inactive ones have zero coefficients)
    without waiting for the device.
    """
    num_tokens, k = routing.coeff.shape  # [T, K]
    num_slots, out_features = B.shape  # [N, O]
    if strategy == "auto":
        strategy = choose_strategy(num_tokens, k, num_slots, out_features)
    coeff = routing.coeff if routing.coeff.dtype == B.dtype else routing.coeff.to(B.dtype)
    if strategy == "dense":
        weights = B.new_zeros(num_tokens, num_slots).scatter_add(1, routing.slots, coeff)
        return weights @ B  # [T, N] x [N, O]
    if strategy != "gather":
        raise ValueError(f"unknown value strategy {strategy!r}")
    if not num_tokens:
        prefix = 0
    elif prefix is None:
        prefix = int(routing.active_per_token.max())  # P (one host sync)
    else:
        prefix = min(prefix, k)
    if prefix == 0:
        return B.new_zeros(num_tokens, out_features)
    slots = routing.slots[:, :prefix].reshape(-1)  # [T * P]
    rows = B.index_select(0, slots).view(num_tokens, prefix, out_features)  # [T, P, O]
    return torch.bmm(coeff[:, :prefix].unsqueeze(1), rows).squeeze(1)  # [T, 1, P] x [T, P, O]


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
    backend: str = "auto",
) -> Tensor:
    """Semantics: delta[t] = scale * sum_{i in kept(t)} w_i(t) * (A x_t)_i * B_i.

    x [T, D], A [N, D], B [N, O] -> [T, O] in x's dtype. Keys are scored densely (one
    [T, D] x [D, N] product); values touch only the rows kept after pruning. `threshold`
    applies only when `training` is False. N = 0 gives zeros. `backend` picks the layer
    backend as a served forward does (mora_runtime/experts/backends): "auto" (the fused CPU
    extension for CPU float32 inference, the Triton kernel for CUDA inference, else the
    tensor path), "torch" (`route` + `apply_values`: any device, differentiable),
    "cpu_fused" or "triton".
    """
    if A.shape[0] == 0:
        return x.new_zeros(x.shape[0], B.shape[1])
    from mora_runtime.experts.backends.select import delta  # the backends build on this module

    routing = RoutingConfig(top_k=top_k, tau=tau, threshold=threshold)
    return delta(x, A, B, routing=routing, scale=scale, training=training, backend=backend)


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
