"""The controller process: global scheduler, cluster monitor and flip policy (all from `sched`).

It routes each submitted request to the least-loaded prefill (or colocated) instance, collects
every instance's stats (its heartbeat), broadcasts the monitor snapshot (decode loads for the
dispatchers, and the address book) every `monitor_interval_s`, orders flips, and declares an
instance dead when its heartbeat stops or its process is gone: the API then fails the requests it
held and nobody routes to it until a new process of that instance (the supervisor's restart, same
id) sends Ready. It never touches a tensor (no torch import).

A restarted controller (`recovering`: the supervisor in the API process brought it back on the same
port, which the instances' sockets reconnect to by themselves) starts knowing nothing: the first
report of each instance gets a Register, which the instance answers with Ready. It broadcasts no
address book and takes no request until every instance is back or `dead_after_s` has passed, so no
instance drops a peer it merely has not heard of yet; then it tells the API (ClusterReady).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from tetriinfer.cluster import messages as msg
from tetriinfer.cluster.zmq_io import Inbox, Outboxes, Wire
from tetriinfer.config import FlipConfig
from tetriinfer.sched.dispatcher import DecodeLoad
from tetriinfer.sched.flip import FlipPolicy
from tetriinfer.sched.global_scheduler import GlobalScheduler
from tetriinfer.sched.lengths import blocks_for
from tetriinfer.sched.monitor import COLOCATED, DECODE, PREFILL, ClusterSnapshot, InstanceStatus
from tetriinfer.sched.prefix_index import PrefixIndex, prefix_block_keys
from tetriinfer.sched.router import AdaptiveRouter
from tetriinfer.sched.step_cost import LinearStepCost, StepStats

log = logging.getLogger("tetriinfer.controller")


@dataclass
class ControllerConfig:
    api_address: str
    num_instances: int
    host: str = "127.0.0.1"
    port: int | None = None  # the inbox; a free port when None (the launcher passes one)
    monitor_interval_s: float = 0.1
    dead_after_s: float = 5.0  # no stats for this long: the instance is dead
    flip: FlipConfig = field(default_factory=FlipConfig)
    # Instances on other machines (Ray): their pids cannot be probed here; the heartbeat alone decides.
    remote_instances: frozenset[int] = frozenset()
    # Adaptive disaggregation (sched.router): route each request to prefill remotely or locally.
    adaptive: bool = False
    chunk_size: int = 512
    block_size: int = 16
    interference_weight: float = 0.2
    local_ttft_margin_s: float = 0.1  # PolicyConfig.local_ttft_margin_s
    # Cache-aware routing (sched.prefix_index): send a request where its prompt's prefix blocks most
    # likely sit (what was routed there), balanced against queued tokens. Off when the engines do
    # not cache prefixes.
    cache_aware: bool = False
    wire: Wire | None = None  # the cluster's keys and socket directory (cluster.zmq_io): the launcher's
    recovering: bool = False  # a restart: rebuild the view from the instances' reports


REGISTER_EVERY_S = 1.0  # how often to ask an unknown instance for its Ready again


class Controller:
    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.inbox = Inbox(config.wire, config.host, config.port)
        self.out = Outboxes(config.wire)
        self.ready: dict[int, msg.Ready] = {}
        self.stats: dict[int, msg.InstanceStats] = {}
        self.last_seen: dict[int, float] = {}
        self.dead: dict[int, str] = {}
        self.draining: set[int] = set()  # ordered to flip, FlipDone not yet back
        self.pids: dict[int, int] = {}  # instance -> pid, probed each tick (same-machine instances)
        self.asked: dict[int, float] = {}  # unknown instance -> when it was last sent Register
        # The guess of what each instance caches; its capacity is set from the instances' reports.
        self.prefix_index = PrefixIndex(capacity_blocks=0) if config.cache_aware else None
        self.global_scheduler = GlobalScheduler([], self.prefix_index)
        self._num_running: dict[int, int] = {}  # per live instance, from its last report
        self.step_cost = LinearStepCost()  # fitted from the instances' steps each tick
        self.router = AdaptiveRouter(self.step_cost, chunk_size=config.chunk_size,
                                     interference_weight=config.interference_weight,
                                     ttft_margin_s=config.local_ttft_margin_s,
                                     prefix_index=self.prefix_index) if config.adaptive else None
        self.flip_policy = FlipPolicy(config.flip)
        self.num_flips = 0
        self.last_flip_s: float | None = None
        self.cluster_ready = False
        self._running = True
        self._start = time.monotonic()

    def live(self) -> list[int]:
        return [i for i in self.ready if i not in self.dead]

    def serve(self) -> None:
        next_tick = time.monotonic()
        try:
            while self._running:
                wait_ms = max(0, int((next_tick - time.monotonic()) * 1000))
                for message in self.inbox.drain(timeout_ms=max(wait_ms, 1)):
                    self._handle(message)
                if time.monotonic() >= next_tick:
                    self._tick()
                    next_tick = time.monotonic() + self.config.monitor_interval_s
        finally:
            self.inbox.close()
            self.out.close()

    def _handle(self, message) -> None:
        now = time.monotonic()
        if isinstance(message, msg.Submit):
            self._route(message)
        elif isinstance(message, msg.Abort):
            for i in self.live():
                self.out.send(self.ready[i].address, message)
        elif isinstance(message, msg.InstanceStats):
            i = message.instance_id
            if i not in self.ready:
                self._ask_register(message, now)
            elif i not in self.dead:
                self.stats[i] = message
                self.last_seen[i] = now
        elif isinstance(message, msg.Ready):
            self._register(message, now)
        elif isinstance(message, msg.FlipDone):
            self.draining.discard(message.instance_id)
            self.num_flips += 1
            self.last_flip_s = message.drain_s + message.switch_s
            log.warning("instance %d is now %s: drained in %.3f s, switched in %.6f s",
                        message.instance_id, message.role, message.drain_s, message.switch_s)
        elif isinstance(message, msg.Shutdown):
            for i in self.live():
                self.out.send(self.ready[i].address, message)
            self._running = False

    def _ask_register(self, stats: msg.InstanceStats, now: float) -> None:
        """Stats from an instance this controller has no Ready of (it was restarted): ask for one."""
        i = stats.instance_id
        if 0 <= i < self.config.num_instances and now - self.asked.get(i, -REGISTER_EVERY_S) >= REGISTER_EVERY_S:
            self.asked[i] = now
            self.out.send(stats.address, msg.Register())

    def _register(self, ready: msg.Ready, now: float) -> None:
        """An instance (re)joins: at start, after a controller restart, or as a new process of a
        dead one. A new pid under a live id means the old process is gone: its requests fail."""
        i = ready.instance_id
        known = self.ready.get(i)
        if known is not None and i not in self.dead and known.pid != ready.pid:
            self._declare_dead(i, f"it was replaced by process {ready.pid}")
        if self.dead.pop(i, None) is not None:
            log.warning("instance %d is back as process %d", i, ready.pid)
        self.ready[i] = ready
        self.asked.pop(i, None)
        self.last_seen[i] = now
        if i not in self.config.remote_instances:
            self.pids[i] = ready.pid
        if not self.cluster_ready and len(self.ready) == self.config.num_instances:
            self._tick()  # everyone gets the address book before the first request

    def _route(self, submit: msg.Submit) -> None:
        try:
            if not self.cluster_ready:
                raise RuntimeError("not ready")
            prompt, block_size = len(submit.prompt_token_ids), self.config.block_size
            keys = prefix_block_keys(submit.prompt_token_ids, block_size) if self.prefix_index is not None else ()
            if self.router is not None and self.step_cost.fitted:  # unfitted: the paper's way
                route = self.router.route(prompt, blocks_for(prompt + 1, block_size), keys, block_size)
                instance_id, submit.local = route.instance_id, route.local
            else:
                instance_id = self.global_scheduler.pick(prompt, keys, block_size)
        except RuntimeError:
            self._reject(submit, "no prefill instance is available" if self.cluster_ready
                         else "the cluster is still starting")
            return
        if not self.out.send(self.ready[instance_id].address, submit):  # its inbox stayed full: frozen or dead
            self._reject(submit, "no prefill instance is available")
            return
        self.out.send(self.config.api_address, msg.Routed(submit.request_id, instance_id))

    def _reject(self, submit: msg.Submit, error: str) -> None:
        self.out.send(self.config.api_address, msg.TokenBatch(-1, [
            msg.TokenDelta.ended(submit.request_id, "error", error)]))

    # ---- the monitor tick --------------------------------------------------------------------------
    def _tick(self) -> None:
        now = time.monotonic()
        self._find_dead(now)
        became_ready = not self.cluster_ready and self._complete(now)
        self.cluster_ready = self.cluster_ready or became_ready
        live = [self.stats[i] for i in self.live() if i in self.stats]
        # The role each instance reports, unless it is draining for a flip the controller ordered.
        active = [s for s in live if s.instance_id not in self.draining and not s.draining]
        prefill_loads = {s.instance_id: s.queued_prompt_tokens for s in active if s.role in (PREFILL, COLOCATED)}
        self._num_running = {s.instance_id: s.num_running for s in active}  # the global scheduler's tie-break
        decode_loads = [s.decode_load for s in active if s.role == DECODE and s.decode_load is not None]
        self.global_scheduler.update(prefill_loads, self._num_running)
        if self.prefix_index is not None and live:  # what one instance's cache can hold at most
            self.prefix_index.capacity_blocks = min(s.kv_blocks_total for s in live)
        self._update_router(live, prefill_loads, decode_loads)
        addresses = {i: self.ready[i].address for i in self.live()}
        snapshot = msg.Snapshot(now - self._start, decode_loads, addresses, list(self.step_cost.coefficients))
        if self.cluster_ready:  # a partial address book would make instances give up on peers
            for i in self.live():
                self.out.send(self.ready[i].address, snapshot)
            self._flip(now, live, decode_loads)
        self.out.send(self.config.api_address, msg.ClusterStats(
            live, self.num_flips, self.last_flip_s, sorted(self.dead)))
        if became_ready:
            max_len = min(r.max_model_len for r in self.ready.values())
            self.out.send(self.config.api_address, msg.ClusterReady(len(self.ready), max_len))

    def _complete(self, now: float) -> bool:
        """Every instance has registered; a restarted controller waits for them at most
        `dead_after_s` (one that stays silent is what a dead one would be)."""
        if len(self.ready) == self.config.num_instances:
            return True
        return self.config.recovering and bool(self.live()) and now - self._start > self.config.dead_after_s

    def _update_router(self, live: list[msg.InstanceStats], prefill_loads: dict[int, int],
                       decode_loads: list[DecodeLoad]) -> None:
        """Refit the step cost from every live instance's steps; price the KV move from the
        transfers measured so far; give the router the new loads."""
        self.step_cost = LinearStepCost.fit([StepStats.from_list(s.step_stats) for s in live if s.step_stats])
        if self.router is None:
            return
        self.router.cost = self.step_cost
        # The KV move is priced at 0: the measured transfer seconds run from reservation to landing,
        # mostly both instances finishing a step, not the copy (on one H200 they priced a 1k-token
        # move at ~0.2 s, sending every prompt to the decode instance and leaving the prefill idle).
        self.router.update(prefill_loads, decode_loads)

    def _flip(self, now: float, live: list[msg.InstanceStats], decode_loads: list[DecodeLoad]) -> None:
        if not self.config.flip.enabled or not live or any(s.role == COLOCATED for s in live):
            return
        statuses = tuple(InstanceStatus(s.instance_id, s.role, s.load_fraction,
                                        s.draining or s.instance_id in self.draining) for s in live)
        snapshot = ClusterSnapshot(
            now - self._start, statuses,
            {s.instance_id: s.queued_prompt_tokens for s in live if s.role == PREFILL},
            tuple(decode_loads),
            sum(s.num_dispatch_waiting for s in live),
        )
        for order in self.flip_policy.decide(snapshot):
            self.draining.add(order.instance_id)
            self.global_scheduler.update({i: load for i, load in snapshot.prefill_loads.items()
                                          if i != order.instance_id}, self._num_running)
            self.out.send(self.ready[order.instance_id].address, msg.Flip(order.to_role))
            log.warning("flip: instance %s -> %s", order.instance_id, order.to_role)

    def _find_dead(self, now: float) -> None:
        for i in self.live():
            reason = None
            if now - self.last_seen.get(i, now) > self.config.dead_after_s:
                reason = f"no heartbeat for {self.config.dead_after_s:.1f} s"
            elif i in self.pids and not _pid_alive(self.pids[i]):
                reason = f"its process {self.pids[i]} exited"
            if reason is not None:
                self._declare_dead(i, reason)

    def _declare_dead(self, i: int, reason: str) -> None:
        self.dead[i] = reason
        self.stats.pop(i, None)
        self.draining.discard(i)
        if self.prefix_index is not None:  # a restarted process starts with an empty cache
            self.prefix_index.drop(i)
        log.error("instance %d is dead: %s", i, reason)
        self.out.send(self.config.api_address, msg.InstanceDied(i, reason))


def _pid_alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reaps it if it is our child and gone
        if waited == pid:
            return False
    except ChildProcessError:
        pass  # not our child (instances are the launcher's children): fall back to a signal probe
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); /proc tells us it is done.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def run_controller(config: ControllerConfig) -> None:
    logging.basicConfig(level=os.environ.get("TETRIINFER_LOG", "WARNING"),
                        format="%(asctime)s controller %(levelname)s %(message)s")
    Controller(config).serve()
