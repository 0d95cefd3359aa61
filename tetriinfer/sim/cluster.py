"""Discrete-event simulation of a whole cluster over the `sched` policies.

Events are (time, seq) in one heap: request arrivals (fed one at a time), step ends (one per
forward pass of an instance, never per token), KV transfer arrivals, monitor collections every
`monitor_interval_s` and role flips. Decode steps cost O(1) plus O(log n) per request event
(`RunningBatch`), which is what lets 100k requests run in seconds. Time is simulated only.
"""

from __future__ import annotations

import heapq
import random
from typing import Sequence

from tqdm import tqdm

from tetriinfer.config import SimConfig
from tetriinfer.sched.dispatcher import DecodeLoad, Dispatcher
from tetriinfer.sched.flip import FlipPolicy
from tetriinfer.sched.global_scheduler import GlobalScheduler
from tetriinfer.sched.lengths import blocks_for, is_heavy_decode, placement_blocks
from tetriinfer.sched.monitor import (
    DECODE, PREFILL, ClusterMonitor, ClusterSnapshot, InstanceStatus, prefill_load_fraction,
)
from tetriinfer.sched.prefix_index import PrefixIndex
from tetriinfer.sched.prefill_queue import PrefillQueue
from tetriinfer.sched.router import AdaptiveRouter, keep_on_prefill
from tetriinfer.sched.step_planner import StepShape
from tetriinfer.sim.gpu import gpus_by_instance
from tetriinfer.sim.instances import ColocatedInstance, DecodeInstance, PrefillInstance
from tetriinfer.sim.length_oracle import OracleLengthPredictor
from tetriinfer.sim.prefix_cache import SimPrefixCaches
from tetriinfer.sim.request import SimRequest
from tetriinfer.sim.result import SimResult  # noqa: F401 (re-exported: callers import it from here)

_ARRIVAL, _STEP, _KV_ARRIVAL, _MONITOR, _FLIP = range(5)


def simulate(specs: Sequence, config: SimConfig, cost, *, progress: bool = False, predictor=None) -> SimResult:
    """Run `config.cluster.system` over `specs`; TetriInfer predicts lengths with the oracle
    predictor at `config.policy.predictor_accuracy` (seeded by `config.seed`), or with `predictor`
    (e.g. predictor.sim_replay.ReplayPredictor: the online learner replayed over the trace)."""
    policy = config.policy
    if config.cluster.system == "tetriinfer" and predictor is None:
        predictor = OracleLengthPredictor(policy.predictor_accuracy, policy.bucket_size, seed=config.seed)
    return ClusterSim(config, cost, predictor).run(specs, progress)


class ClusterSim:
    """One run of one system over one request list. `cost` follows `tetriinfer.sim.cost.CostModel`;
    `predictor` has `predict(output_tokens, request_id) -> bucket` (TetriInfer only).

    Systems (`config.SYSTEMS`): `tetriinfer` (prefill and decode instances with TetriInfer's
    policies; `policy.disagg_policy` adaptive or paper); `vllm` and `sarathi` (colocated
    instances); `disagg`, a plain disaggregated baseline: prefill and decode instances without
    TetriInfer's scheduling (FCFS, unpadded chunks, no length prediction, least-loaded dispatch,
    greedy admission). The served cluster's `ServeConfig.mode="disagg"` is TetriInfer, not this."""

    def __init__(self, config: SimConfig, cost, predictor=None) -> None:
        self.config = config
        self.cost = cost
        self.predictor = predictor
        cluster, policy = config.cluster, config.policy
        self.system = cluster.system
        self.chunk_size = config.scheduler.chunk_size
        self.block_size = cluster.block_size
        self.capacity_blocks = cost.kv_capacity_tokens() // cluster.block_size
        if self.capacity_blocks < 1:
            raise ValueError("the model's KV cache does not fit one block on this GPU")
        self._kv_bytes = cost.kv_bytes_per_token()
        # Prefix caching: each instance's true cache, and the placement's own guess (same capacity).
        self.hash_block_tokens = config.hash_block_tokens
        cache_blocks = int(self.capacity_blocks * cluster.block_size * config.prefix_cache_fraction) // self.hash_block_tokens
        self.prefix_cache = SimPrefixCaches(cache_blocks, self.hash_block_tokens) if cache_blocks else None
        guess = PrefixIndex(cache_blocks) if cache_blocks and policy.cache_aware_routing else None
        self.instances: dict[int, PrefillInstance | DecodeInstance | ColocatedInstance] = {}
        if cluster.colocated:
            for i in range(cluster.shape.num_instances):
                self.instances[i] = self._new_colocated(i)
        else:
            for i in range(cluster.shape.num_prefill):
                self.instances[i] = self._new_prefill(i)
            for i in range(cluster.shape.num_prefill, cluster.total_instances):
                self.instances[i] = self._new_decode(i)
        # Its GPU: they step in turn (time-slice) or side by side on SM shares set by their first role (MPS).
        shares = [cluster.mps_share(inst.role) for inst in self.instances.values()]
        self.gpu_of = gpus_by_instance(cluster.total_instances, cluster.instances_per_gpu, cluster.gpu_sharing, shares, cost)
        self.monitor = ClusterMonitor(policy.monitor_interval_s)
        self.global_scheduler = GlobalScheduler(self._prefill_ids(), guess)
        self.router = None  # adaptive disaggregation: the router places each new request
        if self.adaptive:
            kv_seconds_per_token = self._transfer_time(1 << 16) / (1 << 16)
            self.router = AdaptiveRouter(cost, chunk_size=config.scheduler.chunk_size, kv_seconds_per_token=kv_seconds_per_token,
                                         interference_weight=policy.interference_weight, prefix_index=guess,
                                         ttft_margin_s=policy.local_ttft_margin_s)
        self.flip_policy = FlipPolicy(config.flip) if config.flip.enabled and not cluster.colocated else None
        if self.system == "tetriinfer" and policy.dispatch_policy != "oracle" and predictor is None:
            raise ValueError("tetriinfer needs a length predictor unless the dispatcher is the oracle")

    # --- instance construction ----------------------------------------------------------------

    def _rng(self, instance_id: int, generation: int = 0) -> random.Random:
        return random.Random(hash((self.config.seed, instance_id, generation)))

    @property
    def adaptive(self) -> bool:
        return self.system == "tetriinfer" and self.config.policy.disagg_policy == "adaptive"

    def _shape(self, policy: str, token_budget: int, pad: bool = False) -> StepShape:
        return StepShape(policy, token_budget, self.config.scheduler.max_num_seqs, self.block_size, pad)

    def _new_prefill(self, i: int, generation: int = 0) -> PrefillInstance:
        p = self.config.policy
        if self.system == "disagg":  # no prediction: FCFS, unpadded chunks, least-loaded placement
            queue, dispatcher = PrefillQueue("fcfs"), Dispatcher("least_loaded")
            shape = self._shape("chunked", self.chunk_size)
        else:
            queue = PrefillQueue(p.prefill_policy, p.sort_window)
            dispatcher = Dispatcher(p.dispatch_policy, self._rng(i, generation))
            # Adaptive: mixed steps, as it may decode requests it keeps; the paper: padded chunks.
            shape = self._shape("mixed", self.chunk_size) if self.adaptive else self._shape("chunked", self.chunk_size, True)
        return self._with_cache(PrefillInstance(i, shape, queue, dispatcher, self.capacity_blocks, self.cost))

    def _new_decode(self, i: int) -> DecodeInstance:
        p = self.config.policy
        admission = "greedy" if self.system == "disagg" else p.admission_policy
        shape = self._shape("mixed", self.chunk_size)
        return self._with_cache(DecodeInstance(i, shape, self.capacity_blocks, admission, self.cost))

    def _new_colocated(self, i: int) -> ColocatedInstance:
        p = self.config.policy
        if self.system == "vllm":
            shape = self._shape("whole", p.max_num_batched_tokens)
        else:
            shape = self._shape("mixed", self.chunk_size)
        return self._with_cache(ColocatedInstance(i, shape, PrefillQueue("fcfs"), self.capacity_blocks, self.cost))

    def _with_cache(self, inst):
        inst.prefix_cache = self.prefix_cache  # kept by instance id, so it outlives a flip
        return inst

    def _prefill_ids(self) -> list[int]:
        return [i for i, inst in self.instances.items() if inst.role != DECODE and not inst.draining]

    # --- the run ------------------------------------------------------------------------------

    def run(self, specs: Sequence, progress: bool = False) -> SimResult:
        """Simulate `specs` (objects with request_id, arrival_s, prompt_tokens, output_tokens)."""
        requests = sorted(
            (SimRequest(s.request_id, s.arrival_s, s.prompt_tokens, s.output_tokens,
                        tuple(getattr(s, "hash_ids", None) or ())) for s in specs),
            key=lambda r: (r.arrival_s, r.request_id),
        )
        for req in requests:
            if req.output_tokens < 1 or req.prompt_tokens < 1:
                raise ValueError(f"request {req.request_id}: prompt and output need >= 1 token")
            if blocks_for(req.prompt_tokens + req.output_tokens, self.block_size) > self.capacity_blocks:
                raise ValueError(f"request {req.request_id} does not fit one instance's KV cache")
        start = requests[0].arrival_s if requests else 0.0
        self._events: list = []
        self._seq = 0
        self._unfinished = len(requests)
        self._last_work = {i: start for i in self.instances}
        self._flip_pending: set[int] = set()
        self.result = SimResult(self.system, requests, self._last_work, start, start)
        self._requests = requests
        self._bar = tqdm(total=len(requests), disable=not progress, unit="req", desc=f"simulate {self.system}")
        if requests:
            self._collect(start)
            self._push(requests[0].arrival_s, _ARRIVAL, 0)
        handlers = (self._on_arrival, self._on_step, self._on_kv_arrival, self._on_monitor, self._on_flip)
        events = self._events
        num_events = 0
        while events:
            now, _, kind, payload = heapq.heappop(events)
            num_events += 1
            handlers[kind](now, payload)
        self._bar.close()
        if self._unfinished:
            raise RuntimeError(f"simulation stalled with {self._unfinished} unfinished requests")
        self.result.num_events = num_events
        self.result.end_s = max(r.finish_s for r in requests) if requests else start
        self.result.num_preemptions = sum(getattr(i, "num_preemptions", 0) for i in self.instances.values())
        if self.prefix_cache is not None:
            cache = self.prefix_cache
            self.result.prefix_queried_tokens, self.result.prefix_hit_tokens = cache.queried_tokens, cache.hit_tokens
            self.result.prefix_evicted_blocks = cache.index.num_evicted
            self.result.kv_skipped_tokens = cache.kv_skipped_tokens
        return self.result

    def _push(self, time: float, kind: int, payload) -> None:
        self._seq += 1
        heapq.heappush(self._events, (time, self._seq, kind, payload))

    def _kick(self, inst, now: float) -> None:
        """Start the instance's next forward pass if it is idle and has work."""
        if inst.busy:
            return
        if inst.role == DECODE:
            inst.land_arrivals(now)
            for ready_s, _ in inst.admit_waiting(now, self._transfer_time):
                self._push(ready_s, _KV_ARRIVAL, inst.instance_id)
        gpu = self.gpu_of[inst.instance_id]
        if not gpu.try_start(inst.instance_id):
            return  # another instance is mid-step on this GPU: wait in its queue for `_on_step`
        duration = inst.start_step(now)
        if duration is None:
            if inst.draining and inst.is_drained() and inst.instance_id not in self._flip_pending:
                self._flip_pending.add(inst.instance_id)
                self._push(now + self.config.flip.flip_s, _FLIP, inst.instance_id)
            return
        inst.busy = True
        for end_s, i in gpu.start(inst.instance_id, now, duration, *inst.step_decode):
            self._push(end_s, _STEP, i)

    def _transfer_time(self, kv_tokens: int) -> float:
        return self.cost.transfer_time(kv_tokens * self._kv_bytes)

    def _finish(self, req: SimRequest, now: float) -> None:
        if req.finish_s is not None:
            raise RuntimeError(f"request {req.request_id} finished twice")
        req.finish_s = now
        self._unfinished -= 1
        self._bar.update(1)

    # --- event handlers -----------------------------------------------------------------------

    def _on_arrival(self, now: float, index: int) -> None:
        requests = self._requests
        req = requests[index]
        if index + 1 < len(requests):
            self._push(requests[index + 1].arrival_s, _ARRIVAL, index + 1)
        keys = self.prefix_cache.keys(req) if self.prefix_cache is not None else ()
        if self.router is not None:
            self._predict(req)
            route = self.router.route(req.prompt_tokens, req.need_blocks, keys, self.hash_block_tokens,
                                      decode_tokens=req.predicted_output - 1)
            inst = self.instances[route.instance_id]
            if route.local:
                inst.prefill_here(req)
            else:
                inst.enqueue(req)
        else:
            inst = self.instances[self.global_scheduler.pick(req.prompt_tokens, keys, self.hash_block_tokens)]
            inst.enqueue(req)
        self._kick(inst, now)

    def _on_step(self, now: float, instance_id: int) -> None:
        moved = self.gpu_of[instance_id].end(instance_id, now)
        if moved is None:
            return  # MPS: a neighbour's step start or end moved this step's end
        for end_s, i in moved:
            self._push(end_s, _STEP, i)
        inst = self.instances[instance_id]
        inst.busy = False
        self._last_work[instance_id] = now
        prefilled, finished = inst.finish_step(now)
        for req in finished:
            self._finish(req, now)
            if self.router is not None and self.prefix_cache is not None:  # the router learns where it decoded
                self.router.observe(instance_id, self.prefix_cache.keys(req))
        for req in prefilled:
            if req.first_token_s is None:
                req.first_token_s = now
            if req.decode_left <= 0:
                if inst.role == DECODE:
                    inst.unassign(req)
                self._finish(req, now)
            elif inst.role == PREFILL:
                if req.bucket is None:  # the adaptive router predicted it on arrival
                    self._predict(req)
                handoff_after = self.config.policy.handoff_after_tokens if self.adaptive else 1
                if handoff_after > 1 and not inst.draining:  # its first tokens decode here, then it moves
                    inst.start_decoding(req, release_after=handoff_after - 1)
                else:
                    inst.dispatch_wait.append(req)
            else:  # colocated, or prefilled in place on a decode instance
                inst.start_decoding(req)
        if inst.role == PREFILL:
            inst.dispatch_wait.extend(inst.released)
            inst.released.clear()
            self._dispatch(inst, now)
        # The GPU goes to the instances that waited for it, in order, and only then to this one.
        gpu = self.gpu_of[instance_id]
        gpu.holder = None
        for waiter in gpu.take_waiting():
            self._kick(self.instances[waiter], now)
        self._kick(inst, now)

    def _on_kv_arrival(self, now: float, instance_id: int) -> None:
        self._kick(self.instances[instance_id], now)

    def _on_monitor(self, now: float, _payload) -> None:
        self._collect(now)

    def _on_flip(self, now: float, instance_id: int) -> None:
        self._flip_pending.discard(instance_id)
        old = self.instances[instance_id]
        if not old.is_drained():  # work slipped in from a stale snapshot: finish it first
            self._kick(old, now)
            return
        generation = len(self.result.flips) + 1
        new = self._new_decode(instance_id) if old.role == PREFILL else self._new_prefill(instance_id, generation)
        self.instances[instance_id] = new
        if old.role == PREFILL:  # prefilled requests still waiting for room decode right here
            for req in old.dispatch_wait:
                req.kv_local = True
                new.receive(req)
        self.result.num_flips += 1
        self.result.flips.append((now, instance_id, new.role))
        self._last_work[instance_id] = now
        self._kick(new, now)

    # --- control plane ------------------------------------------------------------------------

    def _predict(self, req: SimRequest) -> None:
        """Size the request for dispatch (room: bucket lower bound) and admission (upper bound)."""
        p, bs, cap = self.config.policy, self.block_size, self.capacity_blocks
        prompt = req.prompt_tokens
        if self.system == "disagg":  # no length prediction: room for the prompt only
            req.need_blocks = req.reserve_blocks = blocks_for(prompt + 1, bs)
            req.predicted_output = 1
            return
        if p.dispatch_policy == "oracle":
            req.bucket = req.output_tokens // p.bucket_size
            need = reserve = req.predicted_output = req.output_tokens
            req.heavy = req.output_tokens > p.heavy_decode_tokens
        else:
            req.bucket = self.predictor.predict(req.output_tokens, req.request_id)
            need, reserve = self.predictor.bucket_bounds(req.bucket)
            req.predicted_output = reserve
            req.heavy = is_heavy_decode(req.bucket, p.bucket_size, p.heavy_decode_tokens)
        req.need_blocks, req.reserve_blocks = placement_blocks(prompt, need, reserve, bs, cap)

    def _dispatch(self, inst: PrefillInstance, now: float) -> None:
        """Send waiting prefilled requests to decode instances chosen from the snapshot; those
        without room retry on the next one. Adaptive: some decode where they are instead."""
        if self.adaptive and not inst.draining:
            self._keep_on_prefill(inst)
        # One knob for two depths: the dispatcher scans as many waiting requests as the prefill
        # queue sorts (`PolicyConfig.sort_window`), here and in the real cluster (`cluster.handoff`).
        scan_depth = self.config.policy.sort_window
        for req, target in inst.dispatcher.place_waiting(inst.dispatch_wait, scan_depth):
            decode = self.instances[target]
            decode.receive(req)
            self._kick(decode, now)

    def _keep_on_prefill(self, inst: PrefillInstance) -> None:
        """Adaptive: prefilled requests that `sched.router.keep_on_prefill` keeps decode here."""
        max_num_seqs = self.config.scheduler.max_num_seqs
        kept = []
        for req in inst.dispatch_wait:
            here = DecodeLoad(inst.instance_id, inst.free_blocks, free_slots=max_num_seqs - inst.batch.num_running,
                              queued_prompt_tokens=inst.queue.pending_tokens, num_running=inst.batch.num_running,
                              context_tokens=inst.batch.total_context)
            if keep_on_prefill(self.cost, here, inst.dispatcher.loads, req.need_blocks, req.kv_len, self.chunk_size):
                kept.append(req)
                inst.start_decoding(req)
        for req in kept:
            inst.dispatch_wait.remove(req)

    def _collect(self, now: float) -> None:
        """Monitor collection: publish loads, retry waiting dispatches, decide flips."""
        cfg = self.config
        statuses = []
        for inst in self.instances.values():
            if inst.role == DECODE:
                fraction = inst.load_fraction()
            else:
                fraction = prefill_load_fraction(inst.load_tokens, self.chunk_size, cfg.flip.prefill_pressure_chunks)
            statuses.append(InstanceStatus(inst.instance_id, inst.role, fraction, inst.draining))
        active = [i for i in self.instances.values() if not i.draining]
        prefill_loads = {i.instance_id: i.load_tokens for i in active if i.role != DECODE}
        decode_loads = tuple(i.decode_load() for i in active if i.role == DECODE)
        waiting = sum(len(i.dispatch_wait) for i in self.instances.values() if i.role == PREFILL)
        snapshot = ClusterSnapshot(now, tuple(statuses), prefill_loads, decode_loads, waiting)
        self.result.peak_dispatch_waiting = max(self.result.peak_dispatch_waiting, waiting)
        running = {i.instance_id: i.batch.num_running for i in active}  # the global scheduler's tie-break
        self.global_scheduler.update(snapshot.prefill_loads, running)
        if self.router is not None:
            self.router.update(snapshot.prefill_loads, snapshot.decode_loads)
        self._broadcast_decode_loads(snapshot.decode_loads)
        for inst in list(self.instances.values()):
            if inst.role == PREFILL:
                self._dispatch(inst, now)
        if self.flip_policy is not None:
            for order in self.flip_policy.decide(snapshot):
                inst = self.instances[order.instance_id]
                inst.draining = True
                gone = inst.instance_id
                prefill_loads = {i: load for i, load in snapshot.prefill_loads.items() if i != gone}
                decode_loads = tuple(load for load in snapshot.decode_loads if load.instance_id != gone)
                self.global_scheduler.update(prefill_loads, running)
                if self.router is not None:
                    self.router.update(prefill_loads, decode_loads)
                self._broadcast_decode_loads(decode_loads)
                self._kick(inst, now)
        if self._unfinished:
            self._push(self.monitor.next_collection_s(now), _MONITOR, None)

    def _broadcast_decode_loads(self, loads: tuple) -> None:
        for inst in self.instances.values():
            if inst.role == PREFILL:
                inst.dispatcher.update(loads)
