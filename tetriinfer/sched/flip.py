"""Flip policy: which instance changes role (prefill <-> decode), decided on each monitor snapshot.

An instance becomes a candidate after it has been underused (load fraction below
`load_threshold`, idle included) for `idle_s` in a row, and is flipped only while the other role
is under pressure (prefill: queued tokens; decode: KV or slot use, or requests waiting for room),
and only if the instances left in its role stay below pressure with its load added. Hysteresis:
an instance that flipped stays put for `cooldown_s`; at most one flip per snapshot; no role drops
below its minimum count. The caller drains the instance and switches it `flip_s` later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable

from tetriinfer.sched.monitor import DECODE, PREFILL, ClusterSnapshot

if TYPE_CHECKING:  # sched imports nothing outside itself at run time: config imports sched
    from tetriinfer.config import FlipConfig


@dataclass(frozen=True)
class FlipOrder:
    instance_id: Hashable
    to_role: str


class FlipPolicy:
    def __init__(self, config: FlipConfig) -> None:
        self.config = config
        self._underused_since: dict[Hashable, float] = {}
        self._last_flip_s: dict[Hashable, float] = {}

    def decide(self, snapshot: ClusterSnapshot) -> list[FlipOrder]:
        cfg, now = self.config, snapshot.time_s
        active = [s for s in snapshot.instances if not s.draining]
        for status in snapshot.instances:
            if status.load_fraction < cfg.load_threshold and not status.draining:
                self._underused_since.setdefault(status.instance_id, now)
            else:
                self._underused_since.pop(status.instance_id, None)
        if not cfg.enabled or any(s.draining for s in snapshot.instances):
            return []  # one flip in flight at a time
        prefill = [s for s in active if s.role == PREFILL]
        decode = [s for s in active if s.role == DECODE]
        prefill_pressure = bool(prefill) and sum(s.load_fraction for s in prefill) / len(prefill) >= 1.0
        decode_pressure = snapshot.dispatch_waiting > 0 or (
            bool(decode) and sum(s.load_fraction for s in decode) / len(decode) >= cfg.decode_pressure
        )
        if decode_pressure and not prefill_pressure and len(prefill) > cfg.min_prefill:
            order = self._candidate(prefill, now, DECODE, limit=1.0)
        elif prefill_pressure and not decode_pressure and len(decode) > cfg.min_decode:
            order = self._candidate(decode, now, PREFILL, limit=cfg.decode_pressure)
        else:
            order = None
        if order is None:
            return []
        self._last_flip_s[order.instance_id] = now
        self._underused_since.pop(order.instance_id, None)
        return [order]

    def _candidate(self, pool, now: float, to_role: str, limit: float) -> FlipOrder | None:
        """The least-loaded ready instance of `pool`, if the rest of the pool can take its load
        without reaching pressure themselves (`limit`): a flip must not just move the pressure."""
        cfg = self.config
        if sum(s.load_fraction for s in pool) / (len(pool) - 1) >= limit:
            return None
        ready = [
            s
            for s in pool
            if s.instance_id in self._underused_since
            and now - self._underused_since[s.instance_id] >= cfg.idle_s
            and now - self._last_flip_s.get(s.instance_id, -float("inf")) >= cfg.cooldown_s
        ]
        if not ready:
            return None
        least = min(ready, key=lambda s: s.load_fraction)
        return FlipOrder(least.instance_id, to_role)
