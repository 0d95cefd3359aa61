"""Dispatcher (power of two and its alternatives), decode admission and the global scheduler."""

import random
from collections import deque
from dataclasses import dataclass

import pytest

from tetriinfer.sched.admission import AdmissionView, admits
from tetriinfer.sched.dispatcher import DecodeLoad, Dispatcher
from tetriinfer.sched.global_scheduler import GlobalScheduler


@pytest.mark.parametrize("policy", ["power2", "random", "round_robin", "least_loaded", "oracle"])
def test_never_picks_a_roomless_instance_while_one_has_room(policy):
    rng = random.Random(1)
    dispatcher = Dispatcher(policy, random.Random(2))
    for _ in range(300):
        loads = [DecodeLoad(i, rng.randint(0, 100), rng.randint(0, 5), rng.randint(0, 5), rng.randint(0, 999)) for i in range(6)]
        need = rng.randint(1, 100)
        dispatcher.update(loads)
        picked = dispatcher.pick(need)
        with_room = {l.instance_id for l in loads if l.room_blocks >= need}
        if with_room:
            assert picked in with_room
        else:
            assert picked is None  # the caller keeps the request waiting


@pytest.mark.parametrize("policy", ["power2", "random", "round_robin", "least_loaded", "oracle"])
def test_an_all_full_cluster_returns_none_instead_of_dropping(policy):
    dispatcher = Dispatcher(policy)
    assert dispatcher.pick(4) is None  # no snapshot yet
    dispatcher.update([DecodeLoad(i, room_blocks=3) for i in range(4)])
    assert dispatcher.pick(4) is None


def test_own_sends_count_until_the_next_snapshot():
    dispatcher = Dispatcher("least_loaded")
    dispatcher.update([DecodeLoad(0, room_blocks=100), DecodeLoad(1, room_blocks=60)])
    # Without counting its own sends, every pick would herd onto instance 0.
    assert [dispatcher.pick(30) for _ in range(6)] == [0, 0, 1, 0, 1, None]
    dispatcher.update([DecodeLoad(0, room_blocks=100), DecodeLoad(1, room_blocks=60)])
    assert dispatcher.pick(30) == 0


def test_power2_prefers_the_lower_heavy_to_light_ratio():
    loads = [DecodeLoad(0, 100, num_heavy=8, num_light=1), DecodeLoad(1, 100, num_heavy=1, num_light=8)]
    dispatcher = Dispatcher("power2", random.Random(0))
    dispatcher.update(loads)
    assert dispatcher.pick(5, heavy=True) == 1
    # Heavy requests raise instance 1's ratio (k + 2) / 9 until it ties instance 0's 8 / 2;
    # then the one with more room wins.
    picks = [dispatcher.pick(1, heavy=True) for _ in range(40)]
    assert picks[:34] == [1] * 34 and picks[34] == 0


def test_power2_samples_only_two_so_the_worst_can_still_lose_to_nothing_better():
    # Three instances; the best (ratio 0) is not always among the two sampled.
    loads = [DecodeLoad(0, 50, 0, 5), DecodeLoad(1, 50, 3, 1), DecodeLoad(2, 50, 4, 1)]
    dispatcher = Dispatcher("power2", random.Random(3))
    picks = []
    for _ in range(300):
        dispatcher.update(loads)
        picks.append(dispatcher.pick(1))
    assert 2 not in picks  # the worst never wins a pair
    assert picks.count(0) < 300 and picks.count(1) > 0


def test_power2_is_deterministic_under_a_seed():
    loads = [DecodeLoad(i, 50, i % 3, 2) for i in range(8)]
    first = Dispatcher("power2", random.Random(7))
    second = Dispatcher("power2", random.Random(7))
    first.update(loads)
    second.update(loads)
    picks = [first.pick(1) for _ in range(50)]
    assert picks == [second.pick(1) for _ in range(50)]
    assert len(set(picks)) > 1  # it does randomise


def test_round_robin_cycles_and_skips_full_instances():
    dispatcher = Dispatcher("round_robin")
    dispatcher.update([DecodeLoad(0, 10), DecodeLoad(1, 0), DecodeLoad(2, 10)])
    assert [dispatcher.pick(5) for _ in range(4)] == [0, 2, 0, 2]


def test_least_loaded_takes_most_room_and_oracle_least_true_work():
    loads = [DecodeLoad(0, 10, remaining_decode_tokens=5), DecodeLoad(1, 90, remaining_decode_tokens=900)]
    least, oracle = Dispatcher("least_loaded"), Dispatcher("oracle")
    least.update(loads)
    oracle.update(loads)
    assert least.pick(5) == 1
    assert oracle.pick(5, decode_tokens=1000) == 0 and oracle.pick(5) == 1  # its own send counted


def view(free, reserved, shortest, capacity=100, running=3, max_seqs=256):
    return AdmissionView(capacity, free, reserved, shortest, running, max_seqs)


def test_reserve_dynamic_admits_exactly_when_the_shortest_job_frees_enough():
    # Running reservations 90 of 100; the shortest job's 30 come back before the newcomer grows.
    assert admits("reserve_dynamic", view(free=50, reserved=90, shortest=30), 10, 40)  # 90-30+40 = 100
    assert not admits("reserve_dynamic", view(free=50, reserved=90, shortest=30), 10, 41)  # 101
    # reserve_static counts the shortest job's reservation too, greedy none of them.
    assert not admits("reserve_static", view(free=50, reserved=90, shortest=30), 10, 40)
    assert admits("reserve_static", view(free=50, reserved=60, shortest=30), 10, 40)
    assert admits("greedy", view(free=50, reserved=90, shortest=30), 10, 1000)


@pytest.mark.parametrize("policy", ["greedy", "reserve_static", "reserve_dynamic"])
def test_every_policy_needs_the_current_kv_to_fit_and_a_sequence_slot(policy):
    assert not admits(policy, view(free=9, reserved=0, shortest=0), 10, 10)
    assert not admits(policy, view(free=50, reserved=0, shortest=0, running=4, max_seqs=4), 10, 10)
    assert admits(policy, view(free=50, reserved=0, shortest=0), 10, 10)


def test_global_scheduler_picks_least_loaded_counting_its_own_sends():
    scheduler = GlobalScheduler([0, 1, 2])
    scheduler.update({0: 500, 1: 100, 2: 300})
    assert scheduler.pick(250) == 1  # 1 now at 350
    assert scheduler.pick(10) == 2  # 300 < 350
    assert scheduler.pick(10) == 2  # 310 < 350
    scheduler.update({0: 0, 1: 100})  # 2 left (e.g. draining to flip)
    assert [scheduler.pick(60) for _ in range(3)] == [0, 0, 1]


def test_global_scheduler_breaks_equal_queues_by_the_fewest_running_requests():
    scheduler = GlobalScheduler([0, 1, 2])
    scheduler.update({0: 0, 1: 0, 2: 0}, running={0: 5, 1: 2, 2: 3})
    assert scheduler.least_loaded() == (1, 0)
    # Prompts that each prefill before the next snapshot still spread: every send counts as running.
    scheduler.update({0: 0, 1: 0, 2: 0}, running={0: 3, 1: 3, 2: 3})
    sent = [scheduler.pick(0) for _ in range(6)]
    assert sorted(sent) == [0, 0, 1, 1, 2, 2]
    # Queued tokens still come first; an instance missing from `running` counts 0.
    scheduler.update({0: 10, 1: 0}, running={1: 50})
    assert scheduler.pick(1) == 1


def test_global_scheduler_with_no_instance_raises():
    scheduler = GlobalScheduler([])
    with pytest.raises(RuntimeError):
        scheduler.pick(1)


@pytest.mark.parametrize("policy", ["power2", "random", "round_robin", "least_loaded", "oracle"])
def test_an_instance_without_a_free_sequence_slot_has_no_room(policy):
    dispatcher = Dispatcher(policy, random.Random(0))
    dispatcher.update([DecodeLoad(0, 1000, free_slots=0), DecodeLoad(1, 10, free_slots=2)])
    assert [dispatcher.pick(1) for _ in range(3)] == [1, 1, None]


def test_place_waiting_lets_small_requests_pass_a_large_one_without_room_within_the_scan():
    @dataclass
    class Waiting:
        name: str
        need_blocks: int
        heavy: bool = False
        decode_left: int = 0

    dispatcher = Dispatcher("least_loaded")
    dispatcher.update([DecodeLoad(0, room_blocks=50)])
    waiting = deque([Waiting("big", 80), Waiting("a", 20), Waiting("b", 20), Waiting("c", 20), Waiting("d", 5)])
    placed = dispatcher.place_waiting(waiting, scan=4)
    assert [(r.name, target) for r, target in placed] == [("a", 0), ("b", 0)]
    # "c" found no room; "d" lies beyond the scan. Order is kept.
    assert [r.name for r in waiting] == ["big", "c", "d"]
