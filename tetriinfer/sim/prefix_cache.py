"""Each simulated instance's prefix cache: the true one, a `sched.prefix_index.PrefixIndex`.

A request carries the ids of its prompt's full blocks of `hash_block_tokens` (a trace's `hash_ids`;
equal ids, equal prefixes). When it is queued on an instance its prefill starts after the longest
run of its blocks cached there (never its last token), so only the rest is prefilled and priced;
the blocks it hit are touched. Its full prompt blocks are recorded on the instance that prefilled
it once its prefill ends, and again on the instance that decoded it once it finishes (the KV of a
moved request sits there too). A KV transfer to a decode instance moves only what it does not hold:
the longest run of the request's prompt blocks cached there is skipped (never the last token), as
the real hand-off skips the blocks the decode instance's prefix cache holds.

Memory, kept simple: cached blocks are evictable and do not reduce the KV capacity left to running
requests (the engine counts evictable blocks as free), and the cache holds at most
`prefix_cache_fraction` of the instance's KV capacity, LRU beyond. A request that hits holds its
cached blocks like its own from its first prefill step (no discount for blocks shared between
running requests). Not modelled: looking up again at the first prefill step (a request queued behind
the one computing its prefix misses), hits for a recompute after preemption, and caching output
blocks (only prompt blocks are cached).
"""

from __future__ import annotations

from tetriinfer.sched.prefix_index import PrefixIndex
from tetriinfer.sim.request import SimRequest


class SimPrefixCaches:
    def __init__(self, capacity_blocks: int, block_tokens: int) -> None:
        self.index = PrefixIndex(capacity_blocks)  # keyed by instance id
        self.block_tokens = block_tokens
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.kv_skipped_tokens = 0  # KV tokens a transfer did not move: the decode instance held them

    def keys(self, req: SimRequest) -> tuple:
        """The ids of the request's full prompt blocks (a partial last block is never cached)."""
        return req.hash_ids[: req.prompt_tokens // self.block_tokens]

    def lookup(self, instance_id: int, req: SimRequest) -> None:
        """A request queued on `instance_id`: its prefill starts after its cached run there."""
        if req.num_prefilled or req.recomputing or req.prompt_len != req.prompt_tokens:
            return  # a recompute after preemption, or one already looked up: no new lookup
        keys = self.keys(req)
        matched = self.index.matched_blocks(instance_id, keys)
        req.cached_tokens = min(matched * self.block_tokens, req.prompt_tokens - 1)
        req.num_prefilled = req.cached_tokens
        self.queried_tokens += req.prompt_tokens
        self.hit_tokens += req.cached_tokens
        if matched:
            self.index.record(instance_id, keys[:matched])  # in use: most recently used

    def record(self, instance_id: int, req: SimRequest) -> None:
        self.index.record(instance_id, self.keys(req))

    def held_kv_tokens(self, instance_id: int, req: SimRequest) -> int:
        """KV tokens of `req` that a transfer to `instance_id` need not move (its cached run of the
        request's prompt blocks, never the last token); the blocks are touched, as the pin is."""
        keys = self.keys(req)
        matched = self.index.matched_blocks(instance_id, keys)
        if not matched:
            return 0
        self.index.record(instance_id, keys[:matched])
        held = min(matched * self.block_tokens, req.kv_len - 1)
        self.kv_skipped_tokens += held
        return held
