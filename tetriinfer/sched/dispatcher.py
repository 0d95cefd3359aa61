"""Dispatcher: which decode instance receives a prefilled request (one per prefill instance).

It reads the cluster monitor's broadcast `DecodeLoad`s (`update`), which may be up to one monitor
interval stale (as in the paper), and adds what it has itself sent since: without that, every
request of one interval would herd onto the instance that looked best at its start. The instances
with room for the request's need come first; when none has room, `pick` returns None and the
caller keeps the request waiting (never dropped).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, replace
from typing import Hashable, Protocol, Sequence

DISPATCH_POLICIES = ("power2", "random", "round_robin", "least_loaded", "oracle")


@dataclass(frozen=True)
class DecodeLoad:
    """One decode instance as the monitor last saw it.

    `room_blocks`: free KV blocks minus blocks reserved for admitted requests' prompt + predicted
    output (DESIGN.md). `num_heavy`/`num_light`: assigned requests by predicted decode class.
    `remaining_decode_tokens`: output tokens still to generate there, by true lengths (only the
    simulator knows them; only the `oracle` policy reads them). `free_slots`: sequences it may
    still take before its assigned requests reach its batch limit (`max_num_seqs`); an instance
    without a free slot has no room either, however much memory it has. `queued_prompt_tokens`,
    `num_running`, `context_tokens`: prompt tokens routed there to prefill in place and not yet
    computed, requests decoding, and their KV tokens (what the adaptive router prices a local
    prefill by).
    """

    instance_id: Hashable
    room_blocks: int
    num_heavy: int = 0
    num_light: int = 0
    remaining_decode_tokens: int = 0
    free_slots: int = 1 << 30
    queued_prompt_tokens: int = 0
    num_running: int = 0
    context_tokens: int = 0

    @property
    def heavy_ratio(self) -> float:
        return self.num_heavy / (self.num_light + 1)


class Placeable(Protocol):
    """What the dispatcher reads of a prefilled request."""

    need_blocks: int  # KV blocks for prompt + predicted output (the bucket's lower bound)
    heavy: bool  # predicted heavy decode
    decode_left: int  # true output tokens to go (read by the oracle policy only)


class Dispatcher:
    def __init__(self, policy: str = "power2", rng: random.Random | None = None) -> None:
        if policy not in DISPATCH_POLICIES:
            raise ValueError(f"policy must be one of {DISPATCH_POLICIES}, got {policy!r}")
        self.policy = policy
        self.rng = rng if rng is not None else random.Random(0)
        self._next_round_robin = 0
        self._loads: list[DecodeLoad] = []

    @property
    def loads(self) -> tuple[DecodeLoad, ...]:
        """The current view: the last snapshot plus what this dispatcher sent since."""
        return tuple(self._loads)

    def update(self, loads: Sequence[DecodeLoad]) -> None:
        """Take a new monitor snapshot; instances absent from it are no longer eligible."""
        self._loads = list(loads)

    def pick(self, need_blocks: int, heavy: bool = False, decode_tokens: int = 0) -> Hashable | None:
        """The decode instance for a request needing `need_blocks` (predicted `heavy` or light,
        `decode_tokens` true output tokens to go), or None when none has room."""
        chosen = self._choose(need_blocks, self._loads)
        if chosen is not None:
            load = self._loads[chosen]
            self._loads[chosen] = replace(
                load,
                room_blocks=load.room_blocks - need_blocks,
                num_heavy=load.num_heavy + heavy,
                num_light=load.num_light + (not heavy),
                remaining_decode_tokens=load.remaining_decode_tokens + decode_tokens,
                free_slots=load.free_slots - 1,
            )
            return load.instance_id
        return None

    def _choose(self, need_blocks: int, loads: Sequence[DecodeLoad]) -> int | None:
        """Index into `loads` of the policy's choice."""
        with_room = [i for i, load in enumerate(loads) if load.room_blocks >= need_blocks and load.free_slots > 0]
        if not with_room:
            return None
        if self.policy == "power2":
            if len(with_room) == 1:
                return with_room[0]
            pair = self.rng.sample(with_room, 2)
            # Lower heavy:light ratio wins (mixing heavy and light decodes); then more room.
            return min(pair, key=lambda i: (loads[i].heavy_ratio, -loads[i].room_blocks))
        if self.policy == "random":
            return self.rng.choice(with_room)
        if self.policy == "round_robin":
            # Cycle over all instances in order, skipping those without room.
            for offset in range(len(loads)):
                i = (self._next_round_robin + offset) % len(loads)
                if loads[i].room_blocks >= need_blocks and loads[i].free_slots > 0:
                    self._next_round_robin = (i + 1) % len(loads)
                    return i
        if self.policy == "least_loaded":
            return max(with_room, key=lambda i: loads[i].room_blocks)
        # oracle: true remaining decode work, the quantity predictions approximate.
        return min(with_room, key=lambda i: loads[i].remaining_decode_tokens)

    def place_waiting(self, waiting: deque, scan: int) -> list[tuple[Placeable, Hashable]]:
        """Place requests from the head of `waiting`, oldest first, looking at most `scan` deep, so
        one large request without room does not block the smaller ones behind it. Placed requests
        leave `waiting`; the rest keep their order. Returns (request, decode instance) pairs.
        The simulator and the real cluster (`cluster.handoff`) pass `PolicyConfig.sort_window` as
        `scan`: the prefill queue's sort window doubles as this depth (CLI `--sort-window`)."""
        placed, kept = [], []
        for _ in range(min(len(waiting), scan)):
            req = waiting.popleft()
            target = self.pick(req.need_blocks, req.heavy, req.decode_left)
            if target is None:
                kept.append(req)
            else:
                placed.append((req, target))
        waiting.extendleft(reversed(kept))
        return placed
