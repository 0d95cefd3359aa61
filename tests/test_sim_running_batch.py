"""RunningBatch's O(1) bookkeeping matches a per-request, per-token reference exactly."""

import random

from tetriinfer.sched.lengths import blocks_for
from tetriinfer.sim.request import SimRequest
from tetriinfer.sim.running_batch import RunningBatch


def test_blocks_context_and_finishes_match_a_per_token_reference():
    rng = random.Random(0)
    bs = 16
    batch = RunningBatch(capacity_blocks=10**9, block_size=bs)
    reference: dict[int, list[int]] = {}  # id -> [context, decode_left]
    next_id = 0
    for _ in range(400):
        for _ in range(rng.choice((0, 0, 1, 2))):
            req = SimRequest(next_id, 0.0, rng.randint(1, 100), rng.randint(2, 60))
            release_after = rng.choice((None, None, rng.randint(1, 12)))
            batch.admit(req, reserve_blocks=3, predicted_decode_left=rng.randint(0, 50), release_after=release_after)
            reference[next_id] = [req.kv_len, req.decode_left, release_after]
            next_id += 1
        if reference and rng.random() < 0.05:
            req = batch.preempt_latest()
            ctx, left, _ = reference.pop(req.request_id)
            assert (req.kv_len, req.decode_left) == (ctx, left)
        expected_growth = sum(1 for ctx, *_ in reference.values() if ctx % bs == 0)
        assert batch.blocks_needed_next_step() == expected_growth
        finished, released = batch.advance()
        for state in reference.values():
            state[0] += 1
            state[1] -= 1
            if state[2] is not None:
                state[2] -= 1
        done = {i for i, (_, left, _) in reference.items() if left == 0}
        assert {r.request_id for r in finished} == done
        for i in done:
            del reference[i]
        # A request due for release that finished in the same step is finished, not released.
        due = {i for i, (_, _, until) in reference.items() if until is not None and until <= 0}
        assert {r.request_id for r in released} == due
        for req in released:
            ctx, left, _ = reference.pop(req.request_id)
            assert (req.kv_len, req.decode_left) == (ctx, left)
        assert batch.num_running == len(reference)
        assert batch.total_context == sum(ctx for ctx, *_ in reference.values())
        assert batch.used_blocks == sum(blocks_for(ctx, bs) for ctx, *_ in reference.values())
        assert batch.reserved_blocks == 3 * len(reference)


def test_preemption_takes_the_latest_admitted_and_shortest_remaining_is_tracked():
    batch = RunningBatch(capacity_blocks=1000, block_size=16)
    a, b, c = (SimRequest(i, 0.0, 10, 100) for i in range(3))
    batch.admit(a, reserve_blocks=5, predicted_decode_left=50)
    batch.admit(b, reserve_blocks=7, predicted_decode_left=10)
    batch.admit(c, reserve_blocks=9, predicted_decode_left=30)
    assert batch.shortest_remaining_reserve() == 7  # b is predicted to end first
    assert batch.preempt_latest() is c
    assert batch.preempt_latest() is b
    assert batch.shortest_remaining_reserve() == 5
    assert batch.num_running == 1 and batch.reserved_blocks == 5
