"""The step cost learnt from measured steps (sched.step_cost): the fit recovers a linear cost from
the steps of several instances, each seeing only some kinds of step, and stays zero until fitted."""

import random

import pytest

from tetriinfer.sched.step_cost import LinearStepCost, StepStats


def true_cost(p, pc, n, dc):
    return 0.002 + 2e-5 * p + 1e-9 * pc + 5e-5 * n + 1e-8 * dc


def observed(kind, steps=300, seed=0):
    rng, stats = random.Random(seed), StepStats()
    for _ in range(steps):
        if kind == "prefill":
            p = rng.randint(1, 2048)
            args = (p, rng.randint(0, 4000) * p // 10, 0, 0)
        else:
            n = rng.randint(1, 256)
            args = (0, 0, n, n * rng.randint(100, 3000))
        stats.observe(true_cost(*args) * (1 + rng.gauss(0, 0.02)), *args)
    return stats


def test_the_fit_over_a_prefill_and_a_decode_instance_recovers_mixed_steps():
    cost = LinearStepCost.fit([observed("prefill"), observed("decode", seed=1)])
    assert cost.fitted
    for args in [(512, 0, 0, 0), (0, 0, 64, 64_000), (256, 1000, 32, 30_000)]:
        assert cost.step_time(*args) == pytest.approx(true_cost(*args), rel=0.03)


def test_stats_survive_the_wire_and_too_few_steps_fit_nothing():
    stats = observed("decode", steps=10)
    assert StepStats.from_list(stats.to_list()) == stats
    assert not LinearStepCost.fit([stats]).fitted  # 10 < min_steps
    assert LinearStepCost().step_time(2048, 0, 256, 10**6) == 0.0
    with pytest.raises(ValueError):
        StepStats.from_list([1.0, 2.0])


def test_old_steps_fade_so_the_fit_follows_the_present():
    stats = StepStats(decay=0.98)  # a window of about 50 steps
    for _ in range(200):
        stats.observe(0.010, 512, 0, 0, 0)
    for _ in range(200):
        stats.observe(0.020, 512, 0, 0, 0)  # the hardware got slower (e.g. a co-tenant)
    assert LinearStepCost.fit([stats]).step_time(512, 0, 0, 0) == pytest.approx(0.020, rel=0.01)
