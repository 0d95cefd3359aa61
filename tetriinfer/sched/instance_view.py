"""What the policies read of one serving instance, built from plain counts (no engine, no torch).

A serving instance (`cluster.instance`) reads its engine's counts (`engine.serving`) and its own
hand-off books, and passes them here: the admission view of a decode instance, the decode load it
reports to the monitor, the load a prefill instance would have as a decode site (the adaptive
`keep_on_prefill`), and the placement of a prefilled request from its length prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Mapping, Protocol

from tetriinfer.sched.admission import AdmissionView
from tetriinfer.sched.dispatcher import DecodeLoad
from tetriinfer.sched.lengths import is_heavy_decode, placement_blocks
from tetriinfer.sched.monitor import decode_room_blocks

UNKNOWN_REMAINING_TOKENS = 1 << 30  # a running request with no prediction is never the first to end


class BucketPrediction(Protocol):
    """A decode-length prediction: bucket `bucket` covers [lower, upper) output tokens."""

    bucket: int
    lower: int
    upper: int


@dataclass(frozen=True)
class Placement:
    """How a prefilled request is placed: the dispatcher sizes room by `need_blocks` (prompt + the
    prediction's lower bound), admission reserves `reserve_blocks` (prompt + its upper bound)."""

    need_blocks: int
    reserve_blocks: int
    heavy: bool
    predicted_decode_tokens: int  # the upper bound, capped at max_tokens


def placement(prompt_tokens: int, max_tokens: int, prediction: BucketPrediction | None, bucket_size: int,
              heavy_decode_tokens: int, block_size: int, capacity_blocks: int) -> Placement:
    """Without a prediction the request may output anything from 1 to `max_tokens` tokens (light)."""
    lower, upper, heavy = 1, max_tokens, False
    if prediction is not None:
        lower, upper = min(prediction.lower, max_tokens), min(prediction.upper, max_tokens)
        heavy = is_heavy_decode(prediction.bucket, bucket_size, heavy_decode_tokens)
    need, reserve = placement_blocks(prompt_tokens, lower, upper, block_size, capacity_blocks)
    return Placement(need, reserve, heavy, upper)


def admission_view(capacity_blocks: int, free_blocks: int, max_num_seqs: int, running_tokens: Mapping[Hashable, int],
                   num_incoming: int, reserved_blocks: Mapping[Hashable, int],
                   predicted_total_tokens: Mapping[Hashable, int]) -> AdmissionView:
    """A decode instance's admission view. `running_tokens`: tokens of each running request, in
    the engine's order; `num_incoming`: requests admitted whose KV has not landed yet;
    `reserved_blocks`: the reservation of each request holding or receiving KV here;
    `predicted_total_tokens`: prompt + predicted output of each request assigned here."""
    def predicted_remaining(request_id: Hashable) -> int:
        total = predicted_total_tokens.get(request_id)
        return UNKNOWN_REMAINING_TOKENS if total is None else total - running_tokens[request_id]

    # The running request predicted to finish first gives its reservation back first.
    shortest = min(running_tokens, key=predicted_remaining, default=None)
    shortest_blocks = reserved_blocks.get(shortest, 0) if shortest is not None else 0
    return AdmissionView(capacity_blocks, free_blocks, sum(reserved_blocks.values()), shortest_blocks,
                         len(running_tokens) + num_incoming, max_num_seqs)


def decode_load(instance_id: Hashable, *, capacity_blocks: int, used_blocks: int, assigned_need_blocks: int,
                num_heavy: int, num_light: int, max_num_seqs: int, queued_prompt_tokens: int, num_running: int,
                context_tokens: int) -> DecodeLoad:
    """What a decode instance reports to the monitor: the blocks it can still promise
    (`sched.monitor.decode_room_blocks`) and its sequence slots not yet assigned."""
    return DecodeLoad(instance_id, decode_room_blocks(capacity_blocks, used_blocks, assigned_need_blocks),
                      num_heavy, num_light, free_slots=max_num_seqs - num_heavy - num_light,
                      queued_prompt_tokens=queued_prompt_tokens, num_running=num_running,
                      context_tokens=context_tokens)


def prefill_site_load(instance_id: Hashable, *, free_blocks: int, max_num_seqs: int, queued_prompt_tokens: int,
                      num_running: int, context_tokens: int) -> DecodeLoad:
    """A prefill instance seen as a decode site (`sched.router.keep_on_prefill`'s `here`)."""
    return DecodeLoad(instance_id, free_blocks, free_slots=max_num_seqs - num_running,
                      queued_prompt_tokens=queued_prompt_tokens, num_running=num_running,
                      context_tokens=context_tokens)
