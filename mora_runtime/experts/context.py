"""Per-forward routing context: which pool version each token sees, and what it activated.

A forward pass may carry sequences admitted at different pool versions (continuous
batching). The caller states, per sequence, its snapshot and optional routing overrides, and
how tokens map to sequences; every adapted layer then reads the same context. What the
layers need is worked out once per forward (`layout`), not once per layer, and recording
writes into preallocated buffers that `collect()` reduces in one go: at decode batch sizes
the fixed cost of small tensor operations, repeated over every adapted layer, is what the
pool would otherwise add to a step.

Nothing between the first adapted layer and `collect()` waits for the device: the layout's
host values go to the device as asynchronous copies and the statistics stay in device
buffers, so on a GPU the host only queues work; `collect()` is the forward's one read-back.

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
            host = torch.stack([s.mask(num_slots) for s in self.snapshots])  # [S, N]
            mask = to_device(host, device)
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
            return to_device(self.token_seq.to(dtype=torch.long), device).contiguous()
        if self.num_sequences == 1:
            return torch.zeros(num_tokens, dtype=torch.long, device=device)
        if batch_rows == self.num_sequences and num_tokens % batch_rows == 0:
            per_row = num_tokens // batch_rows
            rows = torch.arange(batch_rows, device=device)  # [S]
            # expand, not repeat_interleave: that sizes its output on the device (a sync).
            return rows.unsqueeze(1).expand(batch_rows, per_row).reshape(-1)
        raise ValueError(
            f"{self.num_sequences} snapshots for a batch of {batch_rows} rows: "
            "pass token_seq to map tokens to sequences"
        )

    @staticmethod
    def _per_seq(values, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        if values is None:
            return None
        return to_device(torch.as_tensor(list(values), dtype=dtype), device)

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
                valid = to_device(valid.to(dtype=torch.bool), layout.seq.device)
                valid = valid.reshape(-1).contiguous()
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
        # index_add_ into the flat [S * N] view: an accumulating index_put_ may sort its
        # indices, which on a GPU can read sizes back from the device.
        flat = layout.seq.unsqueeze(1) * hits.shape[1] + routing.slots  # [T, K]
        hits.view(-1).index_add_(0, flat.reshape(-1), active.reshape(-1).long())

    def collect(self) -> StepRouting:
        """Reduce the buffers to plain statistics: reductions on the buffers' device, then
        one host transfer for the whole forward."""
        num_seq = self.num_sequences
        parts: list[Tensor] = []  # every statistic, flattened, in the order read back below
        # Per recorder: its kinds, the layers of each, T, whether T is filtered.
        plans: list[tuple[list[str], list[int], int, bool]] = []
        for recorder in self._recorders.values():
            layers = len(recorder.kinds)
            if not layers:
                continue
            counts = recorder.active[:layers].long()  # [L, T]
            seq, valid = recorder.layout.seq, recorder.valid
            per_token = counts.sum(dim=0)  # [T]
            if valid is None:
                tokens = torch.bincount(seq, minlength=num_seq)  # [S]
            else:
                weight = valid.long()  # [T]
                tokens = counts.new_zeros(num_seq).index_add_(0, seq, weight)
                per_token = per_token * weight
            active = counts.new_zeros(num_seq).index_add_(0, seq, per_token)  # [S]
            kinds = sorted(set(recorder.kinds))
            kind_of = {kind: i for i, kind in enumerate(kinds)}
            rows = torch.tensor([kind_of[k] for k in recorder.kinds], device=seq.device)  # [L]
            sums = counts.new_zeros(len(kinds), counts.shape[1])  # [kinds, T]
            sums.index_add_(0, rows, counts)  # each kind's counts summed over its layers
            parts += [tokens * layers, active, sums.reshape(-1)]
            if valid is not None:
                parts.append(valid)
            layers_of = [recorder.kinds.count(kind) for kind in kinds]
            plans.append((kinds, layers_of, counts.shape[1], valid is not None))
        if self._hits is not None:
            parts.append(self._hits.reshape(-1))
        # Integers only (small ones are shared objects, so a long list is cheap to build); the
        # means are divided on the host, which gives the float64 mean bit for bit.
        values = torch.cat([p.long() for p in parts]).tolist() if parts else []

        observations = [0] * num_seq
        active_ranks = [0] * num_seq
        per_kind: dict[str, list[float]] = {}
        at = 0
        for kinds, layers_of, num_tokens, filtered in plans:
            for i in range(num_seq):
                observations[i] += int(values[at + i])
                active_ranks[i] += int(values[at + num_seq + i])
            at += 2 * num_seq
            sums_at, at = at, at + len(kinds) * num_tokens
            keep = None
            if filtered:
                keep = [t for t in range(num_tokens) if values[at + t]]
                at += num_tokens
            for j, (kind, layers) in enumerate(zip(kinds, layers_of, strict=True)):
                row = values[sums_at + j * num_tokens : sums_at + (j + 1) * num_tokens]
                tokens = row if keep is None else [row[t] for t in keep]
                per_kind.setdefault(kind, []).extend(count / layers for count in tokens)
        sequences = []
        width = 0 if self._hits is None else self._hits.shape[1]
        for i, snap in enumerate(self.snapshots):
            per_set: dict[str, int] = {}
            if width:
                hits = values[at + i * width : at + (i + 1) * width]  # [N]
                for entry in snap.sets:
                    count = sum(hits[entry.slot_start : entry.slot_start + entry.rank])
                    if count:
                        per_set[entry.name] = count
            sequences.append(SequenceRouting(observations[i], active_ranks[i], per_set))
        return StepRouting(tuple(sequences), {k: tuple(v) for k, v in per_kind.items()})


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """`host` on `device`. A CPU tensor bound for a GPU goes through pinned memory as an
    asynchronous copy: a copy from pageable memory waits for the device to finish its queue,
    and layouts are built inside the first adapted layer of a forward."""
    if device.type != "cuda" or host.device.type != "cpu":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


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
