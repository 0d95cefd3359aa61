"""The step planner (sched.step_planner): its defining cases, and the same plans step by step from
the real engine and from the simulator, since both call it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tetriinfer import SamplingParams
from tetriinfer.config import CacheConfig, EngineConfig, EngineSchedulerConfig
from tetriinfer.engine.engine import LLMEngine
from tetriinfer.sched.prefill_queue import PrefillQueue
from tetriinfer.sched.step_planner import StepShape, plan_prompts
from tetriinfer.sim.instances import BatchInstance
from tetriinfer.sim.request import SimRequest


@dataclass
class Req:
    request_id: int
    prompt_len: int
    num_prefilled: int = 0


def pieces(plan):
    return [(p.request_id, p.start, p.length) for p in plan.chunk.pieces]


ROOMY = 10**6


def test_whole_prompts_fill_the_budget_and_an_over_budget_prompt_runs_alone():
    shape = StepShape("whole", 1000, 8, 16)
    plan = plan_prompts(shape, [Req(0, 400), Req(1, 500), Req(2, 300)], num_running=2, free_blocks=ROOMY)
    assert pieces(plan) == [(0, 0, 400), (1, 0, 500)] and not plan.decode
    alone = plan_prompts(StepShape("whole", 100, 8, 16), [Req(0, 300), Req(1, 10)], num_running=0, free_blocks=ROOMY)
    assert pieces(alone) == [(0, 0, 300)]
    # Out of KV memory for the next prompt: the running batch decodes instead.
    assert plan_prompts(shape, [Req(0, 400)], num_running=4, free_blocks=5).decode


def test_the_issue_example_packs_chunks_in_order_across_steps():
    # Prompts of 1,500, 1,500 and 3,000 tokens under a 2,048-token budget (chunked, unpadded).
    shape = StepShape("chunked", 2048, 8, 16)
    reqs = [Req("a", 1500), Req("b", 1500), Req("c", 3000)]
    steps = []
    while any(r.num_prefilled < r.prompt_len for r in reqs):
        plan = plan_prompts(shape, [r for r in reqs if r.num_prefilled < r.prompt_len], num_running=0,
                            free_blocks=ROOMY)
        steps.append(pieces(plan))
        for rid, start, length in pieces(plan):
            next(r for r in reqs if r.request_id == rid).num_prefilled = start + length
    assert steps == [[("a", 0, 1500), ("b", 0, 548)], [("b", 548, 952), ("c", 0, 1096)], [("c", 1096, 1904)]]


def test_mixed_steps_decode_everything_and_fill_the_rest_of_the_budget():
    plan = plan_prompts(StepShape("mixed", 512, 64, 16), [Req(0, 1000)], num_running=12, free_blocks=ROOMY)
    assert plan.decode and pieces(plan) == [(0, 0, 500)] and plan.chunk.padding == 0
    resumed = plan_prompts(StepShape("mixed", 512, 64, 16), [Req(0, 1000, 500)], num_running=12, free_blocks=ROOMY)
    assert pieces(resumed) == [(0, 500, 500)]


def test_padding_only_where_asked_and_a_piece_stops_where_its_blocks_run_out():
    padded = plan_prompts(StepShape("chunked", 64, 8, 16, pad=True), [Req(0, 40)], num_running=0, free_blocks=ROOMY)
    assert padded.chunk.size == 64 and padded.chunk.padding == 24
    # 3 free blocks of 16: the first prompt (2 blocks) fits, the second (2 more) does not; FCFS stops.
    tight = plan_prompts(StepShape("chunked", 64, 8, 16), [Req(0, 20), Req(1, 30), Req(2, 5)], num_running=0,
                         free_blocks=3)
    assert pieces(tight) == [(0, 0, 20)]
    # A started prompt already holds the blocks of what it computed: only its growth counts.
    started = plan_prompts(StepShape("chunked", 64, 8, 16), [Req(0, 40, 16)], num_running=0, free_blocks=2)
    assert pieces(started) == [(0, 16, 24)]
    assert not plan_prompts(StepShape("chunked", 64, 8, 16), [Req(0, 40, 16)], num_running=0, free_blocks=1).chunk.pieces


def test_slots_bound_new_prompts_and_a_step_that_preempted_starts_none():
    shape = StepShape("mixed", 512, 4, 16)
    plan = plan_prompts(shape, [Req(0, 10, 5), Req(1, 10), Req(2, 10)], num_running=2, free_blocks=ROOMY)
    assert [p[0] for p in pieces(plan)] == [0, 1]  # 2 running + 1 started + 1 new = 4 slots
    for policy in ("whole", "mixed", "chunked"):
        preempted = plan_prompts(StepShape(policy, 512, 64, 16), [Req(0, 100)], num_running=3, free_blocks=ROOMY,
                                 admit_new=False)
        assert not preempted.chunk.pieces and preempted.decode


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError):
        StepShape("fifo", 512, 8, 16)
    with pytest.raises(ValueError):
        StepShape("mixed", 0, 8, 16)


# ---- one planner, two worlds ------------------------------------------------------------------------

class NoCost:
    def step_time(self, *args):
        return 1.0


def engine_plans(policy, budget, prompts, outputs, num_blocks, block_size=8, pad=False, caching=False):
    sched = EngineSchedulerConfig(chunk_size=budget, max_num_seqs=8, step_policy=policy, pad_chunks=pad,
                                  async_scheduling=False)
    cache = CacheConfig(block_size, num_blocks, enable_prefix_caching=caching)  # the simulator caches nothing
    engine = LLMEngine(EngineConfig(model="tiny", cache=cache, scheduler=sched))
    for i, (n, m) in enumerate(zip(prompts, outputs)):
        engine.add_request(str(i), prompt_token_ids=[1 + (i + j) % 50 for j in range(n)],
                           sampling=SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))
    plans, schedule = [], engine.scheduler.schedule

    def recording():
        plan = schedule()
        plans.append(([(int(p.request.request_id), p.start, p.length) for p in plan.prefill], len(plan.decode),
                      plan.num_padding))
        return plan

    engine.scheduler.schedule = recording
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_free_blocks == num_blocks
    return plans, engine.scheduler.num_preemptions


def sim_plans(policy, budget, prompts, outputs, num_blocks, block_size=8, pad=False):
    inst = BatchInstance(0, StepShape(policy, budget, 8, block_size, pad), PrefillQueue("fcfs"), num_blocks, NoCost())
    for i, (n, m) in enumerate(zip(prompts, outputs)):
        inst.queue.add(SimRequest(i, 0.0, n, m))
    plans, finished = [], 0
    while finished < len(prompts):
        assert inst.start_step(0.0) is not None
        plan = inst._plan
        decodes = inst.batch.num_running if plan.decode else 0
        plans.append(([(p.request_id, p.start, p.length) for p in plan.chunk.pieces], decodes, plan.chunk.padding))
        prefilled, done = inst.finish_step(0.0)
        finished += len(done)
        for req in prefilled:
            if req.decode_left <= 0:
                finished += 1
            else:
                inst.start_decoding(req)
    assert inst.free_blocks == num_blocks
    return plans, inst.num_preemptions


CASES = {
    "budget packing (mixed)": ("mixed", 48, [30, 30, 60], [5, 9, 4], 64),
    "whole prompts (vllm)": ("whole", 64, [30, 30, 60, 10], [6, 3, 5, 2], 64),
    "padded chunks": ("chunked", 32, [20, 45, 7], [3, 4, 2], 64, 8, True),
    "partial prompts under tight memory (mixed)": ("mixed", 40, [50, 35, 20], [12, 12, 12], 16),
    "preemption by recompute (mixed)": ("mixed", 64, [30] * 5, [40] * 5, 24),
    "preemption by recompute (whole)": ("whole", 64, [30] * 5, [40] * 5, 24),
}


# With prefix caching on, prompts sharing no prefix plan the same, unless a request is recomputed
# (preempted, or its partial prefill given up): it then finds its own blocks cached.
RECOMPUTED = {"partial prompts under tight memory (mixed)", "preemption by recompute (mixed)",
              "preemption by recompute (whole)"}


@pytest.mark.parametrize("case,caching", [(case, False) for case in CASES]
                         + [(case, True) for case in CASES if case not in RECOMPUTED])
def test_the_engine_and_the_simulator_make_identical_plans(case, caching):
    policy, budget, prompts, outputs, num_blocks, *rest = CASES[case]
    block_size = rest[0] if rest else 8
    pad = rest[1] if len(rest) > 1 else False
    real, real_preemptions = engine_plans(policy, budget, prompts, outputs, num_blocks, block_size, pad, caching)
    simulated, sim_preemptions = sim_plans(policy, budget, prompts, outputs, num_blocks, block_size, pad)
    assert real == simulated
    assert real_preemptions == sim_preemptions
    if "preemption" in case:
        assert real_preemptions > 0  # the case really preempts
