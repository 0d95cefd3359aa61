"""Paged KV cache bookkeeping: fixed-size blocks, a free list, reference counts and the evictable
pool of prefix caching (plain Python)."""

from __future__ import annotations

from collections import OrderedDict, deque

from tetriinfer.sched.lengths import blocks_for


class OutOfBlocks(RuntimeError):
    pass


class BlockManager:
    """Hands out block ids of the KV cache. A block returns to the pool when its last holder frees
    it. A full block whose KV is known by a key (`cache`) is not forgotten when freed: it waits in
    an LRU pool of evictable blocks, where `lookup` can find it again (adding the caller as a
    holder), and is evicted (least recently freed first) only when a fresh block is needed and none
    is free."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._block_of: dict[bytes, int] = {}  # key -> cached block (held or evictable)
        self._key_of: dict[int, bytes] = {}  # cached block -> its key
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, LRU first

    @property
    def num_free_blocks(self) -> int:
        """Blocks `allocate` can hand out: free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks known by a key (held by requests or evictable)."""
        return len(self._key_of)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > self.num_free_blocks:
            raise OutOfBlocks(f"need {num_blocks} KV blocks, {self.num_free_blocks} free")
        blocks = [self._free.popleft() if self._free else self._evict() for _ in range(num_blocks)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        return block

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Extend `block_table` in place so it holds `num_tokens` tokens."""
        missing = self.blocks_for_tokens(num_tokens) - len(block_table)
        if missing > 0:
            block_table.extend(self.allocate(missing))

    def blocks_to_grow(self, block_table: list[int], num_tokens: int) -> int:
        return max(0, self.blocks_for_tokens(num_tokens) - len(block_table))

    def free(self, blocks: list[int]) -> None:
        """Drop one holder of each block and empty the list (a request's block table). The last
        blocks of a table go first into the evictable pool, so they are evicted before its head."""
        for b in reversed(blocks):
            if self._ref_counts[b] <= 0:
                raise ValueError(f"double free of block {b}")
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                if b in self._key_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)
        blocks.clear()

    # ---- prefix caching ----------------------------------------------------------------------------
    def cache(self, block: int, key: bytes) -> None:
        """Know a held, full block whose KV is written (or queued) by `key`. A key already known
        keeps its block (this one stays plain), as does a block already known."""
        if self._ref_counts[block] <= 0:
            raise ValueError(f"cannot cache free block {block}")
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The blocks of the longest run of `keys` from the first that are all cached; each gets
        one more holder (the caller's request)."""
        hits = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1
            hits.append(block)
        return hits

    def cached_key(self, block: int) -> bytes | None:
        """The key a cached block is known by; None for a plain one."""
        return self._key_of.get(block)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def check(self) -> None:
        """Raise AssertionError unless free, evictable and held blocks split the cache exactly."""
        free, evictable = set(self._free), set(self._evictable)
        held = {b for b, n in enumerate(self._ref_counts) if n > 0}
        assert len(free) == len(self._free) and not free & evictable and not (free | evictable) & held
        assert len(free) + len(evictable) + len(held) == self.num_blocks, "a block leaked"
        assert evictable <= set(self._key_of) and not free & set(self._key_of)
        assert all(self._key_of[b] == k for k, b in self._block_of.items()) and len(self._block_of) == len(self._key_of)
