"""Automatic prefix caching in the engine: the same tokens (and logprobs) with the cache on as off,
fewer prompt tokens computed where prefixes are shared, and no KV block leaked at any step."""

from __future__ import annotations

import argparse

import pytest

from tetriinfer import LLM, SamplingParams
from tetriinfer.config import CacheConfig, EngineConfig, EngineSchedulerConfig
from tetriinfer.engine.engine import LLMEngine
from tetriinfer.entrypoints.generate import add_engine_arguments

BLOCK = 8


def make_engine(caching: bool, step_policy: str = "chunked", num_blocks: int = 64, chunk_size: int = 32,
                async_scheduling: bool = False, max_num_seqs: int = 8, pad: bool = True) -> LLMEngine:
    sched = EngineSchedulerConfig(chunk_size=chunk_size, max_num_seqs=max_num_seqs, step_policy=step_policy,
                                  pad_chunks=pad, async_scheduling=async_scheduling)
    engine = LLMEngine(EngineConfig(model="tiny", cache=CacheConfig(BLOCK, num_blocks, enable_prefix_caching=caching),
                                    scheduler=sched))
    engine.prefill_tokens = 0  # prompt tokens computed (padding not counted)
    engine.prefill_steps = []  # (real prompt tokens, padding) of every step with prompt tokens
    execute = engine.runner.execute

    def counted(plan, *args, **kwargs):
        real = sum(p.length for p in plan.prefill)
        engine.prefill_tokens += real
        if plan.prefill:
            engine.prefill_steps.append((real, plan.num_padding))
        return execute(plan, *args, **kwargs)

    engine.runner.execute = counted
    return engine


def conserved(engine: LLMEngine) -> None:
    """Free + cached (evictable) + held blocks are exactly the cache, every block in one of them."""
    bm = engine.block_manager
    bm.check()
    held = sum(1 for b in range(bm.num_blocks) if bm.ref_count(b) > 0)
    assert (bm.num_free_blocks - bm.num_evictable_blocks) + bm.num_evictable_blocks + held == bm.num_blocks
    assert bm.num_used_blocks == held


def sampling(i: int) -> SamplingParams:
    if i % 2:
        return SamplingParams(max_tokens=6, temperature=1.0, seed=i, ignore_eos=True, logprobs=True)
    return SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=True)


def run(engine: LLMEngine, waves: list[list[list[int]]], abort: dict | None = None) -> dict:
    """Run the waves of prompts one after the other (a wave is added when the one before ended);
    `abort`: {request id: steps after which it is aborted}. Checks the blocks after every step."""
    outs, n, steps = {}, 0, 0
    for wave in waves:
        for ids in wave:
            engine.add_request(str(n), prompt_token_ids=ids, sampling=sampling(n))
            n += 1
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outs[out.request_id] = out
            steps += 1
            conserved(engine)
            for rid, after in (abort or {}).items():
                if after == steps and rid in engine.requests:
                    engine.abort_request(rid)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))
    assert not engine.requests
    return outs


def same_outputs(on: dict, off: dict) -> None:
    assert on.keys() == off.keys()
    for rid in off:
        a, b = on[rid].outputs[0], off[rid].outputs[0]
        assert a.token_ids == b.token_ids, rid
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4), rid


def both(waves, abort=None, **kwargs):
    on, off = make_engine(True, **kwargs), make_engine(False, **kwargs)
    outs_on, outs_off = run(on, waves, abort), run(off, waves, abort)
    same_outputs(outs_on, outs_off)
    assert all(o.num_cached_tokens == 0 for o in outs_off.values())
    return on, off, outs_on


def tokens(start: int, n: int) -> list[int]:
    return [3 + (start + 7 * j) % 200 for j in range(n)]


PREFIX = tokens(0, 5 * BLOCK)  # five full blocks


@pytest.mark.parametrize("step_policy", ["chunked", "mixed"])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_request_sharing_a_multi_block_prefix_hits_and_prefills_only_the_rest(step_policy, async_scheduling):
    waves = [[PREFIX + tokens(1, 11)], [PREFIX + tokens(2, 13)]]
    on, off, outs = both(waves, step_policy=step_policy, async_scheduling=async_scheduling)
    assert outs["0"].num_cached_tokens == 0 and outs["1"].num_cached_tokens == len(PREFIX)
    assert on.prefill_tokens == off.prefill_tokens - len(PREFIX)


@pytest.mark.parametrize("step_policy", ["chunked", "mixed"])
def test_only_the_full_blocks_of_a_partial_block_prefix_hit(step_policy):
    shared = PREFIX[:2 * BLOCK + 5]  # two full blocks and five tokens of a third
    waves = [[shared + tokens(1, 20)], [shared + tokens(2, 20)]]
    on, off, outs = both(waves, step_policy=step_policy)
    assert outs["1"].num_cached_tokens == 2 * BLOCK
    assert on.prefill_tokens == off.prefill_tokens - 2 * BLOCK


def test_an_identical_prompt_hits_everything_but_its_last_token():
    aligned, ragged = PREFIX, PREFIX + [9, 10, 11]
    on, off, outs = both([[aligned], [aligned], [ragged], [ragged]])
    # The last token must be computed to sample from: a block-aligned prompt recomputes its last block.
    assert outs["1"].num_cached_tokens == len(aligned) - BLOCK
    assert outs["2"].num_cached_tokens == len(aligned) and outs["3"].num_cached_tokens == len(aligned)


def test_eviction_under_memory_pressure_stays_exact():
    distinct = [tokens(31 * i + 50, 30 + 3 * i) for i in range(8)]
    waves = [distinct[:3], distinct[3:6] + [distinct[0]], distinct[6:] + [distinct[1], distinct[7]],
             [distinct[7][:25] + [1, 2]]]
    on, off, outs = both(waves, num_blocks=20, step_policy="mixed")
    bm = on.block_manager
    assert bm.num_cached_blocks <= bm.num_blocks
    # A repeat found its blocks while they were cached; the second prompt's were evicted before its
    # repeat; the last prompt's prefix was still cached (only its full blocks).
    assert outs["6"].num_cached_tokens == 3 * BLOCK and outs["9"].num_cached_tokens == 0
    assert outs["11"].num_cached_tokens == 3 * BLOCK
    assert on.prefill_tokens < off.prefill_tokens


def test_preempted_requests_look_up_again_and_stay_exact():
    prompts = [PREFIX + tokens(i, 4) for i in range(5)]
    on = make_engine(True, step_policy="mixed", num_blocks=24, chunk_size=64)
    off = make_engine(False, step_policy="mixed", num_blocks=24, chunk_size=64)
    for engine in (on, off):
        for i, ids in enumerate(prompts):
            engine.add_request(str(i), prompt_token_ids=ids, sampling=SamplingParams(
                max_tokens=30, temperature=0, ignore_eos=True, logprobs=True))
    outs_on, outs_off = run(on, [[]]), run(off, [[]])
    same_outputs(outs_on, outs_off)
    assert on.scheduler.num_preemptions > 0 and on.prefill_tokens < off.prefill_tokens


@pytest.mark.parametrize("step_policy", ["chunked", "mixed"])
def test_abort_mid_prefill_leaves_a_prefix_that_a_later_request_reuses_exactly(step_policy):
    long = PREFIX + tokens(5, 60)
    waves = [[long], [long[:70] + [4, 5, 6]]]
    on, off, outs = both(waves, abort={"0": 2}, step_policy=step_policy, chunk_size=32)
    assert outs["1"].num_cached_tokens == 64  # the two chunks computed before the abort


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_request_arriving_mid_prefill_reuses_the_blocks_already_computed(async_scheduling):
    long = PREFIX + tokens(5, 60)
    results = []
    for caching in (True, False):
        engine = make_engine(caching, async_scheduling=async_scheduling, chunk_size=30)
        engine.add_request("a", prompt_token_ids=long, sampling=sampling(0))
        engine.step()
        engine.step()  # two chunks of 30 queued: 7 full blocks and half of the 8th
        engine.add_request("b", prompt_token_ids=long[:70] + [1, 2, 3], sampling=sampling(2))
        results.append(run(engine, [[]]))
    same_outputs(*results)
    assert results[0]["b"].num_cached_tokens == 7 * BLOCK and results[1]["b"].num_cached_tokens == 0


def test_fixed_size_chunks_still_hold_exactly_chunk_size_tokens():
    on, off, outs = both([[PREFIX + tokens(1, 70)], [PREFIX + tokens(1, 70) + [7]]], chunk_size=16)
    assert outs["1"].num_cached_tokens == len(PREFIX) + 64
    for engine in (on, off):
        assert all(real + pad == 16 for real, pad in engine.prefill_steps)
    # The cached request prefills 7 tokens: one chunk padded to 16.
    assert on.prefill_steps[-1] == (7, 9)


def test_with_the_cache_off_nothing_is_cached_or_reused():
    engine = make_engine(False)
    outs = run(engine, [[PREFIX + [1]], [PREFIX + [1]]])
    assert engine.prefix_cache is None and engine.block_manager.num_cached_blocks == 0
    assert engine.prefill_tokens == 2 * (len(PREFIX) + 1)
    assert [o.num_cached_tokens for o in outs.values()] == [0, 0]


def test_export_reads_shared_blocks_and_import_continues_exactly():
    prompt = PREFIX + tokens(9, 10)
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=True)
    alone = make_engine(False)
    alone.add_request("x", prompt_token_ids=prompt, sampling=sp)
    expected = run(alone, [[]])["x"].outputs[0]
    prefill, decode = make_engine(True), make_engine(True)
    run(prefill, [[PREFIX + [1, 2]]])  # leaves the prefix cached
    req = prefill.add_request("x", prompt_token_ids=prompt, sampling=sp, prefill_only=True)
    while req.status.value != "prefilled":
        prefill.step()
        conserved(prefill)
    assert req.num_cached_tokens == len(PREFIX)
    decode.import_request(prefill.export_request("x"))
    assert prefill.block_manager.num_free_blocks == prefill.block_manager.num_blocks
    got = run(decode, [[]])["x"].outputs[0]
    assert got.token_ids == expected.token_ids and got.logprobs == pytest.approx(expected.logprobs, abs=1e-4)


def test_the_flags_and_the_llm_keyword_turn_it_off():
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert parser.parse_args([]).enable_prefix_caching
    assert not parser.parse_args(["--no-prefix-caching"]).enable_prefix_caching
    assert parser.parse_args(["--no-prefix-caching", "--enable-prefix-caching"]).enable_prefix_caching
    assert CacheConfig().enable_prefix_caching
    assert LLM("tiny", num_blocks=16, enable_prefix_caching=False).engine.prefix_cache is None
    llm = LLM("tiny", num_blocks=16, block_size=BLOCK)
    sp = SamplingParams(max_tokens=2, temperature=0)
    first, second = (llm.generate(prompt_token_ids=[PREFIX + [1]], sampling_params=sp)[0] for _ in range(2))
    assert (first.num_cached_tokens, second.num_cached_tokens) == (0, len(PREFIX))


@pytest.mark.parametrize("step_policy", ["chunked", "mixed"])
def test_each_turn_of_a_conversation_reuses_the_history_and_the_replies_before_it(step_policy):
    """Multi-turn chat: each turn resends the conversation so far, the model's replies included;
    two conversations share a system prompt and run side by side."""
    engines = {caching: make_engine(caching, step_policy=step_policy, num_blocks=128) for caching in (True, False)}
    history = {caching: [PREFIX + tokens(40 + c, 5) for c in range(2)] for caching in engines}
    sp = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True, logprobs=True)
    computed = [0, 0]  # tokens of each conversation whose KV the turn before computed
    for turn in range(3):
        outs = {}
        for caching, engine in engines.items():
            for c, conv in enumerate(history[caching]):
                engine.add_request(f"{turn}-{c}", prompt_token_ids=list(conv), sampling=sp)
            outs[caching] = run(engine, [[]])
        same_outputs(outs[True], outs[False])
        cached = [outs[True][f"{turn}-{c}"].num_cached_tokens for c in range(2)]
        if turn == 0:  # the second conversation waits for the first's chunk: it finds the system prompt's blocks
            assert cached == [0, 32]
        else:  # every full block of the turn before, prompt and reply (its last token never fed back)
            assert cached == [n // BLOCK * BLOCK for n in computed]
        for c in range(2):
            for caching in engines:
                history[caching][c] += outs[caching][f"{turn}-{c}"].outputs[0].token_ids + tokens(60 + turn, 2)
            computed[c] = len(history[True][c]) - 3
