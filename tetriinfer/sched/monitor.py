"""Cluster monitor: collects instance loads every `interval_s` and broadcasts the snapshot.

Between two collections everyone (global scheduler, dispatchers, flip policy) reads the same,
possibly stale, snapshot, as in the paper's 100 ms polling. The caller (the simulator, the real
cluster's controller) builds each `ClusterSnapshot` from its instances and hands it on itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

from tetriinfer.sched.dispatcher import DecodeLoad

PREFILL = "prefill"
DECODE = "decode"
COLOCATED = "colocated"  # the baselines' instances, prefill and decode in one


def decode_room_blocks(capacity_blocks: int, held_blocks: int, assigned_need_blocks: int) -> int:
    """KV blocks a decode instance can still promise: its capacity less the larger of what it holds
    and what its assigned requests need now."""
    return capacity_blocks - max(held_blocks, assigned_need_blocks)


def decode_load_fraction(held_blocks: int, capacity_blocks: int, num_assigned: int, max_num_seqs: int) -> float:
    """The tighter of a decode instance's two limits: KV blocks held, sequence slots assigned."""
    return max(held_blocks / capacity_blocks, num_assigned / max_num_seqs)


def prefill_load_fraction(queued_tokens: int, chunk_size: int, pressure_chunks: float) -> float:
    """Queued prompt tokens over the pressure level of `pressure_chunks` chunks."""
    return queued_tokens / (pressure_chunks * chunk_size)


@dataclass(frozen=True)
class InstanceStatus:
    """`load_fraction`: prefill: queued prompt tokens over the pressure level; decode: the larger of
    KV blocks in use over capacity and assigned requests over `max_num_seqs`.
    `draining`: ordered to flip, takes no new work."""

    instance_id: Hashable
    role: str
    load_fraction: float
    draining: bool = False


@dataclass(frozen=True)
class ClusterSnapshot:
    time_s: float
    instances: tuple[InstanceStatus, ...]
    prefill_loads: dict  # instance id -> queued prompt tokens not yet prefilled (not draining)
    decode_loads: tuple[DecodeLoad, ...]  # non-draining decode instances only
    dispatch_waiting: int = 0  # prefilled requests that found no decode instance with room


class ClusterMonitor:
    """When the next collection is due."""

    def __init__(self, interval_s: float = 0.1) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s

    def next_collection_s(self, now: float) -> float:
        return now + self.interval_s
