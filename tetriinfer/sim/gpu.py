"""GPUs shared by several instances, time-sliced as the CUDA driver does it without MPS: one
instance's forward step at a time, the GPU passed on in FIFO order when a step ends.

The simulator asks `try_start` before it starts a step; a refused instance waits in its GPU's
queue, and when the step on the GPU ends `take_waiting` hands back the waiters (oldest first) to
be kicked again. With one instance per GPU nobody ever waits, so the run is exactly the unshared one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class SharedGpu:
    """One GPU: the instance mid-step on it (None: idle) and the instances waiting for it."""

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

    def take_waiting(self) -> list[int]:
        """The GPU is idle: the waiters, oldest first, to try again (the first with work wins)."""
        waiters = list(self.waiting)
        self.waiting.clear()
        return waiters


def gpus_by_instance(num_instances: int, instances_per_gpu: int) -> list[SharedGpu]:
    """Instance `i`'s GPU is number `i // instances_per_gpu` (the launcher's placement, by id)."""
    gpus = [SharedGpu() for _ in range(-(-num_instances // instances_per_gpu))]
    return [gpus[i // instances_per_gpu] for i in range(num_instances)]
