"""Which prefix blocks each instance holds: the cache-aware router's view, and the simulator's truth.

A prefix block key is any hashable naming a run of tokens *and everything before it* (a hash chain,
`prefix_block_keys`, or a trace's hash id), so equal keys mean equal prefixes and a request's hit on
an instance is the longest leading run of its keys held there. `PrefixIndex` keeps, per instance,
an LRU-bounded set of keys. It serves twice:

- as the controller's guess of what each instance caches: what it routed there (SGLang's
  cache-aware router and Mooncake's conductor keep the same kind of per-instance tree), which can be
  wrong (evictions it did not see), never a correctness problem: a wrong guess only misprices;
- in the simulator, as each instance's true cache (`sim.prefix_cache`).

No torch, no I/O, no clock: plain state in, answers out, like every policy in `sched`.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Hashable, Iterable, Sequence


class PrefixIndex:
    """Per instance, at most `capacity_blocks` keys, least recently used evicted first.

    `record` touches a chain from its last key back to its first, so under pressure the tail of a
    chain goes before its head: the head is shared by more requests, and a chain without its head
    can never match again (the engine's block manager frees a request's blocks tail first too).
    `capacity_blocks=0` holds nothing (caching off)."""

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 0:
            raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._held: dict[Hashable, OrderedDict[Hashable, None]] = {}
        self.num_evicted = 0

    def matched_blocks(self, instance: Hashable, keys: Iterable[Hashable]) -> int:
        """The longest leading run of `keys` held on `instance` (changes nothing)."""
        held = self._held.get(instance)
        if not held:
            return 0
        n = 0
        for key in keys:
            if key not in held:
                break
            n += 1
        return n

    def record(self, instance: Hashable, keys: Sequence[Hashable]) -> None:
        """`instance` now holds `keys` (a chain from its head): insert or touch them, evicting the
        least recently used beyond capacity. A chain longer than the capacity keeps its head."""
        if self.capacity_blocks == 0 or not keys:
            return
        held = self._held.setdefault(instance, OrderedDict())
        for key in reversed(keys[: self.capacity_blocks]):  # the head ends most recently used
            if key in held:
                held.move_to_end(key)
            else:
                held[key] = None
        while len(held) > self.capacity_blocks:
            held.popitem(last=False)
            self.num_evicted += 1

    def drop(self, instance: Hashable) -> None:
        """Forget everything `instance` holds (it died, or restarted with an empty cache)."""
        self._held.pop(instance, None)

    def num_blocks(self, instance: Hashable) -> int:
        return len(self._held.get(instance, ()))


def cached_tokens(index: PrefixIndex | None, instance: Hashable, keys: Sequence[Hashable], block_tokens: int,
                  prompt_tokens: int) -> int:
    """Prompt tokens `instance` can serve from its cache: its longest run of `keys` (full blocks of
    `block_tokens`), never the prompt's last token (a step must compute one to sample from)."""
    if index is None or not keys or block_tokens < 1:
        return 0
    return max(0, min(index.matched_blocks(instance, keys) * block_tokens, prompt_tokens - 1))


def prefix_block_keys(token_ids: Sequence[int], block_tokens: int, parent: bytes = b"") -> list[bytes]:
    """Keys of the full blocks of `token_ids`: key i = sha256(key i-1, block i's token ids), the
    chain starting from `parent` (a salt of what else changes the KV). The engine's prefix cache
    (`engine.prefix_cache`) chains the same way; a partial last block has no key."""
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    keys = []
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        parent = hashlib.sha256(parent + array("I", token_ids[start:start + block_tokens]).tobytes()).digest()
        keys.append(parent)
    return keys
