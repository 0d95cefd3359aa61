"""GPUs shared by several instances: time-sliced (`SharedGpu`), or side by side under CUDA MPS
with a share of the SMs each (`MpsGpu`).

Time-slicing is what the CUDA driver does without MPS: one instance's forward step at a time, the
GPU passed on in FIFO order when a step ends. The simulator asks `try_start` before it starts a
step; a refused instance waits in its GPU's queue, and when the step on the GPU ends `take_waiting`
hands back the waiters (oldest first) to be kicked again.

Under MPS every instance steps whenever it has work, and a step runs slower by its SM share and by
what its neighbours run meanwhile (`mps_slowdown`, calibrated in `MPS`). A step is a fraction of
work that progresses at 1 / (its profiled time x its slowdown); whenever a step on the GPU starts
or ends, the others' slowdowns and end times are recomputed (a fluid model: no kernel-level
interleaving). `start` and `end` return the (end time, instance) events to push; an end event that
a later `start` moved is stale and `end` answers None for it.

With one instance per GPU nobody ever waits or overlaps: `gpus_by_instance` then gives plain
`SharedGpu`s, so the run is exactly the unshared one in either mode.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field



@dataclass
class SharedGpu:
    """One time-sliced GPU: the instance mid-step on it (None: idle) and the instances waiting."""

    holder: int | None = None
    waiting: deque[int] = field(default_factory=deque)

    def try_start(self, instance_id: int) -> bool:
        """May this instance start a step now? It may if the GPU is idle and nobody queued before
        it (fairness: a waiter is never overtaken); otherwise it joins the queue once."""
        if self.holder is None and not self.waiting:
            return True
        if instance_id != self.holder and instance_id not in self.waiting:
            self.waiting.append(instance_id)
        return False

    def start(self, instance_id: int, now: float, duration: float, decode_seqs: int = 0,
              decode_context: int = 0) -> list[tuple[float, int]]:
        self.holder = instance_id
        return [(now + duration, instance_id)]

    def end(self, instance_id: int, now: float) -> list[tuple[float, int]] | None:
        return []  # never stale; `holder` is released by the cluster loop once the step is applied

    def take_waiting(self) -> list[int]:
        """The GPU is idle: the waiters, oldest first, to try again (the first with work wins)."""
        waiters = list(self.waiting)
        self.waiting.clear()
        return waiters


@dataclass(frozen=True)
class MpsCalibration:
    """The MPS model's constants, all from measurements on one H200 with Llama-3-8B (a decode
    step of batch 64 at 1k context against 2,048-token prefill chunks; docs/simulation.md,
    "Instances sharing a GPU", has the derivations).

    - compute_full_share 1.0: prefill throughput tracks the SM share all the way up (green
      contexts, docs/adaptive.md: 0.25 / 0.37 / 0.48 of alone at 24% / 36% / 48% of the SMs).
    - compute_beside_work 0.40 / 0.35: MPS with prefill capped at 40% kept 35% of its throughput
      beside decodes, not 40% (memory and L2 contention on top of the SM cap).
    - memory_beside_compute: a decode step while a prefill of share s runs beside it, linear in s
      through (0, 1.0), the 40% cap's 1.3x and uncapped MPS's 6.8x (measured with the decode
      uncapped; a memory-bound step hardly needs its own SMs: batch-1 decode 4.7 ms on half the
      SMs against 4.5 ms on all, docs/DESIGN.md, so its own share is ignored).
    - memory_beside_memory 1.67: not measured; two decode steps split the HBM bandwidth, which is
      3.4 ms of a 5.1 ms batch-1 decode step on the H200 (the rest is host work): (1.7 + 2 x 3.4) / 5.1.
    """

    compute_full_share: float = 1.0
    compute_beside_work: float = 0.40 / 0.35
    memory_beside_compute: tuple[tuple[float, float], ...] = ((0.0, 1.0), (0.4, 1.3), (1.0, 6.8))
    memory_beside_memory: float = (1.7 + 2 * 3.4) / 5.1

    def memory_slowdown_beside_compute(self, share: float) -> float:
        points = self.memory_beside_compute
        for (s0, f0), (s1, f1) in zip(points, points[1:]):
            if share <= s1:
                return f0 + (f1 - f0) * (max(share, s0) - s0) / (s1 - s0)
        return points[-1][1]


MPS = MpsCalibration()


@dataclass
class MpsStep:
    """A step under MPS: `compute` is the compute-bound fraction of its profiled time `alone_s`."""

    alone_s: float
    compute: float
    share: float
    left: float = 1.0  # fraction of the step still to run
    slowdown: float = 1.0
    since_s: float = 0.0  # `left` is as of this time
    end_s: float = 0.0


def mps_slowdown(step: MpsStep, others: list[MpsStep], calib: MpsCalibration = MPS) -> float:
    """How much slower `step` runs than its profiled time, beside `others` (steps running now).

    Its compute part runs on its SM share (shrunk in proportion when the shares of the steps
    computing at once exceed the GPU), slowed by contention when anything runs beside it; its
    memory part is slowed by neighbours' compute (by their share) and memory parts. Each
    neighbour counts in proportion to its own compute and memory fractions."""
    crowd = step.share + sum(o.share * o.compute for o in others)
    share = step.share / crowd if crowd > 1.0 else step.share
    compute = calib.compute_full_share / min(calib.compute_full_share, share)
    if others:
        compute *= 1.0 + len(others) * (calib.compute_beside_work - 1.0)
    memory = 1.0 + sum(o.compute * (calib.memory_slowdown_beside_compute(o.share) - 1.0)
                       + (1.0 - o.compute) * (calib.memory_beside_memory - 1.0) for o in others)
    return 1.0 + step.compute * (compute - 1.0) + (1.0 - step.compute) * (memory - 1.0)


@dataclass
class MpsGpu:
    """One GPU under MPS: the steps running on it by instance id, and each instance's SM share
    (fixed when its process starts, so it survives a role flip)."""

    shares: dict[int, float]
    cost: object  # the cost model, for a step's memory-bound part
    running: dict[int, MpsStep] = field(default_factory=dict)
    holder: int | None = None  # the cluster loop's time-slice bookkeeping; unused here
    waiting: deque[int] = field(default_factory=deque)  # never anyone: nobody waits under MPS

    def try_start(self, instance_id: int) -> bool:
        return True

    def take_waiting(self) -> list[int]:
        return []

    def start(self, instance_id: int, now: float, duration: float, decode_seqs: int = 0,
              decode_context: int = 0) -> list[tuple[float, int]]:
        # Memory-bound part: what a decode-only step of its decode batch costs (one sequence's if it
        # has none: every step streams the weights once); the rest is the prompt tokens' compute.
        memory = min(duration, self.cost.step_time(0, 0, max(decode_seqs, 1), decode_context))
        compute = 1.0 - memory / duration if duration > 0 else 0.0
        self._advance(now)
        self.running[instance_id] = MpsStep(duration, compute, self.shares[instance_id], since_s=now)
        return self._reschedule(now)

    def end(self, instance_id: int, now: float) -> list[tuple[float, int]] | None:
        step = self.running.get(instance_id)
        if step is None or step.end_s != now:
            return None  # stale: a neighbour's start or end moved this step's end
        self._advance(now)
        del self.running[instance_id]
        return self._reschedule(now)

    def _advance(self, now: float) -> None:
        for step in self.running.values():
            step.left = max(step.left - (now - step.since_s) / (step.alone_s * step.slowdown), 0.0)
            step.since_s = now

    def _reschedule(self, now: float) -> list[tuple[float, int]]:
        moved = []
        for i, step in self.running.items():
            step.slowdown = mps_slowdown(step, [o for j, o in self.running.items() if j != i])
            end_s = now + step.left * step.alone_s * step.slowdown
            if end_s != step.end_s:
                step.end_s = end_s
                moved.append((end_s, i))
        return moved


def gpus_by_instance(num_instances: int, instances_per_gpu: int, sharing: str = "time-slice",
                     shares: list[float] | None = None, cost=None) -> list[SharedGpu | MpsGpu]:
    """Instance `i`'s GPU is number `i // instances_per_gpu` (the launcher's placement, by id);
    under MPS instance `i` gets `shares[i]` of the SMs."""
    n = -(-num_instances // instances_per_gpu)
    if sharing == "mps" and instances_per_gpu > 1:
        gpus = [MpsGpu({i: shares[i] for i in range(g * instances_per_gpu, min((g + 1) * instances_per_gpu, num_instances))},
                       cost) for g in range(n)]
    else:
        gpus = [SharedGpu() for _ in range(n)]
    return [gpus[i // instances_per_gpu] for i in range(num_instances)]
