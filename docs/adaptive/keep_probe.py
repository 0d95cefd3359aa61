"""Probe: could a different "who decodes a request" rule give TetriInfer a lower TPOT p99 than the
colocated baselines at equal GPUs? (docs/adaptive.md, "Where TPOT p99 comes from".)

    python docs/adaptive/keep_probe.py            # about 3 minutes on 2 cores; one line per variant

Each variant replaces one decision of the adaptive policy *inside this script only* (the shipped
policy is the default row); the cells are 4 GPUs, H100 (measured profile) and H200 (roofline),
seven workloads at 0.3 / 0.6 / 0.9 of capacity, 400 requests, Poisson:

- `never keep`: a prefill instance decodes a request itself only when no decode instance has room;
- `re-decide every 16`: a kept request is offered again after every 16 tokens (migration);
- `marginal cost`: keep when the request's own step time plus what it adds to the other running
  requests' steps is lower here than on the best decode instance, with the prefill instance's
  prompt mix measured (moving averages of the share of steps with a chunk and the chunk's size);
- `hand-off after 1`: move at once instead of after 8 tokens;
- `prefill-first prefill role`: prefill instances run vLLM's whole-prompt, prefill-first steps;
- `idle flip`: the shipped `FlipPolicy` switched on (`FlipConfig(enabled=True)`: an instance idle
  for 2 s flips while the other role is under pressure);
- `utilization flip`: a flip on measured imbalance instead: each instance's busy fraction (seconds
  of forward passes per second, averaged over 2 s); when one role's mean is >= 0.9 and the other's
  <= 0.5 for 1 s, the least busy instance of the idle role flips (one at a time, 5 s apart).
"""

from __future__ import annotations

import dataclasses
import sys
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import experiments  # noqa: E402

from tetriinfer.config import FlipConfig  # noqa: E402
from tetriinfer.sched import router  # noqa: E402
from tetriinfer.sched.flip import FlipOrder  # noqa: E402
from tetriinfer.sched.monitor import DECODE, PREFILL  # noqa: E402
from tetriinfer.sim import cluster as sim_cluster  # noqa: E402
from tetriinfer.sim import instances as sim_instances  # noqa: E402

WORKLOADS = ("lpld", "hphd", "mixed", "azure-code", "azure-conv", "vidur-arxiv", "vidur-sharegpt")
VARIANTS = {  # name -> (knobs of this probe, PolicyConfig overrides)
    "shipped (keep if faster now)": ({}, {}),
    "never keep": ({"keep": "no_room_only"}, {}),
    "re-decide every 16": ({"redecide": 16}, {}),
    "marginal cost": ({"keep": "marginal"}, {}),
    "hand-off after 1": ({}, {"handoff_after_tokens": 1}),
    "prefill-first prefill role": ({"prefill_steps": "whole"}, {}),
    "idle flip": ({"flip": "idle"}, {}),
    "utilization flip": ({"flip": "utilization"}, {}),
}
KNOBS: dict = {}
EWMA = 0.05  # the prompt-mix averages, per step


def _track_prompt_mix(start_step):
    def start(self, now):
        seconds = start_step(self, now)
        if seconds is not None:
            size = self._plan.chunk.size
            self.mix_share = (1 - EWMA) * getattr(self, "mix_share", 0.0) + EWMA * (size > 0)
            self.mix_tokens = (1 - EWMA) * getattr(self, "mix_tokens", 0.0) + EWMA * size
            self.busy_s = getattr(self, "busy_s", 0.0) + seconds
        return seconds
    return start


def _keep(shipped):
    def keep(cost, here, there, need_blocks, kv_tokens, chunk_size):
        rule = KNOBS.get("keep")
        if rule is None:
            return shipped(cost, here, there, need_blocks, kv_tokens, chunk_size)
        if here.free_slots <= 0 or here.room_blocks < need_blocks:
            return False
        with_room = [d for d in there if d.room_blocks >= need_blocks and d.free_slots > 0]
        if rule == "no_room_only" or not with_room:
            return not with_room

        def marginal(load, prompt):  # own step time + what one more decode adds to the others'
            prompt = min(prompt, max(chunk_size - load.num_running - 1, 0))
            with_it = cost.step_time(prompt, 0, load.num_running + 1, load.context_tokens + kv_tokens)
            without = cost.step_time(prompt, 0, load.num_running, load.context_tokens) if load.num_running else with_it
            return with_it + load.num_running * (with_it - without)

        share, tokens = KNOBS["mix"]
        chunk = int(tokens / share) if share > 0 else 0
        if here.queued_prompt_tokens >= chunk_size:
            share, chunk = 1.0, chunk_size
        here_s = share * marginal(here, chunk) + (1 - share) * marginal(here, 0)
        return here_s < min(marginal(d, d.queued_prompt_tokens) for d in with_room)
    return keep


def _keep_on_prefill(self, inst) -> None:  # the simulator's, with a re-decision period
    KNOBS["mix"] = (getattr(inst, "mix_share", 0.0), getattr(inst, "mix_tokens", 0.0))
    kept = []
    for req in inst.dispatch_wait:
        here = router.DecodeLoad(inst.instance_id, inst.free_blocks,
                                 free_slots=self.config.scheduler.max_num_seqs - inst.batch.num_running,
                                 queued_prompt_tokens=inst.queue.pending_tokens, num_running=inst.batch.num_running,
                                 context_tokens=inst.batch.total_context)
        if sim_cluster.keep_on_prefill(self.cost, here, inst.dispatcher.loads, req.need_blocks, req.kv_len,
                                       self.chunk_size):
            kept.append(req)
            inst.start_decoding(req, release_after=KNOBS.get("redecide"))
    for req in kept:
        inst.dispatch_wait.remove(req)


def _new_prefill(shipped):
    def new(self, i, generation=0):
        inst = shipped(self, i, generation)
        if KNOBS.get("prefill_steps") and self.adaptive:
            inst.shape = dataclasses.replace(inst.shape, policy=KNOBS["prefill_steps"],
                                             token_budget=self.config.policy.max_num_batched_tokens)
        return inst
    return new


class UtilizationFlip:
    """Flip the least busy instance of a role averaging <= `low` busy while the other averages
    >= `high`, once that has held for `hold_s`; `cooldown_s` between flips."""

    def __init__(self, sim, high=0.9, low=0.5, hold_s=1.0, cooldown_s=5.0, average_s=2.0) -> None:
        self.sim, self.high, self.low, self.hold_s, self.cooldown_s, self.average_s = sim, high, low, hold_s, cooldown_s, average_s
        self.busy: dict = {}
        self.seen: dict = {}
        self.since = None
        self.last_flip_s = -float("inf")

    def decide(self, snapshot):
        now = snapshot.time_s
        for inst in self.sim.instances.values():
            busy_s = getattr(inst, "busy_s", 0.0)
            before, then = self.seen.get(inst.instance_id, (busy_s, now))
            if now > then:
                weight = min(1.0, (now - then) / self.average_s)
                fraction = min(1.0, (busy_s - before) / (now - then))
                self.busy[inst.instance_id] = (1 - weight) * self.busy.get(inst.instance_id, fraction) + weight * fraction
            self.seen[inst.instance_id] = (busy_s, now)
        if any(s.draining for s in snapshot.instances) or now - self.last_flip_s < self.cooldown_s:
            return []
        roles = {role: [s for s in snapshot.instances if s.role == role] for role in (PREFILL, DECODE)}
        mean = {role: sum(self.busy.get(s.instance_id, 0.0) for s in pool) / max(len(pool), 1) for role, pool in roles.items()}
        idle = next((r for r, other in ((PREFILL, DECODE), (DECODE, PREFILL))
                     if mean[other] >= self.high and mean[r] <= self.low and len(roles[r]) > 1), None)
        if idle is None:
            self.since = None
            return []
        self.since = now if self.since is None else self.since
        if now - self.since < self.hold_s:
            return []
        least = min(roles[idle], key=lambda s: self.busy.get(s.instance_id, 0.0))
        self.last_flip_s, self.since = now, None
        return [FlipOrder(least.instance_id, DECODE if idle == PREFILL else PREFILL)]


def _with_flip(shipped_init):
    def init(self, config, cost, predictor=None):
        shipped_init(self, config, cost, predictor)
        if KNOBS.get("flip") == "utilization" and self.flip_policy is not None:
            self.flip_policy = UtilizationFlip(self)
    return init


sim_instances.BatchInstance.start_step = _track_prompt_mix(sim_instances.BatchInstance.start_step)
sim_cluster.keep_on_prefill = _keep(router.keep_on_prefill)
sim_cluster.ClusterSim._keep_on_prefill = _keep_on_prefill
sim_cluster.ClusterSim._new_prefill = _new_prefill(sim_cluster.ClusterSim._new_prefill)
sim_cluster.ClusterSim.__init__ = _with_flip(sim_cluster.ClusterSim.__init__)


def run(cell: tuple) -> dict:
    out = None
    for name, (knobs, policy) in VARIANTS.items():
        KNOBS.clear()
        KNOBS.update(knobs)
        experiments.SYSTEMS = {} if out is not None else {"vllm": ("vllm", {}), "sarathi": ("sarathi", {})}
        experiments.SYSTEMS[name] = ("tetriinfer", policy)
        experiments.FlipConfig = (lambda: FlipConfig(enabled=True)) if knobs.get("flip") else FlipConfig
        row = experiments.run_cell(cell)
        out = row if out is None else {**out, "systems": {**out["systems"], **row["systems"]}}
    return out


def main() -> None:
    cells = [c for c in experiments.cells(400) if c[1] == 4 and c[2] in WORKLOADS and c[3] == "poisson"]
    with Pool(2) as pool:
        rows = pool.map(run, cells)
    experiments.print_variants(rows, VARIANTS)


if __name__ == "__main__":
    main()
