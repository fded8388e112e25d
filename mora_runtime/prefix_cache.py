"""Keys and values of prompt prefixes the engine has prefilled, reused by later prompts.

Chat prompts repeat their template (system prompt, role markers) in front of every
question; a prefill is compute-bound (float32 GEMM over every prompt token), so computing
that shared part once is the cheapest prefill there is. Prompts are cut into blocks of
`BLOCK` tokens; a block is stored under everything that decides its keys and values: the
tokens up to its end, and what the adapted layers saw (pool version and per-request
routing overrides: MoRA applies its experts at every prefill token). A later prompt reuses
the longest run of stored blocks at its start, leaving at least its last token to compute
(the engine needs that token's logits). Position ids start at 0 for every prompt, so a
stored block's rotary-embedded keys are valid for any prompt that starts with it.

Least recently used blocks go first. Routing statistics of a request count only the
tokens its own prefill computed.

Shape legend: H = key/value heads, d = head dim, n = tokens.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Sequence

from torch import Tensor

BLOCK = 16

# Keys and values of one block, layer by layer: (k_0, v_0, k_1, v_1, ...), each [H, BLOCK, d].
BlockKV = tuple[Tensor, ...]


class PrefixCache:
    """An LRU of prompt blocks, at most `max_blocks` of them."""

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self._blocks: collections.OrderedDict[tuple, BlockKV] = collections.OrderedDict()
        self.hits = 0  # blocks reused
        self.misses = 0  # blocks computed and stored

    def __len__(self) -> int:
        return len(self._blocks)

    @staticmethod
    def _key(context: Hashable, prompt: Sequence[int], end: int) -> tuple:
        return (context, tuple(prompt[:end]))

    def lookup(self, context: Hashable, prompt: Sequence[int]) -> list[BlockKV]:
        """The stored blocks at the start of `prompt`, in order; they leave at least the
        last token uncovered."""
        found: list[BlockKV] = []
        for end in range(BLOCK, len(prompt), BLOCK):  # end < len(prompt): one token left
            key = self._key(context, prompt, end)
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            found.append(block)
        self.hits += len(found)
        return found

    def wants(self, context: Hashable, prompt: Sequence[int], start: int) -> list[int]:
        """Ends of the full blocks of `prompt` from token `start` on that are not stored."""
        if self.max_blocks <= 0:
            return []
        first = start + BLOCK
        return [
            end
            for end in range(first, len(prompt) + 1, BLOCK)
            if self._key(context, prompt, end) not in self._blocks
        ]

    def store(self, context: Hashable, prompt: Sequence[int], end: int, block: BlockKV) -> None:
        """Keep the block of tokens [end - BLOCK, end) of `prompt`."""
        self._blocks[self._key(context, prompt, end)] = block
        self.misses += 1
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()
