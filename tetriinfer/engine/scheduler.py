"""The engine's own step scheduler: decides what the next forward pass computes, never runs it.

FCFS over the waiting queue. Which prompt tokens a step holds is `sched.step_planner`'s decision
(the simulator runs the same planner), with `chunk_size` as the token budget: `chunked` (the
paper's fixed-size chunks, prefill first), `whole` (vanilla vLLM: whole prompts, prefill first) or
`mixed` (the running decodes plus prompt tokens up to the budget). This class owns the memory:
KV blocks are reserved here, before the step runs; a decode that finds no free block preempts the
most recently admitted request, which will be recomputed from scratch.

With prefix caching (`engine.prefix_cache`) a waiting request that holds no KV first takes the
longest cached run of its full blocks when the scheduler considers admitting it (so it sees the
latest cache, and again after a preemption): it then looks like a started prompt to the planner,
holding `blocks_for(num_computed_tokens)` blocks and a slot. Released blocks stay cached.

With async scheduling the next step is planned before the last one's tokens are read back: a
decode's input token may still be on the device (`Request.num_pending`), so a decode is sized by
`num_computed_tokens` (the position it computes now), not by the tokens known on the host.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tetriinfer.config import EngineSchedulerConfig
from tetriinfer.engine.block_manager import BlockManager
from tetriinfer.engine.prefix_cache import PrefixCache
from tetriinfer.engine.request import Request, RequestStatus
from tetriinfer.sched.chunker import Chunk
from tetriinfer.sched.step_planner import StepShape, plan_prompts


@dataclass
class PrefillPiece:
    request: Request
    start: int
    length: int

    @property
    def completes_prompt(self) -> bool:
        """Whether this piece reaches the last token to prefill, so the step samples a token."""
        return self.start + self.length == self.request.num_tokens


@dataclass
class StepPlan:
    prefill: list[PrefillPiece] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)
    num_padding: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(p.length for p in self.prefill) + len(self.decode) + self.num_padding

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class EngineScheduler:
    def __init__(self, config: EngineSchedulerConfig, block_manager: BlockManager,
                 prefix_cache: PrefixCache | None = None):
        self.config = config
        self.blocks = block_manager
        self.prefix_cache = prefix_cache
        self.shape = StepShape(config.step_policy, config.chunk_size, config.max_num_seqs, block_manager.block_size,
                               pad=config.pad_chunks)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """A request whose KV arrived from another engine: it decodes from the next step."""
        self.running.append(request)

    def remove(self, request: Request) -> None:
        """Forget a request (finished, aborted or exported) and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release(request)

    def _release(self, req: Request) -> None:
        """Let the request's blocks go (its computed full blocks stay cached, if caching)."""
        if self.prefix_cache is None:
            self.blocks.free(req.block_ids)
        else:
            self.prefix_cache.release(req)

    def on_prefilled(self, req: Request) -> None:
        """A step computing prompt tokens of `req` is queued: its full blocks can be found now."""
        if self.prefix_cache is not None:
            self.prefix_cache.register(req)

    @property
    def waiting_tokens(self) -> int:
        """Tokens still to prefill over the waiting queue (a serving instance's load)."""
        return sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        lookup = self.prefix_cache is not None
        while True:
            plan = self._plan_step(lookup)
            # Partly prefilled prompts (cache hits too) can hold the blocks that every other request
            # needs: give up the newest one (it will be recomputed) until something can run. No new
            # lookup meanwhile, or the request would take its cached blocks straight back.
            lookup = False
            if not plan.empty or not self._evict_partial_prefill():
                return plan

    def _plan_step(self, lookup: bool) -> StepPlan:
        if self.shape.policy == "mixed":
            preemptions = self.num_preemptions
            decode = self._schedule_decodes()
            admit_new = self.num_preemptions == preemptions
            prompts = self._prompts(lookup and admit_new)
            plan = plan_prompts(self.shape, prompts, num_running=len(self.running),
                                free_blocks=self.blocks.num_free_blocks, admit_new=admit_new)
            return StepPlan(prefill=self._take(plan.chunk), decode=decode)
        prompts = self._prompts(lookup)
        plan = plan_prompts(self.shape, prompts, num_running=len(self.running), free_blocks=self.blocks.num_free_blocks)
        if plan.chunk.pieces:
            return StepPlan(prefill=self._take(plan.chunk), num_padding=plan.chunk.padding)
        return StepPlan(decode=self._schedule_decodes() if plan.decode else [])

    def _prompts(self, lookup: bool = False) -> list[Request]:
        # A request preempted with a token still on the device: its prompt is not known yet.
        prompts = [r for r in self.waiting if not r.num_pending]
        if lookup:
            # Prompts the planner may start now (in order, while sequence slots last) take their
            # cached blocks; later ones look up when their turn comes, against the cache of then.
            slots = self.config.max_num_seqs - len(self.running) - sum(1 for r in prompts if r.num_computed_tokens)
            for req in prompts:
                if slots <= 0:
                    break
                if not req.num_computed_tokens:
                    slots -= 1
                    if not req.wants_prompt_logprobs:  # those need the logits of every prompt position
                        self.prefix_cache.lookup(req)
        return prompts

    def _take(self, chunk: Chunk) -> list[PrefillPiece]:
        """Allocate the KV of the planned pieces (the planner checked that it fits)."""
        by_id = {r.request_id: r for r in self.waiting}
        pieces = []
        for piece in chunk.pieces:
            req = by_id[piece.request_id]
            self.blocks.grow(req.block_ids, piece.end)
            pieces.append(PrefillPiece(req, piece.start, piece.length))
        return pieces

    def _schedule_decodes(self) -> list[Request]:
        batch: list[Request] = []
        running = deque(self.running[: self.config.max_num_seqs])
        block_size, blocks = self.blocks.block_size, self.blocks
        while running:
            req = running.popleft()
            end = req.num_computed_tokens + 1  # the cache holds this step's token too
            # Fast path: the next token's slot is in a block the request already holds.
            if len(req.block_ids) * block_size >= end:
                batch.append(req)
                continue
            need = blocks.blocks_to_grow(req.block_ids, end)
            while not blocks.can_allocate(need) and self._evict_partial_prefill():
                pass
            while not blocks.can_allocate(need) and running:
                self._preempt(running.pop())  # the newest request gives its KV up (recompute later)
            if not blocks.can_allocate(need):
                self._preempt(req)  # it is the newest left: it waits for another turn, as in vLLM
                break
            blocks.grow(req.block_ids, end)
            batch.append(req)
        return batch

    def _evict_partial_prefill(self) -> bool:
        """Free the blocks of the newest waiting request that holds any; False if none does."""
        for req in reversed(self.waiting):
            if req.block_ids:
                self._release(req)
                req.num_computed_tokens = 0
                req.num_preemptions += 1
                return True
        return False

    def _preempt(self, req: Request) -> None:
        self.num_preemptions += 1
        self.running.remove(req)
        self._release(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def on_sampled(self, req: Request, last: bool) -> None:
        """The step just queued samples a token of `req`. A request whose prompt this completes starts
        decoding with the next step; `last`: that token ends the request whatever its value (length
        limits, prefill-only), so it is not scheduled again (it keeps its blocks until it ends)."""
        if req.status == RequestStatus.WAITING:  # its last prompt piece is in this step
            self.waiting.remove(req)
            if not last:
                req.status = RequestStatus.RUNNING
                self.running.append(req)
        elif last:
            self.running.remove(req)
