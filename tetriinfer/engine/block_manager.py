"""Paged KV cache bookkeeping: fixed-size blocks, a free list and reference counts (plain Python)."""

from __future__ import annotations

from collections import deque

from tetriinfer.sched.lengths import blocks_for


class OutOfBlocks(RuntimeError):
    pass


class BlockManager:
    """Hands out block ids of the KV cache. A block returns to the free list when its last holder
    frees it; `share` adds a holder (for prefix sharing later)."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise OutOfBlocks(f"need {num_blocks} KV blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(num_blocks)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Extend `block_table` in place so it holds `num_tokens` tokens."""
        missing = self.blocks_for_tokens(num_tokens) - len(block_table)
        if missing > 0:
            block_table.extend(self.allocate(missing))

    def blocks_to_grow(self, block_table: list[int], num_tokens: int) -> int:
        return max(0, self.blocks_for_tokens(num_tokens) - len(block_table))

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._ref_counts[b] == 0:
                raise ValueError(f"cannot share free block {b}")
            self._ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one holder of each block and empty the list (a request's block table)."""
        for b in blocks:
            if self._ref_counts[b] <= 0:
                raise ValueError(f"double free of block {b}")
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free.append(b)
        blocks.clear()
