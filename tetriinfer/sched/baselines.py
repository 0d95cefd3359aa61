"""Step policies of the colocated baselines: one instance runs both prefill and decode.

- `vllm` (vanilla vLLM, the paper's baseline): prefill first. While prompts wait and fit (token
  budget `max_num_batched_tokens`, `max_num_seqs`, free KV blocks), a step prefills whole prompts
  only; otherwise it decodes every running request. A prompt longer than the budget runs alone
  (vLLM would reject it; we keep every request).
- `sarathi` (Sarathi-Serve / vLLM V1 default): every step decodes all running requests and fills
  the rest of a `token_budget` with prompt chunks, FCFS, prompts resuming across steps.

The scheduler holds the waiting and prefilling queues; the running batch and its memory belong to
the caller, which passes `num_running` and `free_blocks` in and executes the returned plan.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tetriinfer.sched.chunker import Chunk, ChunkPiece, next_chunk
from tetriinfer.sched.lengths import blocks_for
from tetriinfer.sched.prefill_queue import QueuedPrompt

COLOCATED_SYSTEMS = ("vllm", "sarathi")


@dataclass(frozen=True)
class StepPlan:
    chunk: Chunk | None  # prompt tokens computed this step
    decode: bool  # one decode token for every running request
    started: tuple[QueuedPrompt, ...] = ()  # requests whose prompt KV blocks are allocated now


class ColocatedScheduler:
    def __init__(
        self,
        system: str,
        *,
        token_budget: int,
        max_num_seqs: int,
        block_size: int,
    ) -> None:
        if system not in COLOCATED_SYSTEMS:
            raise ValueError(f"system must be one of {COLOCATED_SYSTEMS}, got {system!r}")
        self.system = system
        self.token_budget = token_budget
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.waiting: deque[QueuedPrompt] = deque()  # no KV yet
        self.prefilling: deque[QueuedPrompt] = deque()  # KV allocated, prompt partly computed
        self.pending_tokens = 0  # prompt tokens not yet computed, waiting + prefilling

    def __len__(self) -> int:
        return len(self.waiting) + len(self.prefilling)

    def add(self, request: QueuedPrompt, *, front: bool = False) -> None:
        """Queue a request; `front=True` for one preempted by recompute (it goes first, as in vLLM)."""
        if front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)
        self.pending_tokens += request.prompt_len - request.num_prefilled

    def plan(self, num_running: int, free_blocks: int, admit_new: bool = True) -> StepPlan:
        """The next step. `free_blocks`: KV blocks free after the running decodes' next growth;
        `admit_new=False` starts no waiting prompt (a step that preempted)."""
        if not admit_new:
            free_blocks = -1
        if self.system == "vllm":
            return self._plan_vllm(num_running, free_blocks)
        return self._plan_sarathi(num_running, free_blocks)

    def commit(self, plan: StepPlan) -> list[QueuedPrompt]:
        """Apply a finished step's prompt work; return requests whose prompt is now complete."""
        for request in plan.started:
            self.prefilling.append(self.waiting.popleft())
        done: list[QueuedPrompt] = []
        for piece in plan.chunk.pieces if plan.chunk else ():
            request = self.prefilling[0] if self.prefilling else None
            if request is None or request.request_id != piece.request_id or request.num_prefilled != piece.start:
                raise ValueError(f"chunk piece {piece} is not the head of the prefilling queue")
            request.num_prefilled = piece.end
            self.pending_tokens -= piece.length
            if request.num_prefilled >= request.prompt_len:
                done.append(self.prefilling.popleft())
        return done

    def _start_fitting(self, num_seqs: int, free_blocks: int, token_room: int) -> list[QueuedPrompt]:
        """Head-of-line requests whose whole prompt KV fits now (FCFS: stop at the first that does not)."""
        started: list[QueuedPrompt] = []
        for request in self.waiting:
            need = blocks_for(request.prompt_len, self.block_size)
            if num_seqs + len(started) >= self.max_num_seqs or need > free_blocks or token_room <= 0:
                break
            started.append(request)
            free_blocks -= need
            token_room -= request.prompt_len - request.num_prefilled
        return started

    def _plan_vllm(self, num_running: int, free_blocks: int) -> StepPlan:
        started = self._start_fitting(num_running, free_blocks, self.token_budget)
        # Whole prompts only: drop the last one if it overflows the budget, unless it is alone.
        while len(started) > 1 and sum(r.prompt_len - r.num_prefilled for r in started) > self.token_budget:
            started.pop()
        if started:
            pieces = tuple(ChunkPiece(r.request_id, r.num_prefilled, r.prompt_len - r.num_prefilled) for r in started)
            return StepPlan(Chunk(pieces, sum(p.length for p in pieces)), decode=False, started=tuple(started))
        return StepPlan(None, decode=num_running > 0)

    def _plan_sarathi(self, num_running: int, free_blocks: int) -> StepPlan:
        budget = self.token_budget - num_running
        if budget <= 0:
            return StepPlan(None, decode=num_running > 0)
        queued = sum(r.prompt_len - r.num_prefilled for r in self.prefilling)
        started = self._start_fitting(num_running + len(self.prefilling), free_blocks, budget - queued)
        chunk = next_chunk([*self.prefilling, *started], budget, pad=False)
        return StepPlan(chunk if chunk.pieces else None, decode=num_running > 0, started=tuple(started))
