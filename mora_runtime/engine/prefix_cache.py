"""Keys and values of prompt prefixes the engine has prefilled, reused by later prompts.

Chat prompts repeat their template (system prompt, role markers) in front of every
question; a prefill is compute-bound (float32 GEMM over every prompt token), so computing
that shared part once is the cheapest prefill there is. Prompts are cut into blocks of
`BLOCK` tokens; a block is stored under a digest of everything that decides its keys and
values: what the adapted layers saw (pool version and per-request routing overrides: MoRA
applies its experts at every prefill token) and every token up to the block's end, chained
block by block so a prompt's keys cost one pass over it. A later prompt reuses the longest
run of stored blocks at its start, leaving at least its last token to compute (the engine
needs that token's logits). Position ids start at 0 for every prompt, so a stored block's
rotary-embedded keys are valid for any prompt that starts with it.

Least recently used blocks go first. Routing statistics of a request count only the
tokens its own prefill computed.

Shape legend: H = key/value heads, d = head dim.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Hashable, Sequence

from torch import Tensor

BLOCK = 16

# Keys and values of one block, layer by layer: (k_0, v_0, k_1, v_1, ...), each [H, BLOCK, d].
BlockKV = tuple[Tensor, ...]


def block_keys(context: Hashable, prompt: Sequence[int]) -> list[bytes]:
    """One key per full block of `prompt`: a SHA-256 chain over `context` and the tokens."""
    digest = hashlib.sha256(repr(context).encode())
    keys = []
    for end in range(BLOCK, len(prompt) + 1, BLOCK):
        digest.update(b"".join(t.to_bytes(4, "little") for t in prompt[end - BLOCK : end]))
        keys.append(digest.copy().digest())
    return keys


class PrefixCache:
    """An LRU of prompt blocks, at most `max_blocks` of them (0: nothing is kept)."""

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self._blocks: collections.OrderedDict[bytes, BlockKV] = collections.OrderedDict()
        self.hits = 0  # blocks reused
        self.misses = 0  # blocks computed and stored

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self, context: Hashable, prompt: Sequence[int]) -> list[bytes]:
        """`block_keys` of a prompt, or none when the cache is off (nothing to look up or
        store, so no hashing either)."""
        return block_keys(context, prompt) if self.max_blocks > 0 else []

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def lookup(self, keys: list[bytes], length: int) -> list[BlockKV]:
        """The stored blocks at the start of a prompt of `length` tokens with block `keys`,
        in order; they leave at least its last token uncovered."""
        found: list[BlockKV] = []
        for key in keys[: (length - 1) // BLOCK]:
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            found.append(block)
        self.hits += len(found)
        return found

    def store(self, key: bytes, block: BlockKV) -> None:
        if self.max_blocks <= 0:
            return
        self._blocks[key] = block
        self.misses += 1
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()
