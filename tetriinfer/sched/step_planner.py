"""The step planner: which prompt tokens the next forward pass of one instance computes.

One algorithm for the real engine (`engine.scheduler`) and the simulator (`sim.instances`), so a
comparison of the two compares one policy. Step policies (`STEP_POLICIES`):

- `chunked`: the paper's prefill instance, prefill first. A step is one chunk of prompt tokens
  (exactly `token_budget`, the last chunk padded when `pad`) or, when no prompt token can run,
  one decode of the running batch.
- `whole`: vanilla vLLM, prefill first. A step prefills whole prompts only, as many as fit in
  `token_budget`; a prompt longer than the budget runs alone (vLLM would reject it; we keep it).
- `mixed`: Sarathi-Serve / vLLM V1. Every running request decodes and prompt chunks fill the rest
  of `token_budget`.

The caller owns the running batch and the KV memory. For `mixed` it schedules the decodes first
(growing their KV, preempting if it must) and passes the blocks left; for the prefill-first
policies it passes the blocks free now and schedules the decodes only when the plan says so.
Prompts come in scheduling order (FCFS, or a `PrefillQueue`'s order); a prompt holds
`blocks_for(num_prefilled)` KV blocks, and one that has started holds a sequence slot. A prompt
that does not get its blocks or a slot stops the plan there: later prompts wait behind it (FCFS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from tetriinfer.sched.chunker import Chunk, ChunkPiece, PendingPrefill, next_chunk
from tetriinfer.sched.lengths import blocks_for

STEP_POLICIES = ("chunked", "whole", "mixed")


@dataclass(frozen=True)
class StepShape:
    """What one instance may put in a step."""

    policy: str
    token_budget: int  # prompt tokens (chunked, whole) or decodes + prompt tokens (mixed)
    max_num_seqs: int
    block_size: int
    pad: bool = False  # chunked only: pad the last chunk up to `token_budget`

    def __post_init__(self) -> None:
        if self.policy not in STEP_POLICIES:
            raise ValueError(f"step policy must be one of {STEP_POLICIES}, got {self.policy!r}")
        if self.token_budget < 1 or self.max_num_seqs < 1 or self.block_size < 1:
            raise ValueError("token_budget, max_num_seqs and block_size must be >= 1")


@dataclass(frozen=True)
class PromptPlan:
    """`chunk`: the prompt pieces of the step (maybe none) and its size with padding; `decode`:
    whether the running batch decodes in this step too."""

    chunk: Chunk
    decode: bool


def blocks_to_grow(piece: ChunkPiece, block_size: int) -> int:
    """KV blocks a prompt piece adds to what its request already holds."""
    return blocks_for(piece.end, block_size) - blocks_for(piece.start, block_size)


def plan_prompts(
    shape: StepShape,
    prompts: Iterable[PendingPrefill],
    *,
    num_running: int,
    free_blocks: int,
    admit_new: bool = True,
) -> PromptPlan:
    """The prompt part of the next step.

    `num_running`: requests decoding on the instance (for `mixed`, those decoding in this step);
    `free_blocks`: KV blocks the prompts may take (for `mixed`, after the decodes' growth);
    `admit_new=False` starts no prompt that has not started (a step that preempted, as in vLLM,
    so the preempted cannot bounce straight back in).
    """
    prompts = list(prompts)
    slots = shape.max_num_seqs - num_running - sum(1 for p in prompts if p.num_prefilled > 0)
    admissible = []
    for prompt in prompts:
        if prompt.num_prefilled == 0:
            if slots <= 0 or not admit_new:
                break
            slots -= 1
        admissible.append(prompt)
    if shape.policy == "mixed":
        budget = shape.token_budget - min(num_running, shape.max_num_seqs)
        pieces = _fitting(_pieces(admissible, budget), shape.block_size, free_blocks) if budget > 0 else ()
        return PromptPlan(Chunk(pieces, sum(p.length for p in pieces)), decode=num_running > 0)
    if shape.policy == "whole":
        pieces = _whole_prompts(admissible, shape.token_budget, shape.block_size, free_blocks)
        size = sum(p.length for p in pieces)
    else:
        pieces = _fitting(_pieces(admissible, shape.token_budget), shape.block_size, free_blocks)
        size = shape.token_budget if shape.pad and pieces else sum(p.length for p in pieces)
    return PromptPlan(Chunk(pieces, size), decode=not pieces and num_running > 0)


def _pieces(prompts: list[PendingPrefill], budget: int) -> tuple[ChunkPiece, ...]:
    return next_chunk(prompts, budget, pad=False).pieces


def _fitting(pieces: Iterable[ChunkPiece], block_size: int, free_blocks: int) -> tuple[ChunkPiece, ...]:
    """The leading pieces whose KV growth fits in `free_blocks`, in order."""
    kept = []
    for piece in pieces:
        need = blocks_to_grow(piece, block_size)
        if need > free_blocks:
            break
        free_blocks -= need
        kept.append(piece)
    return tuple(kept)


def _whole_prompts(prompts: list[PendingPrefill], budget: int, block_size: int, free_blocks: int) -> tuple[ChunkPiece, ...]:
    pieces: list[ChunkPiece] = []
    used = 0
    for prompt in prompts:
        piece = ChunkPiece(prompt.request_id, prompt.num_prefilled, prompt.prompt_len - prompt.num_prefilled)
        if piece.length <= 0:
            continue
        need = blocks_to_grow(piece, block_size)
        if (pieces and used + piece.length > budget) or need > free_blocks:
            break
        pieces.append(piece)
        used += piece.length
        free_blocks -= need
    return tuple(pieces)
