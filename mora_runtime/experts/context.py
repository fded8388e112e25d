"""Per-forward routing context: which pool version each token sees, and what it activated.

A forward pass may carry sequences admitted at different pool versions (continuous
batching). The caller states, per sequence, its snapshot and optional routing overrides, and
how tokens map to sequences; every adapted layer then reads the same context. What the
layers need is worked out once per forward (`layout`), not once per layer, and recording
writes into preallocated buffers that `collect()` reduces in one go: at decode batch sizes
the fixed cost of small tensor operations, repeated over every adapted layer, is what the
pool would otherwise add to a step.

Shape legend: S = sequences in the forward, T = tokens, N = slots, K = kept experts,
L = adapted layers that recorded.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from mora_runtime.experts.pool import ExpertPool
from mora_runtime.experts.routing import Routing
from mora_runtime.experts.slots import PoolSnapshot
from mora_runtime.experts.stats import SequenceRouting, StepRouting

_FIRST_ROWS = 64  # recording rows allocated up front (one per adapted layer call)
_MAX_LAYOUTS = 32


@dataclass(frozen=True)
class Layout:
    """How the T tokens of one forward map to sequences and which slots each may see.

    seq       [T] long: the sequence of every token (zeros for a single sequence).
    mask      [S, N] bool, or None when every sequence sees every slot.
    top_k     [S] long, threshold [S] float32: per-sequence overrides, or None.
    """

    num_tokens: int
    num_slots: int
    num_sequences: int
    seq: Tensor
    mask: Tensor | None
    top_k: Tensor | None
    threshold: Tensor | None
    # What adapted layers derive from the layout once per forward (the backend, see
    # backends/select.py; the valid-token mask).
    extras: dict[str, Any] = field(default_factory=dict, compare=False)

    # Token-level views for the tensor path (the fused kernel indexes by sequence itself).
    @cached_property
    def token_mask(self) -> Tensor | None:
        """[T|1, N] bool, or None."""
        if self.mask is None or self.mask.shape[0] == 1:
            return self.mask
        return self.mask[self.seq]

    @cached_property
    def token_top_k(self) -> Tensor | None:
        return None if self.top_k is None else self.top_k[self.seq]

    @cached_property
    def token_threshold(self) -> Tensor | None:
        return None if self.threshold is None else self.threshold[self.seq]


class _Recorder:
    """Active experts per token, one row per adapted-layer call, for forwards of T tokens."""

    def __init__(self, layout: Layout, valid: Tensor | None) -> None:
        self.layout = layout
        self.valid = valid  # [T] bool or None
        self.active = torch.zeros(
            _FIRST_ROWS, layout.num_tokens, dtype=torch.int32, device=layout.seq.device
        )  # [L, T]
        self.kinds: list[str] = []

    def next_index(self, kind: str) -> tuple[Tensor, int]:
        """(the [L, T] int32 buffer, the row of it the next layer writes its per-token
        active counts into)."""
        if len(self.kinds) == self.active.shape[0]:
            grown = self.active.new_zeros(2 * self.active.shape[0], self.active.shape[1])
            grown[: len(self.kinds)] = self.active
            self.active = grown
        self.kinds.append(kind)
        return self.active, len(self.kinds) - 1

    def next_row(self, kind: str) -> Tensor:
        """The [T] int32 row the next layer writes its per-token active counts into."""
        buffer, row = self.next_index(kind)
        return buffer[row]


class ForwardContext:
    """Routing inputs and statistics of one forward pass over S sequences."""

    def __init__(
        self,
        snapshots: Sequence[PoolSnapshot],
        *,
        token_seq: Tensor | None = None,
        top_k: Sequence[int] | None = None,
        threshold: Sequence[float] | None = None,
        training: bool = False,
        record: bool = True,
        valid_tokens: Tensor | None = None,
        backend: str = "auto",
    ) -> None:
        if not snapshots:
            raise ValueError("a forward context needs at least one snapshot")
        self.snapshots = tuple(snapshots)
        self.token_seq = token_seq  # [T] long, or None: one sequence per batch row
        self.top_k = top_k
        self.threshold = threshold
        self.training = training
        self.record = record
        # [T] bool: tokens that count in the statistics (padding computes but is not counted)
        self.valid_tokens = valid_tokens
        # The layer backend of this context's forwards (backends/select.py): by name, or
        # "auto" for the first that applies.
        self.backend = backend
        self._visible_any = any(s.num_experts for s in self.snapshots)
        self._layouts: dict[tuple, Layout | None] = {}
        self._recorders: dict[int, _Recorder] = {}  # by token count
        self._hits: Tensor | None = None  # [S, N] long: activations per slot

    @property
    def num_sequences(self) -> int:
        return len(self.snapshots)

    # ------------------------------------------------------------------ layout
    def layout(
        self, num_tokens: int, batch_rows: int, num_slots: int, device: torch.device
    ) -> Layout | None:
        """What the adapted layers of this forward need; None when no token sees any slot."""
        key = (num_tokens, batch_rows, num_slots, device)
        if key not in self._layouts:
            if len(self._layouts) >= _MAX_LAYOUTS:  # a long-lived default context
                self._layouts.clear()
            self._layouts[key] = self._make_layout(num_tokens, batch_rows, num_slots, device)
        return self._layouts[key]

    def _make_layout(
        self, num_tokens: int, batch_rows: int, num_slots: int, device: torch.device
    ) -> Layout | None:
        if not self._visible_any:
            return None
        mask = None
        if not all(s.slots == tuple(range(num_slots)) for s in self.snapshots):
            mask = torch.stack([s.mask(num_slots, device) for s in self.snapshots])  # [S, N]
        return Layout(
            num_tokens=num_tokens,
            num_slots=num_slots,
            num_sequences=self.num_sequences,
            seq=self._tokens_to_seq(num_tokens, batch_rows, device),
            mask=mask,
            top_k=self._per_seq(self.top_k, device, torch.long),
            threshold=self._per_seq(self.threshold, device, torch.float32),
        )

    def _tokens_to_seq(self, num_tokens: int, batch_rows: int, device: torch.device) -> Tensor:
        """[T] long: the sequence of every flattened token."""
        if self.token_seq is not None:
            if self.token_seq.numel() != num_tokens:
                raise ValueError(
                    f"token_seq has {self.token_seq.numel()} entries for {num_tokens} tokens"
                )
            return self.token_seq.to(device=device, dtype=torch.long).contiguous()
        if self.num_sequences == 1:
            return torch.zeros(num_tokens, dtype=torch.long, device=device)
        if batch_rows == self.num_sequences and num_tokens % batch_rows == 0:
            per_row = num_tokens // batch_rows
            return torch.arange(batch_rows, device=device).repeat_interleave(per_row)
        raise ValueError(
            f"{self.num_sequences} snapshots for a batch of {batch_rows} rows: "
            "pass token_seq to map tokens to sequences"
        )

    @staticmethod
    def _per_seq(values, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        if values is None:
            return None
        return torch.as_tensor(list(values), device=device, dtype=dtype)

    # ------------------------------------------------------------------ recording
    def _recorder(self, layout: Layout) -> _Recorder:
        recorder = self._recorders.get(layout.num_tokens)
        if recorder is None:
            recorder = _Recorder(layout, self.valid_mask(layout))
            self._recorders[layout.num_tokens] = recorder
        return recorder

    def active_row(self, kind: str, layout: Layout) -> Tensor | None:
        """[T] int32 buffer row for one layer's per-token active counts (None: not recording)."""
        if not self.record:
            return None
        return self._recorder(layout).next_row(kind)

    def valid_mask(self, layout: Layout) -> Tensor | None:
        """[T] bool: tokens counted in the statistics, None when all are."""
        if "valid" not in layout.extras:
            valid = self.valid_tokens
            if valid is not None:
                valid = valid.to(layout.seq.device, torch.bool).reshape(-1).contiguous()
                if valid.numel() != layout.num_tokens:  # another tower's tokens: all count
                    valid = None
            layout.extras["valid"] = valid
        return layout.extras["valid"]

    def slot_hits(self, layout: Layout) -> Tensor | None:
        """[S, N] long buffer of activations per (sequence, slot) (None: not recording)."""
        if not self.record:
            return None
        hits = self._hits
        if hits is None or hits.shape[1] != layout.num_slots:
            grown = torch.zeros(
                self.num_sequences, layout.num_slots, dtype=torch.long, device=layout.seq.device
            )
            if hits is not None:
                keep = min(hits.shape[1], layout.num_slots)
                grown[:, :keep] = hits[:, :keep]
            self._hits = hits = grown
        return hits

    def recording_buffers(
        self, kind: str, layout: Layout
    ) -> tuple[Tensor | None, int, Tensor | None]:
        """One layer's recording buffers without making the row's view (a tensor op, which
        releases the GIL): (the [L, T] active buffer, this layer's row in it, `slot_hits`),
        or (None, 0, None) when not recording."""
        if not self.record:
            return None, 0, None
        buffer, row = self._recorder(layout).next_index(kind)
        return buffer, row, self.slot_hits(layout)

    def record_routing(self, kind: str, routing: Routing, layout: Layout) -> None:
        """The tensor path's routing of one layer, into the same buffers the fused kernel
        fills."""
        row = self.active_row(kind, layout)
        if row is None:
            return
        row.copy_(routing.active_per_token)
        hits = self.slot_hits(layout)
        active = routing.active  # [T, K]
        valid = self.valid_mask(layout)
        if valid is not None:
            active = active & valid.unsqueeze(1)
        rows = layout.seq.unsqueeze(1).expand_as(routing.slots)  # [T, K]
        hits.index_put_((rows, routing.slots), active.long(), accumulate=True)

    def collect(self) -> StepRouting:
        """Reduce the buffers to plain statistics (one host transfer)."""
        observations = [0] * self.num_sequences
        active = [0] * self.num_sequences
        per_kind: dict[str, list[float]] = {}
        for recorder in self._recorders.values():
            layers = len(recorder.kinds)
            counts = recorder.active[:layers].long()  # [L, T]
            seq = recorder.layout.seq
            if recorder.valid is not None:
                counts = counts[:, recorder.valid]
                seq = seq[recorder.valid]
            per_seq_tokens = torch.bincount(seq, minlength=self.num_sequences)  # [S]
            per_seq_active = torch.zeros(self.num_sequences, dtype=torch.long, device=seq.device)
            per_seq_active.index_add_(0, seq, counts.sum(dim=0))
            for i, (n, a) in enumerate(
                zip((per_seq_tokens * layers).tolist(), per_seq_active.tolist(), strict=True)
            ):
                observations[i] += n
                active[i] += a
            kinds = sorted(set(recorder.kinds))
            for kind in kinds:
                rows = [i for i, k in enumerate(recorder.kinds) if k == kind]
                means = counts[rows].double().mean(dim=0)  # [T]
                per_kind.setdefault(kind, []).extend(means.tolist())
        # Plain lists (one host transfer): a tensor sum per (sequence, set) would pay a tensor
        # op's fixed cost for every pair, every step.
        hits = self._hits.tolist() if self._hits is not None else None
        sequences = []
        for i, snap in enumerate(self.snapshots):
            per_set: dict[str, int] = {}
            if hits is not None:
                for entry in snap.sets:
                    count = sum(hits[i][entry.slot_start : entry.slot_start + entry.rank])
                    if count:
                        per_set[entry.name] = count
            sequences.append(SequenceRouting(observations[i], active[i], per_set))
        return StepRouting(tuple(sequences), {k: tuple(v) for k, v in per_kind.items()})


# Context plumbing: which context the forwards through a pool see on this thread ----------
_state = threading.local()


def current_context(pool: ExpertPool) -> ForwardContext:
    """The context set for `pool` on this thread, else the latest version for all tokens."""
    contexts: dict[int, ForwardContext] = getattr(_state, "contexts", {})
    ctx = contexts.get(id(pool))
    if ctx is not None:
        return ctx
    # No context set (a plain model call): every token sees the latest version. One context
    # per version is kept, so its per-forward layout is not rebuilt at every layer.
    defaults: dict[int, ForwardContext] = _state.__dict__.setdefault("defaults", {})
    latest = pool.latest()
    ctx = defaults.get(id(pool))
    if ctx is None or ctx.snapshots[0] is not latest:
        ctx = defaults[id(pool)] = ForwardContext([latest], record=False)
    return ctx


@contextlib.contextmanager
def forward_context(pool: ExpertPool, ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Make `ctx` the routing context of every forward through `pool` on this thread."""
    contexts = _state.__dict__.setdefault("contexts", {})
    previous = contexts.get(id(pool))
    contexts[id(pool)] = ctx
    try:
        yield ctx
    finally:
        if previous is None:
            contexts.pop(id(pool), None)
        else:
            contexts[id(pool)] = previous


def use_snapshots(
    pool: ExpertPool, snapshots: Sequence[PoolSnapshot], **kwargs: Any
) -> contextlib.AbstractContextManager[ForwardContext]:
    """Shorthand: `with use_snapshots(pool, [snap_a, snap_b]): model(batch_of_two)`."""
    return forward_context(pool, ForwardContext(snapshots, **kwargs))
