"""The Triton kernel of the triton layer backend (`triton_backend.py`), imported only once that
backend is prepared, so a process that never asks for it never imports triton.

One program routes one token and accumulates one block of its output columns: from the
token's raw scores z [N] (computed by torch before the launch) it takes the L2 norm over the
slots the token may see, keeps the k largest signed scores by k max passes over the N
scores, weights them by softmax(s / tau) (the shift is the first pass's maximum, so the
running sum needs no second sweep), drops the ones under the threshold without
renormalising, and adds w_i * z_i * scale_i * B[i] for each kept row in float32.
The first output block of each token also writes the token's statistics.

The kernel body is a plain function, decorated on first use (`compiled`): triton decides at
decoration time between the compiler and the interpreter (TRITON_INTERPRET=1), so a process
that switches modes (the CPU tests) gets a kernel of each kind.
"""

import triton
import triton.language as tl
from triton import knobs


def _route_apply(
    z_ptr,  # [T, N] scores, any float dtype
    b_ptr,  # [N, O] value rows
    y_ptr,  # [T, O] base output
    out_ptr,  # [T, O] base output plus the delta
    scale_ptr,  # [N'] slot scale
    seq_ptr,  # [T] long: each token's sequence
    mask_ptr,  # [S|1, N] uint8: the slots each sequence's snapshot shows
    present_ptr,  # [N] uint8: the slots this layer has
    top_k_ptr,  # [S] long per-sequence budgets
    threshold_ptr,  # [S] float32 per-sequence thresholds
    valid_ptr,  # [T] uint8: tokens counted in the statistics
    active_ptr,  # [L, T] int32 statistics buffer
    hits_ptr,  # [S, N] long statistics buffer
    num_slots,
    out_features,
    stride_z,
    stride_b,
    stride_y,
    stride_out,
    stride_mask,  # 0 when one mask row serves every sequence
    stride_hits,
    active_offset,  # the first element of this layer's row in the active buffer
    default_top_k,
    tau,
    default_threshold,
    K_MAX: tl.constexpr,  # the largest effective budget of any token of the forward
    BLOCK_N: tl.constexpr,
    BLOCK_O: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_PRESENT: tl.constexpr,
    HAS_TOP_K: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr,
    HAS_VALID: tl.constexpr,
    RECORD: tl.constexpr,
):
    # Reductions go through tl.reduce with triton's own combine functions rather than
    # tl.max / tl.min / tl.sum: those are jitted functions fixed to the compiler or the
    # interpreter when triton.language is first imported (torch may import it before a test
    # sets TRITON_INTERPRET=1), while the interpreter's tl.reduce recognises these combine
    # functions by identity in either case.
    token = tl.program_id(0)
    block_o = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    in_range = offs_n < num_slots
    seq = tl.load(seq_ptr + token)

    visible = in_range
    if HAS_MASK:
        shown = tl.load(mask_ptr + seq * stride_mask + offs_n, mask=in_range, other=0)
        visible = visible & (shown != 0)
    if HAS_PRESENT:
        has = tl.load(present_ptr + offs_n, mask=in_range, other=0)
        visible = visible & (has != 0)

    # Hidden slots take no part in the norm, the top-k or the softmax (docs/spec.md).
    z = tl.load(z_ptr + token * stride_z + offs_n, mask=visible, other=0.0).to(tl.float32)
    inv_norm = 1.0 / tl.maximum(tl.sqrt(tl.reduce(z * z, 0, tl.standard._sum_combine)), 1e-12)
    candidates = tl.where(visible, z, float("-inf"))
    peak = tl.reduce(
        candidates, 0, tl.standard._elementwise_max
    )  # the first kept score: softmax's shift

    budget = default_top_k
    if HAS_TOP_K:
        budget = tl.load(top_k_ptr + seq).to(tl.int32)
    budget = tl.maximum(budget, 2)  # k_eff = min(max(k, 2), N_visible)
    threshold = default_threshold
    if HAS_THRESHOLD:
        threshold = tl.load(threshold_ptr + seq)
    counted = True
    if HAS_VALID:
        counted = tl.load(valid_ptr + token) != 0
    record = block_o == 0  # the first output block of a token writes its statistics

    offs_o = block_o * BLOCK_O + tl.arange(0, BLOCK_O)
    in_out = offs_o < out_features
    acc = tl.full([BLOCK_O], 0.0, tl.float32)
    total = 0.0  # the softmax's denominator over every kept score
    active = 0
    for j in range(K_MAX):
        best = tl.reduce(candidates, 0, tl.standard._elementwise_max)
        # The lowest slot among equal scores, as the float64 reference's stable sort.
        slot = tl.reduce(
            tl.where(candidates == best, offs_n, BLOCK_N), 0, tl.standard._elementwise_min
        )
        kept = (j < budget) & (best > float("-inf"))
        best = tl.where(kept, best, 0.0)  # finite from here on: no inf - inf below
        shift = tl.where(kept, peak, 0.0)
        e = tl.where(kept, tl.exp((best - shift) * inv_norm / tau), 0.0)
        total += e
        on = kept & (best * inv_norm >= threshold)  # pruned weights are not renormalised
        scale = tl.load(scale_ptr + slot, mask=on, other=0.0).to(tl.float32)
        # tl.where rather than `in_out & on`: the interpreter cannot AND a block with a
        # scalar comparison.
        row = tl.load(b_ptr + slot * stride_b + offs_o, mask=tl.where(on, in_out, False), other=0.0)
        acc += tl.where(on, e * best * scale, 0.0) * row.to(tl.float32)
        active += on.to(tl.int32)
        if RECORD:
            hit = tl.where(on & counted, 1, 0).to(tl.int64)
            tl.atomic_add(hits_ptr + seq * stride_hits + slot, hit, mask=record & on & counted)
        candidates = tl.where(offs_n == slot, float("-inf"), candidates)

    # total is 0 (nothing visible, acc is 0 too) or at least 1 (the peak's own term).
    delta = acc / tl.maximum(total, 1.0)
    base = tl.load(y_ptr + token * stride_y + offs_o, mask=in_out, other=0.0)
    result = base.to(tl.float32) + delta
    tl.store(
        out_ptr + token * stride_out + offs_o, result.to(out_ptr.dtype.element_ty), mask=in_out
    )
    if RECORD:
        tl.store(active_ptr + active_offset + token, active, mask=record)


_COMPILED: dict[bool, object] = {}


def compiled() -> object:
    """The jitted kernel for the current TRITON_INTERPRET mode."""
    interpret = bool(knobs.runtime.interpret)
    kernel = _COMPILED.get(interpret)
    if kernel is None:
        kernel = _COMPILED[interpret] = triton.jit(_route_apply)
    return kernel
