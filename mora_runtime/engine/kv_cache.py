"""A batched KV cache for continuous batching on top of Hugging Face attention.

Every running sequence is a row; rows are right-aligned (left-padded) so that all of them
write their next token into the same column, as in a static padded batch. Each layer keeps
preallocated buffers with room for more rows and columns (amortised doubling), and exposes
the part in use as views: a decode step writes one column, a joining request writes only
its own rows (into free rows, its left padding into the columns in front), and a leaving
request frees its row by moving at most one other row into it. The whole cache is copied
only when a buffer runs out of room, or when a joining prompt is longer than the running
rows and the columns in front of them are used up.

Shape legend: S = rows in use, R = row capacity, H = KV heads, L = columns in use,
C = column capacity, d = head dim. A layer's columns in use start at `start` in its buffer.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

_MIN_CAPACITY = 64


class BatchKVLayer(DynamicLayer):
    """One layer's keys/values: `keys`/`values` [S, H, C - start, d] are views of buffers
    [R, H, C, d] whose first `length` columns from `start` are in use."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = self.start = self.length = 0
        self._keys: Tensor | None = None  # [R, H, C, d]
        self._values: Tensor | None = None

    @classmethod
    def holding(cls, keys: Tensor, values: Tensor, length: int) -> BatchKVLayer:
        """A layer whose buffers are `keys`/`values` [S, H, C, d] (not copied), the first
        `length` columns in use."""
        layer = cls()
        layer._keys, layer._values = keys, values
        layer.rows, layer.length = keys.shape[0], length
        layer.device, layer.is_initialized = keys.device, True
        layer._views()
        return layer

    def _views(self) -> None:
        self.keys = self._keys[: self.rows, :, self.start :]
        self.values = self._values[: self.rows, :, self.start :]

    @property
    def capacity(self) -> tuple[int, int]:
        """(R, C) of the buffers."""
        return self._keys.shape[0], self._keys.shape[2]

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True
        rows, heads, new, k_dim = key_states.shape
        columns = max(_MIN_CAPACITY, 2 * new)
        self._keys = key_states.new_empty(rows, heads, columns, k_dim)
        self._values = value_states.new_empty(rows, heads, columns, value_states.shape[-1])
        self.rows = rows
        self._views()

    def _reallocate(self, rows: int, columns: int, shift: int = 0) -> None:
        """New buffers [rows, H, columns, d]; the rows in use keep their columns in use,
        moved `shift` columns right of the buffer's first column (which becomes `start`),
        zeros in front. The rest is left unset: every column is written before it is
        read (by `update`, or zeroed as padding by `add_rows`)."""
        old_keys, old_values = self.keys[:, :, : self.length], self.values[:, :, : self.length]
        heads, k_dim, v_dim = old_keys.shape[1], old_keys.shape[-1], old_values.shape[-1]
        self._keys = old_keys.new_empty(rows, heads, columns, k_dim)
        self._values = old_values.new_empty(rows, heads, columns, v_dim)
        for new, old in ((self._keys, old_keys), (self._values, old_values)):
            new[: self.rows, :, :shift] = 0
            new[: self.rows, :, shift : shift + self.length] = old
        self.start = 0
        self._views()

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        keys, values = self.extend(new)
        keys[:, :, -new:] = key_states
        values[:, :, -new:] = value_states
        return keys, values

    def extend(self, new: int) -> tuple[Tensor, Tensor]:
        """Take `new` more columns into use; returns the keys and values [S, H, L, d] of
        every column in use, the last `new` of them for the caller to write."""
        end = self.length + new
        rows, columns = self.capacity
        if self.start + end > columns:
            self._reallocate(rows, max(2 * (columns - self.start), end))
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def add_rows(self, other: BatchKVLayer, length: int) -> None:
        """Append `other`'s rows after these, both right-aligned to `length` columns
        (>= both lengths); the padding in front of either is zeroed."""
        grow = length - self.length  # padding in front of the rows already here
        rows = self.rows + other.rows
        row_capacity, columns = self.capacity
        if rows > row_capacity or grow > self.start:
            new_rows = max(rows, 2 * row_capacity) if rows > row_capacity else row_capacity
            self._reallocate(new_rows, max(_MIN_CAPACITY, 2 * length, columns), shift=grow)
        else:
            self.start -= grow
            self._keys[: self.rows, :, self.start : self.start + grow] = 0
            self._values[: self.rows, :, self.start : self.start + grow] = 0
        pad, first, end = length - other.length, self.start, self.start + length
        for mine, theirs in ((self._keys, other.keys), (self._values, other.values)):
            mine[self.rows : rows, :, first : first + pad] = 0
            mine[self.rows : rows, :, first + pad : end] = theirs[:, :, : other.length]
        self.rows, self.length = rows, length
        self._views()

    def reorder(self, order: list[int]) -> None:
        """Keep rows `order` (`compaction`'s: every moved row comes from past the new
        end, so no row is overwritten before it is read), row i being old row order[i]."""
        moved = [(new, old) for new, old in enumerate(order) if new != old]
        if moved:
            span = slice(self.start, self.start + self.length)
            destinations, sources = [new for new, _ in moved], [old for _, old in moved]
            for buffer in (self._keys, self._values):
                buffer[destinations, :, span] = buffer[sources, :, span]
        self.rows = len(order)
        self._views()

    def trim_left(self, columns: int) -> None:
        """Drop the first `columns` columns in use."""
        self.start += columns
        self.length -= columns
        self._views()

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        self.keys = self.values = self._keys = self._values = None
        self.rows = self.start = self.length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("rows are trimmed with BatchKVCache.trim_left")


def compaction(rows: int, remove: list[int]) -> list[int]:
    """The row order after taking `remove` out of `rows` rows with the fewest moves: kept
    rows stay where they are, and the rows that left in front are filled from the tail.
    `order[i]` is the old row now at row i."""
    gone = set(remove)
    kept = rows - len(gone)
    order = list(range(kept))
    holes = [row for row in range(kept) if row in gone]
    tail = [row for row in range(kept, rows) if row not in gone]
    for hole, row in zip(holes, tail, strict=True):
        order[hole] = row
    return order


class BatchKVCache(DynamicCache):
    """The per-layer `BatchKVLayer`s of a model, plus the row/column surgery of the engine."""

    def __init__(self, num_layers: int) -> None:
        # Skip DynamicCache's config-driven layer choice: every layer is a BatchKVLayer.
        Cache.__init__(self, layers=[BatchKVLayer() for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    @property
    def rows(self) -> int:
        return self.layers[0].rows if self.layers else 0

    def add_rows(self, other: BatchKVCache) -> tuple[int, int]:
        """Append `other`'s rows after these, right-aligned; returns (pad_self, pad_other),
        the columns of left padding added in front of each one's rows."""
        before, length = self.length, max(self.length, other.length)
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            mine.add_rows(theirs, length)
        return length - before, length - other.length

    def remove_rows(self, rows: list[int]) -> list[int]:
        """Take `rows` out; returns the new order (`compaction`): order[i] is the old row
        now at row i."""
        order = compaction(self.rows, rows)
        for layer in self.layers:
            if layer.is_initialized:
                layer.reorder(order)
        return order

    def truncate(self, length: int) -> None:
        """Forget every column at or past `length` (undoes a forward that failed midway)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.length = min(layer.length, length)

    def copy_rows(self, rows: Tensor) -> BatchKVCache:
        """A new cache holding copies of `rows` [S'] (the original is left untouched)."""
        out = type(self)(len(self.layers))
        out.layers = [
            BatchKVLayer.holding(
                old.keys.index_select(0, rows), old.values.index_select(0, rows), old.length
            )
            for old in self.layers
        ]
        return out

    def trim_left(self, columns: int) -> None:
        """Drop the first `columns` columns (padding no row needs any more)."""
        if columns <= 0:
            return
        for layer in self.layers:
            if layer.is_initialized:
                layer.trim_left(columns)

    @classmethod
    def from_blocks(
        cls, num_layers: int, rows: list[list[tuple[Tensor, ...]]], block: int, length: int
    ) -> BatchKVCache:
        """A cache of len(rows) rows whose first `length` columns hold cached prompt blocks,
        right-aligned (left padding in front of shorter runs). `rows[r]` is row r's run of
        blocks (maybe none), each (k_0, v_0, k_1, v_1, ...) of [H, block, d] per layer."""
        sample = next(blocks[0] for blocks in rows if blocks)
        cache = cls(num_layers)
        capacity = max(_MIN_CAPACITY, 2 * length)
        layers = []
        for index in range(num_layers):
            k0, v0 = sample[2 * index], sample[2 * index + 1]
            keys = k0.new_zeros(len(rows), k0.shape[0], capacity, k0.shape[-1])  # [S, H, C, d]
            values = v0.new_zeros(len(rows), v0.shape[0], capacity, v0.shape[-1])
            for r, blocks in enumerate(rows):
                start = length - block * len(blocks)
                for i, kv in enumerate(blocks):
                    columns = slice(start + i * block, start + (i + 1) * block)
                    keys[r, :, columns] = kv[2 * index]
                    values[r, :, columns] = kv[2 * index + 1]
            layers.append(BatchKVLayer.holding(keys, values, length))
        cache.layers = layers
        return cache
