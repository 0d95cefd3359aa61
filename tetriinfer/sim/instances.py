"""Simulated instances: each one turns its queues into one forward pass at a time.

`start_step(now)` plans the next forward pass and returns its duration from the cost model (None
when there is nothing to run); `finish_step(now)` applies it. The cluster loop (`cluster.py`)
moves requests between instances; the decisions themselves come from `tetriinfer.sched`.
"""

from __future__ import annotations

import heapq
from collections import deque

from tetriinfer.sched.admission import AdmissionView, admits
from tetriinfer.sched.baselines import ColocatedScheduler, StepPlan
from tetriinfer.sched.chunker import Chunk
from tetriinfer.sched.dispatcher import DecodeLoad, Dispatcher
from tetriinfer.sched.lengths import blocks_for
from tetriinfer.sched.monitor import COLOCATED, DECODE, PREFILL, decode_load_fraction, decode_room_blocks
from tetriinfer.sched.prefill_queue import PrefillQueue
from tetriinfer.sim.request import SimRequest
from tetriinfer.sim.running_batch import RunningBatch


class PrefillInstance:
    """Disaggregated prefill: one fixed-size chunk per forward pass, then dispatch."""

    role = PREFILL

    def __init__(
        self, instance_id: int, queue: PrefillQueue, dispatcher: Dispatcher, chunk_size: int, pad: bool, cost
    ) -> None:
        self.instance_id = instance_id
        self.queue = queue
        self.dispatcher = dispatcher
        self.chunk_size = chunk_size
        self.pad = pad
        self.cost = cost
        self.dispatch_wait: deque[SimRequest] = deque()  # prefilled, no decode instance with room yet
        self.busy = False
        self.draining = False
        self._chunk: Chunk | None = None

    @property
    def load_tokens(self) -> int:
        return self.queue.pending_tokens

    def is_empty(self) -> bool:
        return not self.busy and not self.queue and not self.dispatch_wait

    def is_drained(self) -> bool:
        """Ready to become a decode instance: requests still waiting for decode room stay and
        decode here, their KV already in place."""
        return not self.busy and not self.queue

    def start_step(self, now: float) -> float | None:
        chunk = self.queue.next_chunk(self.chunk_size, self.pad)
        if not chunk.pieces:
            return None
        self._chunk = chunk
        # The chunk's pieces are the head of the ordered queue, in order.
        for req, piece in zip(self.queue.ordered(0), chunk.pieces):
            if req.prefill_start_s is None:
                req.prefill_start_s = now
        return self.cost.step_time(chunk.size, sum(p.start for p in chunk.pieces), 0, 0)

    def finish_step(self, now: float) -> list[SimRequest]:
        chunk, self._chunk = self._chunk, None
        return self.queue.commit(chunk)


class DecodeInstance:
    """Disaggregated decode: admission, KV transfer in, continuous batching, preemption by recompute."""

    role = DECODE

    def __init__(
        self, instance_id: int, capacity_blocks: int, block_size: int, admission: str, max_num_seqs: int, cost
    ) -> None:
        self.instance_id = instance_id
        self.block_size = block_size
        self.admission = admission
        self.max_num_seqs = max_num_seqs
        self.cost = cost
        self.batch = RunningBatch(capacity_blocks, block_size)
        self.waiting: deque[SimRequest] = deque()  # dispatched here, KV not pulled yet
        self.arriving: list[tuple[float, int, SimRequest]] = []  # KV in flight, blocks held
        self.incoming_blocks = 0
        self.link_free_s = 0.0
        self.busy = False
        self.draining = False
        self.num_preemptions = 0
        # Monitor-facing counters over requests dispatched here and not finished.
        self.assigned_need_blocks = 0
        self.num_heavy = 0
        self.num_light = 0
        self.remaining_decode_tokens = 0
        self._recompute_tokens = 0
        self._seq = 0

    @property
    def free_blocks(self) -> int:
        return self.batch.capacity_blocks - self.batch.used_blocks - self.incoming_blocks

    def decode_load(self) -> DecodeLoad:
        held = self.batch.used_blocks + self.incoming_blocks
        room = decode_room_blocks(self.batch.capacity_blocks, held, self.assigned_need_blocks)
        free_slots = self.max_num_seqs - self.num_heavy - self.num_light
        return DecodeLoad(
            self.instance_id, room, self.num_heavy, self.num_light, self.remaining_decode_tokens, free_slots
        )

    def load_fraction(self) -> float:
        return decode_load_fraction(self.batch.used_blocks + self.incoming_blocks, self.batch.capacity_blocks,
                                    self.num_heavy + self.num_light, self.max_num_seqs)

    def is_empty(self) -> bool:
        return not self.busy and not self.waiting and not self.arriving and self.batch.num_running == 0

    is_drained = is_empty

    def receive(self, req: SimRequest) -> None:
        req.decode_instance = self.instance_id
        self.waiting.append(req)
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
                self.batch.reserved_blocks,
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
            blocks = blocks_for(req.kv_len, self.block_size)
            self.incoming_blocks += blocks
            start = max(now, self.link_free_s)
            self.link_free_s = start + transfer_time(req.kv_len)
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
        self.batch.admit(req, req.reserve_blocks, req.predicted_decode_left())

    def start_step(self, now: float) -> float | None:
        batch = self.batch
        if batch.num_running == 0:
            return None
        # Preempt (recompute) the newest requests until next step's KV growth fits.
        room = batch.capacity_blocks - self.incoming_blocks
        while batch.num_running and batch.used_blocks + batch.blocks_needed_next_step() > room:
            req = batch.preempt_latest()
            req.recomputing = True
            self.num_preemptions += 1
            self.waiting.appendleft(req)
        if batch.num_running == 0:
            return None
        recompute, self._recompute_tokens = self._recompute_tokens, 0
        return self.cost.step_time(recompute, 0, batch.num_running, batch.total_context)

    def finish_step(self, now: float) -> list[SimRequest]:
        n = self.batch.num_running
        self.remaining_decode_tokens -= n
        finished = self.batch.advance()
        for req in finished:
            self.assigned_need_blocks -= req.need_blocks
            if req.heavy:
                self.num_heavy -= 1
            else:
                self.num_light -= 1
        return finished


class ColocatedInstance:
    """A baseline instance running prefill and decode (the `vllm` or `sarathi` step policy)."""

    role = COLOCATED

    def __init__(
        self, instance_id: int, scheduler: ColocatedScheduler, capacity_blocks: int, block_size: int, cost
    ) -> None:
        self.instance_id = instance_id
        self.scheduler = scheduler
        self.block_size = block_size
        self.cost = cost
        self.batch = RunningBatch(capacity_blocks, block_size)
        self.prefill_blocks = 0  # KV of prompts being computed
        self.busy = False
        self.draining = False
        self.num_preemptions = 0
        self._plan: StepPlan | None = None

    @property
    def load_tokens(self) -> int:
        return self.scheduler.pending_tokens

    @property
    def free_blocks(self) -> int:
        return self.batch.capacity_blocks - self.batch.used_blocks - self.prefill_blocks

    def is_empty(self) -> bool:
        return not self.busy and not self.scheduler and self.batch.num_running == 0

    def start_step(self, now: float) -> float | None:
        batch = self.batch
        growth = batch.blocks_needed_next_step() if batch.num_running else 0
        plan = self.scheduler.plan(batch.num_running, self.free_blocks - growth)
        if plan.decode and batch.used_blocks + growth > batch.capacity_blocks - self.prefill_blocks:
            # Preempt (recompute) the newest until the decode fits; as in vLLM, a step that
            # preempts admits no new prompt, so the preempted cannot bounce straight back in.
            while batch.used_blocks + batch.blocks_needed_next_step() > batch.capacity_blocks - self.prefill_blocks:
                req = batch.preempt_latest()
                req.prompt_len, req.num_prefilled = req.kv_len, 0
                self.num_preemptions += 1
                self.scheduler.add(req, front=True)
            plan = self.scheduler.plan(batch.num_running, 0, admit_new=False)
        if plan.chunk is None and not plan.decode:
            return None
        self._plan = plan
        for req in plan.started:
            self.prefill_blocks += blocks_for(req.prompt_len, self.block_size)
            if req.prefill_start_s is None:
                req.prefill_start_s = now
        prefill_tokens = plan.chunk.size if plan.chunk else 0
        prefill_context = sum(p.start for p in plan.chunk.pieces) if plan.chunk else 0
        if plan.decode:
            return self.cost.step_time(prefill_tokens, prefill_context, batch.num_running, batch.total_context)
        return self.cost.step_time(prefill_tokens, prefill_context, 0, 0)

    def finish_step(self, now: float) -> tuple[list[SimRequest], list[SimRequest]]:
        """Returns (requests whose prompt just completed, requests that finished decoding)."""
        plan, self._plan = self._plan, None
        finished = self.batch.advance() if plan.decode else []
        prefilled = self.scheduler.commit(plan)
        for req in prefilled:
            blocks = blocks_for(req.prompt_len, self.block_size)
            self.prefill_blocks -= blocks
            req.kv_len = req.prompt_len
        return prefilled, finished
