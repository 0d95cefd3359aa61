"""Simulated instances: each one turns its queues into one forward pass at a time.

`start_step(now)` plans the next forward pass and returns its duration from the cost model (None
when there is nothing to run); `finish_step(now)` applies it and returns (requests whose prompt
just completed, requests that finished decoding). Which prompt tokens a step holds is
`sched.step_planner`'s decision, the planner the real engine runs, and the memory bookkeeping
mirrors `engine.scheduler`: prompt KV grows piece by piece, and a decode that finds no room first
gives up the newest partly prefilled prompt, then preempts the newest running request. The cluster
loop (`cluster.py`) moves requests between instances; the other decisions come from `sched` too.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections import deque

from tetriinfer.sched.admission import AdmissionView, admits
from tetriinfer.sched.dispatcher import DecodeLoad, Dispatcher
from tetriinfer.sched.lengths import blocks_for
from tetriinfer.sched.monitor import COLOCATED, DECODE, PREFILL, decode_load_fraction, decode_room_blocks
from tetriinfer.sched.prefill_queue import PrefillQueue
from tetriinfer.sched.step_planner import PromptPlan, StepShape, blocks_to_grow, plan_prompts
from tetriinfer.sim.request import SimRequest
from tetriinfer.sim.running_batch import RunningBatch


class BatchInstance:
    """Prompts in a queue and a continuous-batching decode set on one KV cache: a colocated
    baseline instance as it is, and the machinery the prefill and decode roles build on."""

    role = COLOCATED
    prefix_cache = None  # the cluster's `SimPrefixCaches` when prefix caching is on

    def __init__(self, instance_id: int, shape: StepShape, queue: PrefillQueue, capacity_blocks: int, cost) -> None:
        self.instance_id = instance_id
        self.shape = shape
        self.block_size = shape.block_size
        self.queue = queue
        self.cost = cost
        self.batch = RunningBatch(capacity_blocks, shape.block_size)
        self.prefill_blocks = 0  # KV of prompts being computed
        self.busy = False
        self.draining = False
        self.num_preemptions = 0
        self.released: list[SimRequest] = []  # left the batch unfinished (`start_decoding`'s release_after)
        self.step_decode = (0, 0)  # the planned step's decodes and their context: the MPS model's memory-bound part
        self._plan: PromptPlan | None = None

    @property
    def load_tokens(self) -> int:
        return self.queue.pending_tokens

    @property
    def free_blocks(self) -> int:
        return self.batch.capacity_blocks - self.batch.used_blocks - self.prefill_blocks - self._held_elsewhere()

    def is_empty(self) -> bool:
        return not self.busy and not self.queue and self.batch.num_running == 0

    is_drained = is_empty

    def enqueue(self, req: SimRequest) -> None:
        """Queue a new request's prompt, past what this instance has cached of it."""
        if self.prefix_cache is not None:
            self.prefix_cache.lookup(self.instance_id, req)
        self.queue.add(req)

    def start_decoding(self, req: SimRequest, release_after: int | None = None) -> None:
        """A request whose prompt completed here decodes here (for `release_after` steps at most,
        then it joins `released`)."""
        self.batch.admit(req, req.reserve_blocks, req.predicted_decode_left(), release_after)

    def start_step(self, now: float) -> float | None:
        while True:
            plan = self._plan_prompts()
            if plan.chunk.pieces or plan.decode:
                break
            if not self._restart_partial_prompt():
                return None
        self._plan = plan
        chunk = plan.chunk
        for req, piece in zip(itertools.islice(self.queue.ordered(0), len(chunk.pieces)), chunk.pieces):
            self.prefill_blocks += blocks_to_grow(piece, self.block_size)
            if req.prefill_start_s is None:  # its cached blocks are its own from now on
                req.prefill_start_s = now
                self.prefill_blocks += blocks_for(piece.start, self.block_size)
        batch = self.batch
        decode_seqs, decode_context = (batch.num_running, batch.total_context) if plan.decode else (0, 0)
        self.step_decode = (decode_seqs, decode_context)
        prefill_tokens = chunk.size + self._take_recompute_tokens()
        return self.cost.step_time(prefill_tokens, sum(p.start for p in chunk.pieces), decode_seqs, decode_context)

    def finish_step(self, now: float) -> tuple[list[SimRequest], list[SimRequest]]:
        plan, self._plan = self._plan, None
        finished, released = self.batch.advance() if plan.decode else ([], [])
        self.released.extend(released)
        prefilled = self.queue.commit(plan.chunk)
        for req in prefilled:
            self.prefill_blocks -= blocks_for(req.prompt_len, self.block_size)
            req.kv_len = req.prompt_len
        if self.prefix_cache is not None:
            for req in prefilled + finished:
                self.prefix_cache.record(self.instance_id, req)
        return prefilled, finished

    # --- planning, as engine.scheduler does it ---------------------------------------------------

    def _plan_prompts(self) -> PromptPlan:
        shape, batch = self.shape, self.batch
        if shape.policy == "mixed":  # decodes first, prompts in the room they leave
            preempted = self._make_room_for_decodes()
            free = self.free_blocks - (batch.blocks_needed_next_step() if batch.num_running else 0)
            return plan_prompts(shape, self.queue.ordered(shape.token_budget), num_running=batch.num_running,
                                free_blocks=free, admit_new=not preempted)
        plan = plan_prompts(shape, self.queue.ordered(shape.token_budget), num_running=batch.num_running,
                            free_blocks=self.free_blocks)
        if plan.decode:  # prefill first: the batch decodes only when no prompt token can run
            self._make_room_for_decodes()
            plan = dataclasses.replace(plan, decode=batch.num_running > 0)
        return plan

    def _make_room_for_decodes(self) -> bool:
        """Free KV until every running request's next token fits; True if a running request was
        preempted (that step starts no new prompt, as in vLLM)."""
        batch, preempted = self.batch, False
        while batch.num_running and batch.blocks_needed_next_step() > self.free_blocks:
            if self._restart_partial_prompt():
                continue
            self._requeue(batch.preempt_latest())
            self.num_preemptions += 1
            preempted = True
        return preempted

    def _restart_partial_prompt(self) -> bool:
        restarted = self.queue.restart_newest_started()
        if restarted is None:
            return False
        req, done = restarted
        if req.prefill_start_s is not None:  # a cache hit not started yet held no blocks (it loses its hit)
            self.prefill_blocks -= blocks_for(done, self.block_size)
        return True

    def _requeue(self, req: SimRequest) -> None:
        """A preempted request recomputes its whole context as a prompt, first in line: its KV and
        the last token it sampled (whose KV was not written yet). As in the engine, that prefill
        samples its next token."""
        req.prompt_len, req.num_prefilled = req.kv_len + 1, 0
        req.decode_left -= 1
        self.queue.add(req, front=True)

    def _held_elsewhere(self) -> int:
        return 0

    def _take_recompute_tokens(self) -> int:
        return 0


class ColocatedInstance(BatchInstance):
    """A baseline instance running prefill and decode (the `vllm` or `sarathi` step policy)."""


class PrefillInstance(BatchInstance):
    """A prefill instance: prompts in policy order (the paper's fixed-size chunks, or mixed steps
    when it decodes requests it kept), then dispatch to a decode instance."""

    role = PREFILL

    def __init__(self, instance_id: int, shape: StepShape, queue: PrefillQueue, dispatcher: Dispatcher,
                 capacity_blocks: int, cost) -> None:
        super().__init__(instance_id, shape, queue, capacity_blocks, cost)
        self.dispatcher = dispatcher
        self.dispatch_wait: deque[SimRequest] = deque()  # prefilled, no decode instance with room yet

    def is_empty(self) -> bool:
        return super().is_empty() and not self.dispatch_wait

    def is_drained(self) -> bool:
        """Ready to become a decode instance: requests still waiting for decode room stay and
        decode here, their KV already in place."""
        return BatchInstance.is_empty(self)


class DecodeInstance(BatchInstance):
    """A decode instance: admission, KV transfer in, continuous batching, preemption by recompute;
    under the adaptive policy also prompts routed here to prefill in place (mixed steps)."""

    role = DECODE

    def __init__(self, instance_id: int, shape: StepShape, capacity_blocks: int, admission: str, cost) -> None:
        super().__init__(instance_id, shape, PrefillQueue("fcfs"), capacity_blocks, cost)
        self.admission = admission
        self.max_num_seqs = shape.max_num_seqs
        self.waiting: deque[SimRequest] = deque()  # dispatched here, KV not pulled yet
        self.arriving: list[tuple[float, int, SimRequest]] = []  # KV in flight, blocks held
        self.incoming_blocks = 0
        self.link_free_s = 0.0
        # Monitor-facing counters over requests assigned here (dispatched or routed) and not finished.
        self.assigned_need_blocks = 0
        self.num_heavy = 0
        self.num_light = 0
        self.remaining_decode_tokens = 0
        self._recompute_tokens = 0
        self._seq = 0

    def decode_load(self) -> DecodeLoad:
        held = self.batch.used_blocks + self.incoming_blocks + self.prefill_blocks
        room = decode_room_blocks(self.batch.capacity_blocks, held, self.assigned_need_blocks)
        free_slots = self.max_num_seqs - self.num_heavy - self.num_light
        return DecodeLoad(self.instance_id, room, self.num_heavy, self.num_light, self.remaining_decode_tokens,
                          free_slots, self.queue.pending_tokens, self.batch.num_running, self.batch.total_context)

    def load_fraction(self) -> float:
        return decode_load_fraction(self.batch.used_blocks + self.incoming_blocks + self.prefill_blocks,
                                    self.batch.capacity_blocks, self.num_heavy + self.num_light, self.max_num_seqs)

    def is_empty(self) -> bool:
        return super().is_empty() and not self.waiting and not self.arriving

    is_drained = is_empty

    def receive(self, req: SimRequest) -> None:
        """A prefilled request dispatched here: it waits for admission, then its KV moves."""
        self._assign(req)
        self.waiting.append(req)

    def prefill_here(self, req: SimRequest) -> None:
        """A new request routed here to prefill in place, then decode (no KV moves)."""
        self._assign(req)
        self.enqueue(req)

    def _assign(self, req: SimRequest) -> None:
        self.assigned_need_blocks += req.need_blocks
        if req.heavy:
            self.num_heavy += 1
        else:
            self.num_light += 1
        self.remaining_decode_tokens += req.decode_left

    def admit_waiting(self, now: float, transfer_time) -> list[tuple[float, SimRequest]]:
        """Admit from the head of `waiting` while the policy allows; return KV arrivals to schedule."""
        transfers = []
        while self.waiting:
            req = self.waiting[0]
            view = AdmissionView(
                self.batch.capacity_blocks,
                self.free_blocks,
                self.batch.reserved_blocks + sum(r.reserve_blocks for _, _, r in self.arriving),
                self.batch.shortest_remaining_reserve(),
                self.batch.num_running + len(self.arriving),
                self.max_num_seqs,
            )
            if not admits(self.admission, view, blocks_for(req.kv_len + 1, self.block_size), req.reserve_blocks):
                break
            self.waiting.popleft()
            if req.recomputing:  # its KV is rebuilt here, in the next forward pass
                self._recompute_tokens += req.kv_len
                self._join(req)
                continue
            if req.kv_local:
                self._join(req)
                continue
            # Pull the KV over this instance's inbound link (transfers queue on the link).
            self.incoming_blocks += blocks_for(req.kv_len, self.block_size)
            start = max(now, self.link_free_s)
            held = self.prefix_cache.held_kv_tokens(self.instance_id, req) if self.prefix_cache is not None else 0
            self.link_free_s = start + transfer_time(req.kv_len - held)
            self._seq += 1
            heapq.heappush(self.arriving, (self.link_free_s, self._seq, req))
            transfers.append((self.link_free_s, req))
        return transfers

    def land_arrivals(self, now: float) -> None:
        while self.arriving and self.arriving[0][0] <= now:
            _, _, req = heapq.heappop(self.arriving)
            self.incoming_blocks -= blocks_for(req.kv_len, self.block_size)
            self._join(req)

    def _join(self, req: SimRequest) -> None:
        req.recomputing = req.kv_local = False
        self.start_decoding(req)

    def finish_step(self, now: float) -> tuple[list[SimRequest], list[SimRequest]]:
        n = self.batch.num_running if self._plan.decode else 0
        prefilled, finished = super().finish_step(now)
        self.remaining_decode_tokens -= n
        for req in finished:
            self.unassign(req)
        return prefilled, finished

    def unassign(self, req: SimRequest) -> None:
        self.assigned_need_blocks -= req.need_blocks
        if req.heavy:
            self.num_heavy -= 1
        else:
            self.num_light -= 1

    def _requeue(self, req: SimRequest) -> None:
        req.recomputing = True
        self.waiting.appendleft(req)

    def _held_elsewhere(self) -> int:
        return self.incoming_blocks

    def _take_recompute_tokens(self) -> int:
        tokens, self._recompute_tokens = self._recompute_tokens, 0
        return tokens
