"""Automatic prefix caching: which full KV blocks of a request are known to the block manager.

Block i of a request is keyed by sha256(key of block i-1, its token ids), the chain starting from a
salt of everything else that changes the KV (model, weights, dtype). So equal keys mean equal
prefixes, and a new request reuses the longest run of cached blocks of its tokens. Keys are computed
once per block and kept on the request (`Request.block_hashes`), growing with it.

A block becomes cached once full and its KV written or queued on the device: after the step that
prefills it is queued (a later step reading it is queued after that one on the same stream), and
when its request lets its blocks go (finished, aborted, exported, preempted) for every full block
computed by then, generated tokens included (the next turn of a conversation resends them)."""

from __future__ import annotations

import hashlib
from array import array

from tetriinfer.config import EngineConfig
from tetriinfer.engine.block_manager import BlockManager
from tetriinfer.engine.request import Request


class PrefixCache:
    def __init__(self, blocks: BlockManager, salt: bytes):
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.salt = salt  # the key the chain of every request starts from

    @classmethod
    def for_engine(cls, config: EngineConfig, blocks: BlockManager) -> PrefixCache | None:
        """The engine's cache, salted by what else makes its KV (random weights: their seed), or
        None when prefix caching is off."""
        if not config.cache.enable_prefix_caching:
            return None
        salt = repr((config.model, config.load_format, config.dtype, config.seed)).encode()
        return cls(blocks, hashlib.sha256(salt).digest())

    def block_hashes(self, req: Request, num_blocks: int) -> list[bytes]:
        """The keys of the request's first `num_blocks` full blocks (computed once each)."""
        hashes, bs = req.block_hashes, self.block_size
        if len(hashes) < num_blocks:
            tokens = req.all_token_ids
            parent = hashes[-1] if hashes else self.salt
            for i in range(len(hashes), num_blocks):
                parent = hashlib.sha256(parent + array("I", tokens[i * bs:(i + 1) * bs]).tobytes()).digest()
                hashes.append(parent)
        return hashes

    def lookup(self, req: Request) -> None:
        """Give a request that holds no KV the longest cached run of its full blocks, never its last
        token (a step must compute one to sample from); its prefill starts after them."""
        assert not req.block_ids and req.num_computed_tokens == 0
        num_blocks = (req.num_tokens - 1) // self.block_size
        hits = self.blocks.lookup(self.block_hashes(req, num_blocks)) if num_blocks else []
        req.block_ids = hits
        req.num_computed_tokens, req.num_registered_blocks = len(hits) * self.block_size, len(hits)
        if not req.num_preemptions:  # the lookup its prefill starts from (a recompute's not counted)
            req.num_cached_tokens = req.num_computed_tokens

    def register(self, req: Request) -> None:
        """Cache the request's full blocks whose KV is computed (or queued) and tokens known."""
        num_blocks = min(req.num_computed_tokens, req.num_tokens) // self.block_size
        if num_blocks > req.num_registered_blocks:
            hashes = self.block_hashes(req, num_blocks)
            for i in range(req.num_registered_blocks, num_blocks):
                self.blocks.cache(req.block_ids[i], hashes[i])
            req.num_registered_blocks = num_blocks

    def release(self, req: Request) -> None:
        """The request lets its blocks go: its computed full blocks stay cached (evictable)."""
        if req.block_ids:
            self.register(req)
        req.num_registered_blocks = 0
        self.blocks.free(req.block_ids)
