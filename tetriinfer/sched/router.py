"""Adaptive disaggregation: where each new request is prefilled, and who decodes what is left over.

The paper prefills every prompt on a prefill instance and moves its KV to a decode instance. That
pays only while the prefill side has capacity to spare and the split matches the load; otherwise
the GPUs of one role idle while the other queues. So, for each new request, the router prices both
ways from the monitor's snapshot and the step cost model, and takes the cheaper (conditional
disaggregation, as NVIDIA Dynamo does):

- **remote**: wait for the prompt tokens queued on the least-loaded prefill instance, prefill in
  full chunks, move the KV (`kv_seconds_per_token`);
- **local**, on a decode instance with room and a free slot: prefill in the token budget its mixed
  steps leave beside the running decodes. Each such step slows every running decode there, and
  that interference (seconds, summed over the running requests) counts `interference_weight`
  times against the local choice.

Cache-aware (a `PrefixIndex` and the request's prefix keys): each way prices only the prompt
tokens not cached where it would run. Remote takes the prefill instance with the fewest queued +
uncached tokens (`GlobalScheduler.best`); a local prefill prices the tokens the decode instance
does not hold, so one holding a conversation's KV (it decoded the last turn) may serve the next turn
itself. The index is the router's guess: what it routed where, plus what the caller reports with
`observe` (e.g. where a request finished decoding).

Ties go remote (the paper's way). The other way round, a request prefilled on a prefill instance
decodes right there when no decode instance has room for it, or when that instance's steps are
faster than the decode side's (`keep_on_prefill`): the decode side is then the bottleneck, and the
prefill instance's memory bandwidth, idle under compute-bound prefill, takes decode work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Hashable, Mapping, Protocol, Sequence

from tetriinfer.sched.dispatcher import DecodeLoad
from tetriinfer.sched.global_scheduler import GlobalScheduler
from tetriinfer.sched.prefix_index import PrefixIndex, cached_tokens

# How TetriInfer splits work between prefill and decode instances: `adaptive` (the default; this
# module) lets a decode instance prefill a request itself and a prefill instance decode one when
# that is cheaper; `paper` is the paper's fixed split (every prompt on a prefill instance, every
# decode moved).
DISAGG_POLICIES = ("adaptive", "paper")


class StepCost(Protocol):
    """Seconds of one forward pass (`sim.cost.CostModel` and `sched.step_cost.LinearStepCost` fit)."""

    def step_time(self, prefill_tokens: int, prefill_context: int, decode_seqs: int, decode_context: int) -> float: ...


@dataclass(frozen=True)
class Route:
    instance_id: Hashable
    local: bool  # prefilled on the decode instance that then decodes it (no KV moves)


@dataclass(frozen=True)
class RouteCosts:
    """What `price` found, in seconds: the remote TTFT, and the best local TTFT and interference."""

    remote_s: float
    local_s: float = math.inf
    interference_s: float = 0.0
    slower_decode_s: float = 0.0  # its decode there against the fastest decode instance with room


class AdaptiveRouter:
    def __init__(self, cost: StepCost, *, chunk_size: int, kv_seconds_per_token: float = 0.0,
                 interference_weight: float = 1.0, prefix_index: PrefixIndex | None = None,
                 ttft_margin_s: float = math.inf) -> None:
        if chunk_size < 1 or kv_seconds_per_token < 0 or interference_weight < 0 or not ttft_margin_s >= 0:
            raise ValueError("need chunk_size >= 1, and kv_seconds_per_token, interference_weight and "
                             "ttft_margin_s >= 0")
        self.cost = cost
        # Tail-aware (docs/adaptive.md, "Tail-aware routing"): go local whenever that saves more
        # than `ttft_margin_s` of TTFT, whatever it costs the running decodes.
        self.ttft_margin_s = ttft_margin_s
        self.chunk_size = chunk_size
        self.kv_seconds_per_token = kv_seconds_per_token
        self.interference_weight = interference_weight
        self.prefix_index = prefix_index
        self.prefill = GlobalScheduler([], prefix_index)
        self._decode: list[DecodeLoad] = []

    def update(self, prefill_loads: Mapping[Hashable, int], decode_loads: Sequence[DecodeLoad]) -> None:
        """Take a monitor snapshot (queued prompt tokens per prefill instance; decode loads)."""
        self.prefill.update(prefill_loads)
        self._decode = list(decode_loads)

    def route(self, prompt_tokens: int, need_blocks: int, prefix_keys: Sequence[Hashable] = (),
              block_tokens: int = 0, decode_tokens: int = 0) -> Route:
        """Where to prefill a request of `prompt_tokens` needing `need_blocks` to decode (with its
        prefix keys of `block_tokens` each, when cache-aware; `decode_tokens` it is expected to
        generate, 0 if unknown). The view counts the choice until the next snapshot."""
        keys = prefix_keys if self.prefix_index is not None else ()
        local, costs = self._best_local(prompt_tokens, need_blocks, keys, block_tokens, decode_tokens)
        has_prefill = self.prefill.least_loaded() is not None
        if local is not None and (not has_prefill or costs.local_s + self.interference_weight * costs.interference_s
                                  + costs.slower_decode_s < costs.remote_s
                                  or costs.remote_s - costs.local_s > self.ttft_margin_s):
            load = self._decode[local]
            uncached = prompt_tokens - self._cached(load.instance_id, prompt_tokens, keys, block_tokens)
            self._decode[local] = replace(load, room_blocks=load.room_blocks - need_blocks,
                                          free_slots=load.free_slots - 1,
                                          queued_prompt_tokens=load.queued_prompt_tokens + uncached,
                                          num_running=load.num_running + 1,
                                          context_tokens=load.context_tokens + prompt_tokens)
            self.observe(load.instance_id, keys)
            return Route(load.instance_id, local=True)
        return Route(self.prefill.pick(prompt_tokens, keys, block_tokens), local=False)

    def price(self, prompt_tokens: int, need_blocks: int, prefix_keys: Sequence[Hashable] = (),
              block_tokens: int = 0, decode_tokens: int = 0) -> RouteCosts:
        """Both ways' costs, for reports and tests; changes nothing."""
        keys = prefix_keys if self.prefix_index is not None else ()
        _, costs = self._best_local(prompt_tokens, need_blocks, keys, block_tokens, decode_tokens)
        return costs

    def observe(self, instance_id: Hashable, prefix_keys: Sequence[Hashable]) -> None:
        """`instance_id` now holds these prefix blocks (the router's guess learns it)."""
        if self.prefix_index is not None and prefix_keys:
            self.prefix_index.record(instance_id, prefix_keys)

    def _cached(self, instance_id: Hashable, prompt_tokens: int, keys: Sequence[Hashable], block_tokens: int) -> int:
        return cached_tokens(self.prefix_index, instance_id, keys, block_tokens, prompt_tokens)

    def _remote_s(self, prompt_tokens: int, keys: Sequence[Hashable] = (), block_tokens: int = 0) -> float:
        best = self.prefill.best(prompt_tokens, keys, block_tokens)
        if best is None:
            return math.inf
        _, queued, cached = best
        prefill_s = self._prefill_s(queued + prompt_tokens - cached, self.chunk_size, 0, 0)
        return prefill_s + self.kv_seconds_per_token * prompt_tokens

    def _prefill_s(self, tokens: int, budget: int, decode_seqs: int, decode_context: int) -> float:
        """Seconds to prefill `tokens` in steps of `budget` prompt tokens beside `decode_seqs` decodes."""
        full, rest = divmod(tokens, budget)
        seconds = full * self.cost.step_time(budget, 0, decode_seqs, decode_context)
        return seconds + (self.cost.step_time(rest, 0, decode_seqs, decode_context) if rest else 0.0)

    def _best_local(self, prompt_tokens: int, need_blocks: int, keys: Sequence[Hashable] = (),
                    block_tokens: int = 0, decode_tokens: int = 0) -> tuple[int | None, RouteCosts]:
        best, best_score, costs = None, math.inf, RouteCosts(self._remote_s(prompt_tokens, keys, block_tokens))
        with_room = [i for i, load in enumerate(self._decode)
                     if load.room_blocks >= need_blocks and load.free_slots > 0]
        # A remote request decodes where the dispatcher sends it: at best, the fastest decode step.
        step_s = {i: self._decode_step_s(self._decode[i], prompt_tokens) for i in with_room}
        fastest = min(step_s.values(), default=0.0)
        for i in with_room:
            load = self._decode[i]
            uncached = prompt_tokens - self._cached(load.instance_id, prompt_tokens, keys, block_tokens)
            local_s, interference_s = self._local_s(load, uncached)
            slower_decode_s = decode_tokens * (step_s[i] - fastest)
            score = local_s + self.interference_weight * interference_s + slower_decode_s
            if score < best_score:
                best, best_score = i, score
                costs = replace(costs, local_s=local_s, interference_s=interference_s, slower_decode_s=slower_decode_s)
        return best, costs

    def _decode_step_s(self, load: DecodeLoad, prompt_tokens: int) -> float:
        """A decode step there with this request in the batch."""
        return self.cost.step_time(0, 0, load.num_running + 1, load.context_tokens + prompt_tokens)

    def _local_s(self, load: DecodeLoad, prompt_tokens: int) -> tuple[float, float]:
        """(TTFT, interference) of prefilling `prompt_tokens` (the uncached ones) here behind the
        prompts already routed here."""
        budget = self.chunk_size - load.num_running
        if budget <= 0:
            return math.inf, 0.0
        n, context = load.num_running, load.context_tokens
        ttft = self._prefill_s(load.queued_prompt_tokens + prompt_tokens, budget, n, context)
        if not n:
            return ttft, 0.0
        # The decodes' own steps for as long as this prompt's tokens ride with them.
        decode_only = math.ceil(prompt_tokens / budget) * self.cost.step_time(0, 0, n, context)
        return ttft, n * max(self._prefill_s(prompt_tokens, budget, n, context) - decode_only, 0.0)


def keep_on_prefill(cost: StepCost, here: DecodeLoad, there: Sequence[DecodeLoad], need_blocks: int,
                    kv_tokens: int, chunk_size: int) -> bool:
    """Whether a request just prefilled on a prefill instance (`here`, its own load as a decode
    site, the request not counted) decodes there instead of moving to a decode instance (`there`,
    the dispatcher's view). Yes when no decode instance has room for it, or when a decode step
    here, beside the prompts it still has queued, is faster than one on the fastest decode instance
    with room: the decode side is then the bottleneck and this instance's idle memory bandwidth
    takes decode work. Never when it has no room or slot itself."""
    if here.free_slots <= 0 or here.room_blocks < need_blocks:
        return False
    with_room = [d for d in there if d.room_blocks >= need_blocks and d.free_slots > 0]
    if not with_room:
        return True

    def step_s(load: DecodeLoad) -> float:
        prompt = min(load.queued_prompt_tokens, max(chunk_size - load.num_running - 1, 0))
        return cost.step_time(prompt, 0, load.num_running + 1, load.context_tokens + kv_tokens)

    return step_s(here) < min(step_s(d) for d in with_room)
