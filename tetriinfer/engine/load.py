"""What an engine tells the cluster about itself: the load of its last step and of its queues.

Plain data, read through `LLMEngine.last_step_load` and `LLMEngine.load()`, so a serving instance
prices and reports its engine without reaching into the scheduler or the block manager.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepLoad:
    """What a step computed, in the terms of a step cost model (`sched.step_cost`)."""

    prefill_tokens: int  # padding included
    prefill_context: int  # cached tokens the prompt pieces continue from
    decode_seqs: int
    decode_context: int


@dataclass(frozen=True)
class EngineLoad:
    """The engine now: KV blocks, and the requests waiting to prefill and running."""

    num_blocks: int
    free_blocks: int  # allocatable: free, or cached by the prefix cache and held by nobody
    cached_blocks: int  # known to the prefix cache (held or evictable)
    num_waiting: int
    waiting_tokens: int  # tokens still to prefill over the waiting requests
    num_running: int
    running_context: int  # KV tokens of the running requests

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks
