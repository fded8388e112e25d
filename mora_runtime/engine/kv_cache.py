"""A batched KV cache for continuous batching on top of Hugging Face attention.

Every running sequence is a row; rows are right-aligned (left-padded) so that all of them
write their next token into the same column, as in a static padded batch. Buffers are
preallocated with amortised doubling, so a decode step writes one column instead of
concatenating the whole cache (what `DynamicLayer` does, O(length) per step). Rows join by a
merge and leave by a row selection; both copy, but they happen once per request, not per
token.

Shape legend: S = rows (sequences), H = KV heads, L = columns in use, C = capacity, d = head dim.
"""

from __future__ import annotations

from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

_MIN_CAPACITY = 64


class BatchKVLayer(DynamicLayer):
    """One layer's keys/values [S, H, C, d] with the first L columns in use."""

    def __init__(self) -> None:
        super().__init__()
        self.length = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True
        self._allocate(key_states, value_states, max(_MIN_CAPACITY, 2 * key_states.shape[-2]))

    def _allocate(self, key_like: Tensor, value_like: Tensor, capacity: int) -> None:
        rows, heads, _, k_dim = key_like.shape
        v_dim = value_like.shape[-1]
        keys = key_like.new_zeros(rows, heads, capacity, k_dim)  # [S, H, C, d]
        values = value_like.new_zeros(rows, heads, capacity, v_dim)
        if self.length:
            keys[:, :, : self.length] = self.keys[:, :, : self.length]
            values[:, :, : self.length] = self.values[:, :, : self.length]
        self.keys, self.values = keys, values

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        end = self.length + new
        if end > self.keys.shape[-2]:
            self._allocate(self.keys, self.values, max(2 * self.keys.shape[-2], end))
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        self.keys = self.values = None
        self.length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("rows are trimmed with BatchKVCache.trim_left")


class BatchKVCache(DynamicCache):
    """The per-layer `BatchKVLayer`s of a model, plus the row/column surgery of the engine."""

    def __init__(self, num_layers: int) -> None:
        # Skip DynamicCache's config-driven layer choice: every layer is a BatchKVLayer.
        Cache.__init__(self, layers=[BatchKVLayer() for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def select_rows(self, rows: Tensor) -> None:
        """Keep only `rows` [S'] (in that order)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys = layer.keys.index_select(0, rows)
                layer.values = layer.values.index_select(0, rows)

    def truncate(self, length: int) -> None:
        """Forget every column at or past `length` (undoes a forward that failed midway)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.length = min(layer.length, length)

    def copy_rows(self, rows: Tensor) -> BatchKVCache:
        """A new cache holding copies of `rows` [S'] (the original is left untouched)."""
        out = type(self)(len(self.layers))
        for new, old in zip(out.layers, self.layers, strict=True):
            if old.is_initialized:
                new.keys = old.keys.index_select(0, rows)
                new.values = old.values.index_select(0, rows)
                new.length, new.device, new.is_initialized = old.length, old.device, True
        return out

    def trim_left(self, columns: int) -> None:
        """Drop the first `columns` columns (padding no row needs any more)."""
        if columns <= 0:
            return
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys = layer.keys[:, :, columns:]
                layer.values = layer.values[:, :, columns:]
                layer.length -= columns

    @classmethod
    def merge(cls, first: BatchKVCache, second: BatchKVCache) -> tuple[BatchKVCache, int, int]:
        """Stack two caches row-wise, right-aligned; returns (cache, pad_first, pad_second),
        the columns of left padding added in front of each input's rows."""
        length = max(first.length, second.length)
        merged = cls(len(first.layers))
        for out, a, b in zip(merged.layers, first.layers, second.layers, strict=True):
            rows = a.keys.shape[0] + b.keys.shape[0]
            heads, k_dim, v_dim = a.keys.shape[1], a.keys.shape[-1], a.values.shape[-1]
            capacity = max(_MIN_CAPACITY, 2 * length)
            keys = a.keys.new_zeros(rows, heads, capacity, k_dim)  # [S, H, C, d]
            values = a.values.new_zeros(rows, heads, capacity, v_dim)
            split = a.keys.shape[0]
            keys[:split, :, length - a.length : length] = a.keys[:, :, : a.length]
            values[:split, :, length - a.length : length] = a.values[:, :, : a.length]
            keys[split:, :, length - b.length : length] = b.keys[:, :, : b.length]
            values[split:, :, length - b.length : length] = b.values[:, :, : b.length]
            out.keys, out.values, out.length = keys, values, length
            out.device, out.is_initialized = keys.device, True
        return merged, length - first.length, length - second.length

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
        for index, layer in enumerate(cache.layers):
            k0, v0 = sample[2 * index], sample[2 * index + 1]
            keys = k0.new_zeros(len(rows), k0.shape[0], capacity, k0.shape[-1])  # [S, H, C, d]
            values = v0.new_zeros(len(rows), v0.shape[0], capacity, v0.shape[-1])
            for r, blocks in enumerate(rows):
                start = length - block * len(blocks)
                for i, kv in enumerate(blocks):
                    columns = slice(start + i * block, start + (i + 1) * block)
                    keys[r, :, columns] = kv[2 * index]
                    values[r, :, columns] = kv[2 * index + 1]
            layer.keys, layer.values, layer.length = keys, values, length
            layer.device, layer.is_initialized = keys.device, True
        return cache
