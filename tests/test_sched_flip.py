"""Flip policy: trigger, pressure, hysteresis, minimum counts."""


from tetriinfer.config import FlipConfig
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


def test_no_flip_that_would_push_the_rest_of_its_role_into_pressure():
    policy = FlipPolicy(FlipConfig(enabled=True, idle_s=0.0))
    # Prefill mean 0.515 is below pressure, but 0.05 + 0.98 on one instance would be 1.03.
    assert policy.decide(snapshot(0.0, [0.05, 0.98], [0.95])) == []
    assert len(policy.decide(snapshot(1.0, [0.05, 0.90], [0.95]))) == 1
