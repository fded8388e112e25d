"""Per-forward routing context: which pool version each token sees, and what it activated.

A forward pass may carry sequences admitted at different pool versions (continuous
batching). The caller states, per sequence, its snapshot and optional routing overrides, and
how tokens map to sequences; every adapted layer then reads the same context. Counters stay
on the device until `collect()` so that recording adds no synchronisation per layer.

Shape legend: S = sequences in the forward, T = tokens, N = slots, K = kept experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .experts import Routing
from .pool import PoolSnapshot
from .stats import SequenceRouting, StepRouting


@dataclass
class _Counters:
    observations: Tensor  # [S] long: (token, layer) pairs
    active: Tensor  # [S] long: active experts summed over those pairs
    slot_hits: Tensor  # [S, N] long: activations per slot
    per_token: dict[tuple[str, int], tuple[Tensor, int]]  # (kind, T) -> ([T] sum, layers)


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
        self._masks: dict[tuple[int, torch.device], Tensor] = {}
        self._settings: dict[tuple[str, torch.device], Tensor] = {}
        self._seq_cache: dict[tuple[int, int], Tensor] = {}
        self._full: dict[tuple[int, str], bool] = {}
        self._counters: _Counters | None = None

    @property
    def num_sequences(self) -> int:
        return len(self.snapshots)

    def visible_any(self) -> bool:
        return any(s.num_experts for s in self.snapshots)

    def seq_masks(self, num_slots: int, device: torch.device) -> Tensor:
        """[S, N] bool: the slots each sequence's version can see."""
        key = (num_slots, device)
        if key not in self._masks:
            self._masks[key] = torch.stack([s.mask(num_slots, device) for s in self.snapshots])
        return self._masks[key]

    def sees_all(self, num_slots: int) -> bool:
        """True when every sequence sees every slot in [0, N): no mask is needed."""
        key = (num_slots, "all")
        if key not in self._full:
            self._full[key] = all(s.slots == tuple(range(num_slots)) for s in self.snapshots)
        return self._full[key]

    def tokens_to_seq(self, num_tokens: int, batch_rows: int, device: torch.device) -> Tensor:
        """[T] long: the sequence of every flattened token."""
        if self.token_seq is not None:
            if self.token_seq.numel() != num_tokens:
                raise ValueError(
                    f"token_seq has {self.token_seq.numel()} entries for {num_tokens} tokens"
                )
            return self.token_seq.to(device)
        key = (num_tokens, batch_rows)
        if key not in self._seq_cache:
            if self.num_sequences == 1:
                seq = torch.zeros(num_tokens, dtype=torch.long, device=device)
            elif batch_rows == self.num_sequences and num_tokens % batch_rows == 0:
                per_row = num_tokens // batch_rows
                seq = torch.arange(batch_rows, device=device).repeat_interleave(per_row)
            else:
                raise ValueError(
                    f"{self.num_sequences} snapshots for a batch of {batch_rows} rows: "
                    "pass token_seq to map tokens to sequences"
                )
            self._seq_cache[key] = seq
        return self._seq_cache[key]

    def per_seq_setting(self, name: str, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        """[S] tensor of a per-sequence override, or None to use the pool's default."""
        values = getattr(self, name)
        if values is None:
            return None
        key = (name, device)
        if key not in self._settings:
            self._settings[key] = torch.as_tensor(list(values), device=device, dtype=dtype)
        return self._settings[key]

    # ------------------------------------------------------------------ recording
    def record_routing(self, kind: str, routing: Routing, seq: Tensor, num_slots: int) -> None:
        """Add one layer's routing to the counters (device tensors, no sync)."""
        if not self.record:
            return
        device = routing.active.device
        c = self._counters
        if c is None or c.slot_hits.shape[1] < num_slots:
            c = self._grow_counters(num_slots, device)
        active = routing.active  # [T, K]
        counted = torch.ones_like(seq)  # [T]
        if self.valid_tokens is not None:
            counted = self.valid_tokens.to(device=device, dtype=torch.long)
            active = active & self.valid_tokens.to(device).unsqueeze(1)
        per_token = active.sum(dim=-1)  # [T]
        c.observations.index_add_(0, seq, counted)
        c.active.index_add_(0, seq, per_token)
        # Per-token sums per module kind; keyed by token count too, since one forward may
        # run towers over different token sets (CLIP's text and vision encoders).
        key = (kind, per_token.shape[0])
        total, layers = c.per_token.get(key, (None, 0))
        c.per_token[key] = (per_token if total is None else total + per_token, layers + 1)
        rows = seq.unsqueeze(1).expand_as(routing.slots)  # [T, K]
        c.slot_hits.index_put_((rows, routing.slots), active.long(), accumulate=True)

    def _grow_counters(self, num_slots: int, device: torch.device) -> _Counters:
        s = self.num_sequences
        old = self._counters
        new = _Counters(
            observations=torch.zeros(s, dtype=torch.long, device=device),
            active=torch.zeros(s, dtype=torch.long, device=device),
            slot_hits=torch.zeros(s, num_slots, dtype=torch.long, device=device),
            per_token={},
        )
        if old is not None:
            new.observations += old.observations
            new.active += old.active
            new.slot_hits[:, : old.slot_hits.shape[1]] += old.slot_hits
            new.per_token = old.per_token
        self._counters = new
        return new

    def collect(self) -> StepRouting:
        """Move the counters to the host (one sync) as plain statistics."""
        c = self._counters
        if c is None:
            empty = tuple(SequenceRouting() for _ in self.snapshots)
            return StepRouting(empty, {})
        observations = c.observations.tolist()
        active = c.active.tolist()
        hits = c.slot_hits.cpu()
        sequences = []
        for i, snap in enumerate(self.snapshots):
            per_set: dict[str, int] = {}
            for entry in snap.sets:
                count = int(hits[i, entry.slot_start : entry.slot_start + entry.rank].sum())
                if count:
                    per_set[entry.name] = count
            sequences.append(SequenceRouting(observations[i], active[i], per_set))
        per_kind: dict[str, list[float]] = {}
        for (kind, _), (total, layers) in c.per_token.items():
            means = total.double() / layers  # [T]
            if self.valid_tokens is not None:
                means = means[self.valid_tokens.to(means.device)]
            per_kind.setdefault(kind, []).extend(means.tolist())
        return StepRouting(tuple(sequences), {k: tuple(v) for k, v in per_kind.items()})
