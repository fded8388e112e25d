"""The batched KV cache's row and column surgery against a plain per-row model of it:
every row's columns in use hold exactly its own keys/values, right-aligned, with zeroed
padding in front; and rows join and leave without the buffers being replaced."""

from __future__ import annotations

import random

import pytest
import torch

from mora_runtime.engine.kv_cache import BatchKVCache, compaction

LAYERS, HEADS, DIM = 2, 3, 4


class Reference:
    """Each row's keys as a list of [H, d] columns (its own, left-padded with zeros)."""

    def __init__(self) -> None:
        self.rows: list[list[torch.Tensor]] = []

    def expected(self, row: int, length: int) -> torch.Tensor:
        real = self.rows[row]
        pad = [torch.zeros(HEADS, DIM)] * (length - len(real))
        return torch.stack(pad + real, dim=1)  # [H, length, d]


def prefill(rows: int, length: int, generator: torch.Generator) -> tuple[BatchKVCache, list]:
    """A fresh cache of `rows` rows of `length` columns (as a prefill writes them)."""
    cache = BatchKVCache(LAYERS)
    keys = torch.randn(rows, HEADS, length, DIM, generator=generator)
    for layer in cache.layers:
        layer.update(keys, -keys)
    return cache, [list(keys[r].unbind(1)) for r in range(rows)]


def check(cache: BatchKVCache, ref: Reference) -> None:
    assert cache.rows == len(ref.rows)
    for layer in cache.layers:
        assert layer.keys.shape[0] == len(ref.rows)
        for row in range(len(ref.rows)):
            want = ref.expected(row, cache.length)
            torch.testing.assert_close(layer.keys[row, :, : cache.length], want, rtol=0, atol=0)
            torch.testing.assert_close(layer.values[row, :, : cache.length], -want, rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(6))
def test_random_joins_leaves_decodes_and_trims_keep_every_row_intact(seed):
    """Rows join (shorter and longer than the running ones), decode, leave (front, middle,
    tail, several at once) and dead columns are trimmed, in a random order."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    cache, first = prefill(2, rng.randint(1, 9), g)
    ref = Reference()
    ref.rows = first
    for _ in range(60):
        op = rng.choice(["decode", "decode", "join", "leave", "trim"])
        if op == "decode":
            column = torch.randn(cache.rows, HEADS, 1, DIM, generator=g)
            for layer in cache.layers:
                layer.update(column, -column)
            for row, real in enumerate(ref.rows):
                real.append(column[row, :, 0])
        elif op == "join":
            before = cache.length
            new, rows = prefill(rng.randint(1, 3), rng.randint(1, before + 6), g)
            pad_old, pad_new = cache.add_rows(new)
            assert cache.length == max(before, len(rows[0]))
            assert (pad_old, pad_new) == (cache.length - before, cache.length - len(rows[0]))
            ref.rows += rows
        elif op == "leave" and cache.rows > 1:
            gone = rng.sample(range(cache.rows), rng.randint(1, cache.rows - 1))
            order = cache.remove_rows(gone)
            assert sorted(order) == sorted(set(range(len(ref.rows))) - set(gone))
            ref.rows = [ref.rows[old] for old in order]
        elif op == "trim":
            dead = cache.length - max(len(r) for r in ref.rows)
            cache.trim_left(dead)
        check(cache, ref)


def test_join_and_leave_with_room_write_only_their_own_rows():
    """With row and column room, neither a join nor a leave replaces the buffers, and a
    leave moves one row from the tail into the hole."""
    g = torch.Generator().manual_seed(0)
    cache, _ = prefill(4, 20, g)
    cache.trim_left(6)  # room in front for a longer prompt
    cache.remove_rows([3])  # a free row
    buffers = [layer._keys.data_ptr() for layer in cache.layers]
    new, _ = prefill(1, 18, g)  # longer than the 14 columns in use: uses the room in front
    assert cache.add_rows(new) == (4, 0)
    order = cache.remove_rows([0])
    assert order == [3, 1, 2]  # the joined row took the hole; rows 1 and 2 stayed put
    assert [layer._keys.data_ptr() for layer in cache.layers] == buffers


def test_a_join_past_the_room_reallocates_and_keeps_the_rows():
    g = torch.Generator().manual_seed(1)
    cache, rows = prefill(1, 5, g)
    ref = Reference()
    ref.rows = rows
    for _ in range(3):  # each join outgrows the row capacity and the room in front
        new, more = prefill(cache.rows, cache.length + 3, g)
        cache.add_rows(new)
        ref.rows += more
        check(cache, ref)
    assert cache.rows == 8


@pytest.mark.parametrize(
    ("rows", "remove", "order"),
    [
        (4, [1, 2], [0, 3]),
        (5, [1, 4], [0, 3, 2]),
        (5, [3, 4], [0, 1, 2]),
        (3, [0], [2, 1]),
        (3, [0, 1, 2], []),
    ],
)
def test_compaction_moves_only_tail_rows_into_holes(rows, remove, order):
    assert compaction(rows, remove) == order
