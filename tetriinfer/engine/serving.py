"""The engine as a serving instance sees it (`cluster.instance`): its load in plain counts, and the
per-request KV seam that disaggregation runs on (park, decode here, export, reserve, import).

The cluster goes through these methods only, never into the scheduler or the block manager.
With `EngineConfig.capture_prompt_hidden`, a request that `step_requests` returns with its first
token carries `prompt_hidden` (its final hidden state at the last prompt token: the length probe's
features); the engine keeps it nowhere else, so it goes when the request is finished, aborted or
exported (`RequestState` does not carry it: the prefilling instance keeps what it needs).
`RequestState` is the one record of a request moving between engines: plain data without torch,
so it travels as it is in `cluster.messages.KVPush` while its K/V go through `cluster.kv`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from tetriinfer.engine.block_manager import OutOfBlocks
from tetriinfer.engine.load import EngineLoad
from tetriinfer.engine.request import Request, RequestStatus
from tetriinfer.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from tetriinfer.engine.block_manager import BlockManager
    from tetriinfer.engine.model_runner import ModelRunner
    from tetriinfer.engine.prefix_cache import PrefixCache
    from tetriinfer.engine.scheduler import EngineScheduler
    from tetriinfer.model.arch import ModelArch


@dataclass
class RequestState:
    """A request's state as it moves from one engine to another (its K/V apart). Times are
    `time.monotonic()` seconds of the engine that exported it (`shifted` moves them to another clock)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    output_logprobs: list[float]
    sampling: SamplingParams
    arrival_time: float
    first_token_time: float | None

    def shifted(self, seconds: float) -> RequestState:
        """The same state with its times `seconds` later (onto a clock with another origin)."""
        first = None if self.first_token_time is None else self.first_token_time + seconds
        return dataclasses.replace(self, arrival_time=self.arrival_time + seconds, first_token_time=first)


@dataclass
class RequestKV:
    """A request's state and its K/V for every layer, as moved from a prefill to a decode engine.
    `start_token` > 0: K/V hold the context from that token on; the importing engine holds the
    tokens before it already (prefix-cache hits it reserved, `reserve_kv`)."""

    state: RequestState
    k: torch.Tensor  # [num_layers, num_cached_tokens - start_token, kv_heads, head_dim]
    v: torch.Tensor
    start_token: int = 0

    @property
    def num_cached_tokens(self) -> int:
        """Context tokens whose KV the request holds once imported (moved or not)."""
        return self.start_token + self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass
class KVReservation:
    """Blocks held for a request whose KV arrives from another engine: its whole block table. The
    first `skip_tokens // block_size` are prefix-cache hits here, pinned (one more holder each, so
    no eviction takes them while the rest is on its way); only the KV from `skip_tokens` on moves.
    `release_blocks(block_ids)` gives all of them back (the hits stay cached)."""

    block_ids: list[int]
    skip_tokens: int = 0


@dataclass(frozen=True)
class ParkedKV:
    """What a serving instance reads of a prefilled request it places (its KV still here)."""

    num_cached_tokens: int  # KV tokens held: what moves, and the context it decodes from
    num_blocks: int  # KV blocks held: room it gives back when it leaves
    token_on_device: bool  # its last sampled token is not read back yet: not exportable now


class ServingFacade:
    """`LLMEngine`'s methods for a serving instance (mixed into it; the state lives there)."""

    requests: dict[str, Request]
    scheduler: EngineScheduler
    block_manager: BlockManager
    runner: ModelRunner
    arch: ModelArch
    prefix_cache: PrefixCache | None

    # ---- load, in plain counts -------------------------------------------------------------------
    def load(self) -> EngineLoad:
        blocks, sched = self.block_manager, self.scheduler
        return EngineLoad(blocks.num_blocks, blocks.num_free_blocks, blocks.num_cached_blocks, len(sched.waiting),
                          sched.waiting_tokens, len(sched.running), sum(r.num_computed_tokens for r in sched.running))

    @property
    def free_blocks(self) -> int:
        """Allocatable KV blocks (what `load()` says, without summing over the queues)."""
        return self.block_manager.num_free_blocks

    @property
    def waiting_tokens(self) -> int:
        return self.scheduler.waiting_tokens

    def running_tokens(self) -> dict[str, int]:
        """Tokens (prompt + output) of each running request, in the scheduler's order."""
        return {r.request_id: r.num_tokens for r in self.scheduler.running}

    def has_request(self, request_id: str) -> bool:
        """Whether the request is live here (waiting, running or parked)."""
        return request_id in self.requests

    def parked_kv(self, request_id: str) -> ParkedKV:
        req = self.requests[request_id]
        return ParkedKV(req.num_computed_tokens, len(req.block_ids), req.num_pending > 0)

    # ---- blocks for KV arriving from another engine ----------------------------------------------
    def reserve_blocks(self, num_tokens: int) -> list[int]:
        """KV blocks for `num_tokens` arriving from another engine (`import_request` takes them)."""
        return self.block_manager.allocate(self.block_manager.blocks_for_tokens(num_tokens))

    def reserve_kv(self, num_tokens: int, block_keys: Sequence[bytes] = ()) -> KVReservation:
        """Blocks for `num_tokens` of context arriving from another engine whose prefix cache keyed
        its full blocks `block_keys` (`kv_block_keys` there): the longest run of them cached here is
        pinned and not moved, never the block of the last token (at least one token moves); fresh
        blocks take the rest. Without prefix caching here, all fresh (`reserve_blocks`)."""
        if self.prefix_cache is None or not block_keys:
            return KVReservation(self.reserve_blocks(num_tokens))
        bs = self.block_manager.block_size
        hits = self.block_manager.lookup(list(block_keys[:(num_tokens - 1) // bs]))
        try:
            fresh = self.reserve_blocks(num_tokens - len(hits) * bs)
        except OutOfBlocks:
            self.block_manager.free(hits)
            raise
        return KVReservation(hits + fresh, len(hits) * bs)

    def kv_block_keys(self, request_id: str) -> list[bytes]:
        """The prefix-cache keys of a parked request's full KV blocks that another engine may hold
        already (all but the last token's block); [] without prefix caching."""
        if self.prefix_cache is None:
            return []
        req = self.requests[request_id]
        num_blocks = (req.num_computed_tokens - 1) // self.block_manager.block_size
        return list(self.prefix_cache.block_hashes(req, num_blocks)[:num_blocks]) if num_blocks > 0 else []

    def release_blocks(self, block_ids: list[int]) -> None:
        """Give back blocks reserved for KV that never arrived (or did not fit); pinned cache hits
        among them go back to the evictable pool."""
        self.block_manager.free(block_ids)

    # ---- a prefilled request: decode it here, or export it ----------------------------------------
    def decode_here(self, request_id: str, park_at: int = 0) -> Request:
        """A prefilled request parked for export decodes in this engine instead (its KV is here).
        `park_at`: it parks again once it has that many output tokens, unless it ends first."""
        req = self.requests[request_id]
        if req.status != RequestStatus.PREFILLED:
            raise ValueError(f"request {request_id!r} is {req.status.value}, not prefilled")
        if park_at and park_at <= len(req.output_token_ids):
            raise ValueError(f"request {request_id!r} already has {len(req.output_token_ids)} output tokens")
        req.status, req.prefill_only, req.park_at = RequestStatus.RUNNING, False, park_at
        self.scheduler.add_running(req)
        return req

    def export_request(self, request_id: str, start_token: int = 0) -> RequestKV:
        """Take a prefilled (or running) request out of this engine with its KV; its blocks are freed.
        `start_token` (a multiple of the block size, below the context): only the KV from there on
        is read, the receiver holding the blocks before (`reserve_kv`'s `skip_tokens`)."""
        req = self.requests.get(request_id)
        if req is None:
            raise KeyError(f"no live request {request_id!r} to export")
        if req.status not in (RequestStatus.PREFILLED, RequestStatus.RUNNING):
            raise ValueError(f"request {request_id!r} is {req.status.value}; only prefilled or running requests can be exported")
        if req.num_pending:
            raise ValueError(f"request {request_id!r} has a token still on the device; export it after the next step")
        bs = self.block_manager.block_size
        if start_token % bs or not 0 <= start_token < req.num_computed_tokens:
            raise ValueError(f"cannot export request {request_id!r} from token {start_token}: not a block boundary "
                             f"below its {req.num_computed_tokens} KV tokens")
        # Whole blocks are skipped, so the rest of the table maps token i of the suffix as before.
        k, v = self.runner.read_kv(req.block_ids[start_token // bs:], req.num_computed_tokens - start_token)
        state = RequestState(req.request_id, req.prompt, list(req.prompt_token_ids), list(req.output_token_ids),
                             list(req.output_logprobs), req.sampling, req.arrival_time, req.first_token_time)
        del self.requests[request_id]
        self.scheduler.remove(req)
        return RequestKV(state, k, v, start_token)

    def import_request(self, kv: RequestKV, block_ids: list[int] | None = None) -> Request:
        """Place an exported request into this engine; it continues decoding here. `block_ids`:
        blocks reserved for it beforehand (taken over by the request: `reserve_kv`'s table, whose
        first blocks hold the KV before `kv.start_token`); else fresh ones."""
        s = kv.state
        if s.request_id in self.requests:
            raise ValueError(f"request id {s.request_id!r} is already in use")
        expected = (self.arch.num_layers, kv.k.shape[1], self.arch.num_kv_heads, self.arch.head_dim)
        if tuple(kv.k.shape) != expected or tuple(kv.v.shape) != expected:
            raise ValueError(f"KV of shape {tuple(kv.k.shape)} does not fit this model {expected}")
        req = Request(s.request_id, s.prompt_token_ids, s.sampling, s.arrival_time, prompt=s.prompt,
                      output_token_ids=list(s.output_token_ids), output_logprobs=list(s.output_logprobs),
                      first_token_time=s.first_token_time)
        req.detokenizer = self.new_detokenizer(req, already_streamed=True)
        if kv.num_cached_tokens != req.num_tokens - 1:
            raise ValueError(f"KV holds {kv.num_cached_tokens} tokens, expected {req.num_tokens - 1}")
        bs = self.block_manager.block_size
        if kv.start_token % bs or (kv.start_token and block_ids is None):
            raise ValueError(f"KV from token {kv.start_token} needs the reserved blocks holding the ones before")
        need = self.block_manager.blocks_for_tokens(kv.num_cached_tokens)
        if block_ids is None:
            block_ids = self.block_manager.allocate(need)  # raises OutOfBlocks with nothing taken
        elif len(block_ids) < need:
            raise ValueError(f"{len(block_ids)} reserved blocks cannot hold {kv.num_cached_tokens} tokens")
        skipped = kv.start_token // bs
        if skipped and not self._holds_prefix(req, block_ids[:skipped]):
            raise ValueError(f"the {skipped} reserved blocks before token {kv.start_token} are not this request's prefix")
        req.block_ids = block_ids
        self.runner.write_kv(req.block_ids[skipped:], kv.k, kv.v)
        req.num_computed_tokens = kv.num_cached_tokens
        req.num_registered_blocks = skipped  # the head came from this cache: cached already
        req.status = RequestStatus.RUNNING
        self.requests[req.request_id] = req
        self.scheduler.add_running(req)
        return req

    def _holds_prefix(self, req: Request, blocks: list[int]) -> bool:
        """Whether `blocks` are cached here under the keys of the request's first blocks: the KV
        skipped on the way here is this request's own (the keys came from the sender)."""
        if self.prefix_cache is None:
            return False
        keys = self.prefix_cache.block_hashes(req, len(blocks))[:len(blocks)]
        return [self.block_manager.cached_key(b) for b in blocks] == keys
