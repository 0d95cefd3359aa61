"""Flip policy (trigger, pressure, hysteresis, minimum counts) and the colocated baselines' steps."""

from dataclasses import dataclass

from tetriinfer.config import FlipConfig
from tetriinfer.sched.baselines import ColocatedScheduler
from tetriinfer.sched.flip import FlipPolicy
from tetriinfer.sched.monitor import DECODE, PREFILL, ClusterSnapshot, InstanceStatus


def snapshot(t, prefill_fracs, decode_fracs, waiting=0, draining=()):
    statuses = [InstanceStatus(i, PREFILL, f, i in draining) for i, f in enumerate(prefill_fracs)]
    statuses += [InstanceStatus(len(prefill_fracs) + i, DECODE, f, len(prefill_fracs) + i in draining) for i, f in enumerate(decode_fracs)]
    return ClusterSnapshot(t, tuple(statuses), {}, (), waiting)


def test_idle_prefill_flips_to_decode_only_after_idle_s_and_under_decode_pressure():
    policy = FlipPolicy(FlipConfig(enabled=True, idle_s=1.0, cooldown_s=5.0))
    assert policy.decide(snapshot(0.0, [0.0, 0.5], [0.95])) == []  # idle just began
    assert policy.decide(snapshot(0.5, [0.0, 0.5], [0.95])) == []
    orders = policy.decide(snapshot(1.0, [0.0, 0.5], [0.95]))
    assert [(o.instance_id, o.to_role) for o in orders] == [(0, DECODE)]


def test_no_flip_without_pressure_on_the_other_role():
    policy = FlipPolicy(FlipConfig(enabled=True, idle_s=0.0))
    assert policy.decide(snapshot(0.0, [0.0, 0.0], [0.2])) == []
    assert policy.decide(snapshot(5.0, [0.0, 0.0], [0.2])) == []
    # Requests waiting for decode room count as decode pressure.
    assert len(policy.decide(snapshot(6.0, [0.0, 0.0], [0.2], waiting=3))) == 1


def test_a_busy_interval_resets_the_idle_clock():
    policy = FlipPolicy(FlipConfig(enabled=True, idle_s=1.0))
    policy.decide(snapshot(0.0, [0.0, 0.5], [0.95]))
    policy.decide(snapshot(0.6, [0.5, 0.5], [0.95]))  # busy again
    assert policy.decide(snapshot(1.2, [0.0, 0.5], [0.95])) == []
    assert len(policy.decide(snapshot(2.2, [0.0, 0.5], [0.95]))) == 1


def test_minimum_count_per_role_is_kept():
    policy = FlipPolicy(FlipConfig(enabled=True, idle_s=0.0, min_prefill=1))
    # The only prefill instance never leaves, however idle.
    assert policy.decide(snapshot(0.0, [0.0], [0.99, 0.99])) == []
    assert policy.decide(snapshot(9.0, [0.0], [0.99, 0.99])) == []


def test_cooldown_stops_an_instance_flipping_straight_back_and_one_flip_at_a_time():
    policy = FlipPolicy(FlipConfig(enabled=True, idle_s=0.0, cooldown_s=10.0))
    assert len(policy.decide(snapshot(0.0, [0.0, 0.0, 0.5], [0.95]))) == 1
    # While instance 0 drains, nothing else flips.
    assert policy.decide(snapshot(0.1, [0.0, 0.0, 0.5], [0.95], draining=(0,))) == []
    # Instance 0 is now a decode instance (id 0 kept), idle, and prefill is under pressure: cooldown holds it.
    flipped = ClusterSnapshot(
        1.0,
        (InstanceStatus(0, DECODE, 0.0), InstanceStatus(1, PREFILL, 2.0), InstanceStatus(2, PREFILL, 2.0), InstanceStatus(3, DECODE, 0.5)),
        {}, (), 0,
    )
    assert policy.decide(flipped) == []
    later = ClusterSnapshot(11.0, flipped.instances, {}, (), 0)
    assert [o.instance_id for o in policy.decide(later)] == [0]


def test_disabled_flip_never_orders():
    policy = FlipPolicy(FlipConfig(enabled=False, idle_s=0.0))
    assert policy.decide(snapshot(0.0, [0.0, 0.0], [0.99])) == []


@dataclass
class Req:
    request_id: int
    prompt_len: int
    num_prefilled: int = 0


def test_vllm_prefills_whole_prompts_first_within_the_token_budget():
    sched = ColocatedScheduler("vllm", token_budget=1000, max_num_seqs=8, block_size=16)
    for i, n in enumerate([400, 500, 300]):
        sched.add(Req(i, n))
    plan = sched.plan(num_running=2, free_blocks=10**6)
    assert not plan.decode
    assert [(p.request_id, p.start, p.length) for p in plan.chunk.pieces] == [(0, 0, 400), (1, 0, 500)]
    assert [r.request_id for r in sched.commit(plan)] == [0, 1]
    # Out of KV memory for the next prompt: decode the running batch instead.
    assert sched.plan(num_running=4, free_blocks=5).decode


def test_vllm_runs_an_over_budget_prompt_alone():
    sched = ColocatedScheduler("vllm", token_budget=100, max_num_seqs=8, block_size=16)
    sched.add(Req(0, 300))
    sched.add(Req(1, 10))
    plan = sched.plan(0, 10**6)
    assert [p.request_id for p in plan.chunk.pieces] == [0]


def test_sarathi_mixes_all_decodes_with_prompt_chunks_up_to_the_budget():
    sched = ColocatedScheduler("sarathi", token_budget=512, max_num_seqs=64, block_size=16)
    sched.add(Req(0, 1000))
    plan = sched.plan(num_running=12, free_blocks=10**6)
    assert plan.decode and plan.chunk.size == 500 and plan.chunk.padding == 0
    sched.commit(plan)
    plan = sched.plan(num_running=12, free_blocks=10**6)
    assert (plan.chunk.pieces[0].start, plan.chunk.pieces[0].length) == (500, 500)


def test_a_step_that_preempted_admits_no_new_prompt():
    for system in ("vllm", "sarathi"):
        sched = ColocatedScheduler(system, token_budget=512, max_num_seqs=64, block_size=16)
        sched.add(Req(0, 100))
        plan = sched.plan(num_running=3, free_blocks=10**6, admit_new=False)
        assert plan.chunk is None and plan.decode


def test_no_flip_that_would_push_the_rest_of_its_role_into_pressure():
    policy = FlipPolicy(FlipConfig(enabled=True, idle_s=0.0))
    # Prefill mean 0.515 is below pressure, but 0.05 + 0.98 on one instance would be 1.03.
    assert policy.decide(snapshot(0.0, [0.05, 0.98], [0.95])) == []
    assert len(policy.decide(snapshot(1.0, [0.05, 0.90], [0.95]))) == 1
