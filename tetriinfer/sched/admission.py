"""Decode admission: may a waiting request join a decode instance's running batch now?

- greedy (vLLM's): its current KV fits in the free blocks.
- reserve_static: also every running request's reservation (prompt + predicted output, the bucket's
  upper bound) plus the newcomer's fits in the instance's capacity.
- reserve_dynamic: as reserve_static, but the running request with the shortest predicted
  remaining decode gives its reservation back first (it will finish before the newcomer grows).

All policies preempt by recompute (the instance's job) when the running batch outgrows memory anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

ADMISSION_POLICIES = ("greedy", "reserve_static", "reserve_dynamic")


@dataclass(frozen=True)
class AdmissionView:
    """The decode instance's memory, in KV blocks."""

    capacity_blocks: int
    free_blocks: int
    reserved_blocks: int  # sum of running requests' reservations
    shortest_remaining_reserved_blocks: int  # reservation of the running request predicted to end first
    num_running: int
    max_num_seqs: int


def admits(policy: str, view: AdmissionView, need_now_blocks: int, reserve_blocks: int) -> bool:
    """`need_now_blocks`: the request's KV today; `reserve_blocks`: prompt + predicted output."""
    if policy not in ADMISSION_POLICIES:
        raise ValueError(f"policy must be one of {ADMISSION_POLICIES}, got {policy!r}")
    if view.num_running >= view.max_num_seqs or need_now_blocks > view.free_blocks:
        return False
    if policy == "greedy":
        return True
    reserved = view.reserved_blocks
    if policy == "reserve_dynamic":
        reserved -= view.shortest_remaining_reserved_blocks
    return reserved + reserve_blocks <= view.capacity_blocks
