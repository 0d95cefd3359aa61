"""The continuous-batching decode set of one instance, advanced one token per step in O(1).

Every running request gains one KV token per step, so nothing is stored per token: a request's
context is `kv0 + (step - step0)`. Block growth is exact: a request needs a new block when its
context is a multiple of `block_size`, i.e. when `(kv0 - step0 + step) % block_size == 0`, so
counting running requests by their constant phase `(kv0 - step0) % block_size` gives the blocks
the next step needs in O(1). Finishes, preemption order and the shortest predicted remaining job
live in lazily pruned heaps/stacks (an entry is stale when the request's epoch moved on).
"""

from __future__ import annotations

import heapq

from tetriinfer.sched.lengths import blocks_for
from tetriinfer.sim.request import SimRequest


class RunningBatch:
    def __init__(self, capacity_blocks: int, block_size: int) -> None:
        self.capacity_blocks = capacity_blocks
        self.block_size = block_size
        self.step = 0
        self.num_running = 0
        self.total_context = 0
        self.used_blocks = 0
        self.reserved_blocks = 0  # sum of running requests' admission reservations
        self._phase = [0] * block_size
        self._finish: list[tuple[int, int, SimRequest, int]] = []
        self._admitted: list[tuple[SimRequest, int]] = []  # admission order, for preemption
        self._predicted_end: list[tuple[int, int, SimRequest, int]] = []
        self._release: list[tuple[int, int, SimRequest, int]] = []  # (step, seq, req, epoch): leaves unfinished
        self._seq = 0

    def context_of(self, req: SimRequest) -> int:
        return req.batch_kv0 + self.step - req.batch_step0

    def admit(self, req: SimRequest, reserve_blocks: int, predicted_decode_left: int,
              release_after: int | None = None) -> None:
        """Start decoding `req` from `req.kv_len` KV tokens; its blocks are counted from now on.
        With `release_after`, a request still running after that many steps leaves the batch
        (`advance` returns it among the released, its KV counted out)."""
        req.batch_epoch += 1
        req.batch_step0, req.batch_kv0, req.batch_reserve = self.step, req.kv_len, reserve_blocks
        self._phase[(req.kv_len - self.step) % self.block_size] += 1
        self.num_running += 1
        self.total_context += req.kv_len
        self.used_blocks += blocks_for(req.kv_len, self.block_size)
        self.reserved_blocks += reserve_blocks
        self._seq += 1
        heapq.heappush(self._finish, (self.step + req.decode_left, self._seq, req, req.batch_epoch))
        end = self.step + max(predicted_decode_left, 0)
        heapq.heappush(self._predicted_end, (end, self._seq, req, req.batch_epoch))
        if release_after is not None and release_after < 1:
            raise ValueError(f"release_after must be >= 1 step, got {release_after}")
        if release_after is not None and release_after < req.decode_left:
            heapq.heappush(self._release, (self.step + release_after, self._seq, req, req.batch_epoch))
        self._admitted.append((req, req.batch_epoch))
        if len(self._admitted) > 2 * self.num_running + 64:
            self._admitted = [(r, e) for r, e in self._admitted if r.batch_epoch == e]

    def blocks_needed_next_step(self) -> int:
        return self._phase[(-self.step) % self.block_size]

    def shortest_remaining_reserve(self) -> int:
        """Reservation of the running request predicted to finish first (0 when none runs)."""
        heap = self._predicted_end
        while heap and heap[0][2].batch_epoch != heap[0][3]:
            heapq.heappop(heap)
        return heap[0][2].batch_reserve if heap else 0

    def preempt_latest(self) -> SimRequest:
        """Evict the most recently admitted running request (vLLM's choice); it keeps its tokens
        but loses its KV, so `kv_len` tokens must be recomputed."""
        while True:
            req, epoch = self._admitted.pop()
            if req.batch_epoch == epoch:
                break
        kv = self.context_of(req)
        req.decode_left -= kv - req.batch_kv0
        req.kv_len = kv
        self._remove(req, kv)
        return req

    def advance(self) -> tuple[list[SimRequest], list[SimRequest]]:
        """Account one decode step (every running request gains a token); return the finished
        requests and the released ones (admitted with `release_after`, now due and unfinished)."""
        self.used_blocks += self.blocks_needed_next_step()
        self.total_context += self.num_running
        self.step += 1
        finished = []
        heap = self._finish
        while heap and (heap[0][0] <= self.step or heap[0][2].batch_epoch != heap[0][3]):
            _, _, req, epoch = heapq.heappop(heap)
            if req.batch_epoch != epoch:
                continue
            kv = self.context_of(req)
            req.kv_len, req.decode_left = kv, 0
            self._remove(req, kv)
            finished.append(req)
        released = []
        heap = self._release
        while heap and (heap[0][0] <= self.step or heap[0][2].batch_epoch != heap[0][3]):
            _, _, req, epoch = heapq.heappop(heap)
            if req.batch_epoch != epoch:
                continue
            kv = self.context_of(req)
            req.decode_left -= kv - req.batch_kv0
            req.kv_len = kv
            self._remove(req, kv)
            released.append(req)
        return finished, released

    def _remove(self, req: SimRequest, kv: int) -> None:
        req.batch_epoch += 1
        self._phase[(req.batch_kv0 - req.batch_step0) % self.block_size] -= 1
        self.num_running -= 1
        self.total_context -= kv
        self.used_blocks -= blocks_for(kv, self.block_size)
        self.reserved_blocks -= req.batch_reserve
