"""Async scheduling (step t+1 queued before step t's tokens are read back) against the plain loop:
the same tokens, logprobs, texts and finish reasons; no wasted rows where a stop is known in
advance; aborts, stops by value, preemption and KV export/import while a step is in flight."""

from __future__ import annotations

import pytest

from tetriinfer import LLM, SamplingParams
from tetriinfer.config import CacheConfig, EngineConfig, EngineSchedulerConfig
from tetriinfer.engine.engine import LLMEngine

NUM_BLOCKS = 128


def make_engine(async_scheduling: bool, step_policy: str = "chunked", num_blocks: int = NUM_BLOCKS,
                block_size: int = 16, chunk_size: int = 32) -> LLMEngine:
    sched = EngineSchedulerConfig(chunk_size=chunk_size, step_policy=step_policy, async_scheduling=async_scheduling)
    return LLMEngine(EngineConfig(model="tiny", cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
                                  scheduler=sched))


def count_rows(engine: LLMEngine) -> dict:
    """Wrap the runner to count forward passes and decode rows."""
    counts = {"steps": 0, "decode_rows": 0}
    execute = engine.runner.execute

    def counted(plan, *args, **kwargs):
        counts["steps"] += 1
        counts["decode_rows"] += len(plan.decode)
        return execute(plan, *args, **kwargs)

    engine.runner.execute = counted
    return counts


def run_all(engine: LLMEngine, requests: list[tuple[str, list[int], SamplingParams]]) -> dict:
    for rid, ids, sp in requests:
        engine.add_request(rid, prompt_token_ids=ids, sampling=sp)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.requests
    return done


def same(a, b) -> None:
    assert a.token_ids == b.token_ids
    assert a.text == b.text
    assert (a.finish_reason, a.stop_reason) == (b.finish_reason, b.stop_reason)
    assert (a.logprobs is None) == (b.logprobs is None)
    if a.logprobs is not None:
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def greedy_tokens(prompt: list[int], n: int) -> list[int]:
    engine = make_engine(False)
    return run_all(engine, [("g", prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))])["g"].token_ids


def mixed_requests() -> list[tuple[str, list[int], SamplingParams]]:
    prompt = list(range(3, 50))
    stop_id = greedy_tokens(prompt, 12)[5]  # a stop that comes by value, in the middle of a run
    reqs = [
        ("greedy-long", list(range(1, 70)), SamplingParams(max_tokens=25, temperature=0, ignore_eos=True)),
        ("one-token", [5, 6, 7], SamplingParams(max_tokens=1, temperature=0)),
        ("seeded", list(range(10, 30)), SamplingParams(max_tokens=14, temperature=0.8, top_p=0.9, seed=3,
                                                       ignore_eos=True)),
        ("top-k", list(range(40, 45)), SamplingParams(max_tokens=9, temperature=1.2, top_k=20, seed=5,
                                                      ignore_eos=True)),
        ("logprobs", list(range(7, 20)), SamplingParams(max_tokens=7, temperature=0, logprobs=True, ignore_eos=True)),
        ("stop-id", prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_id])),
        ("min-tokens", prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_id], min_tokens=8)),
        ("stop-string", [97, 98] * 4, SamplingParams(max_tokens=16, temperature=0, stop=["e"])),
    ]
    reqs += [(f"batch-{i}", list(range(i + 1, i + 20 + 3 * i)), SamplingParams(max_tokens=5 + i, temperature=0,
                                                                                ignore_eos=True)) for i in range(8)]
    return reqs


@pytest.mark.parametrize("step_policy", ["chunked", "mixed"])
def test_async_scheduling_gives_the_same_outputs(step_policy):
    plain = run_all(make_engine(False, step_policy), mixed_requests())
    overlapped = run_all(make_engine(True, step_policy), mixed_requests())
    assert plain.keys() == overlapped.keys()
    for rid in plain:
        same(overlapped[rid], plain[rid])
    assert plain["stop-id"].finish_reason == "stop" and len(plain["stop-id"].token_ids) < 12


def test_length_stops_waste_no_rows():
    """Where every request ends by length, async scheduling knows each last token in advance and
    runs exactly the decode rows the plain loop runs."""
    reqs = [(f"r{i}", list(range(1, 10 + 5 * i)), SamplingParams(max_tokens=3 + 2 * i, temperature=0, ignore_eos=True))
            for i in range(6)]
    plain_engine, async_engine = make_engine(False), make_engine(True)
    plain_counts, async_counts = count_rows(plain_engine), count_rows(async_engine)
    run_all(plain_engine, reqs)
    run_all(async_engine, reqs)
    assert async_counts == plain_counts


def test_a_stop_by_value_spends_one_row_and_frees_everything():
    prompt = list(range(3, 50))
    stop_id = greedy_tokens(prompt, 12)[4]
    reqs = [("s", prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_id]))]
    plain_engine, async_engine = make_engine(False), make_engine(True)
    plain_counts, async_counts = count_rows(plain_engine), count_rows(async_engine)
    same(run_all(async_engine, reqs)["s"], run_all(plain_engine, reqs)["s"])
    assert async_counts["decode_rows"] == plain_counts["decode_rows"] + 1


def test_preemption_while_a_step_is_in_flight_keeps_greedy_outputs():
    prompts = [list(range(1 + i, 40 + i)) for i in range(6)]
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    reqs = [(str(i), p, sp) for i, p in enumerate(prompts)]
    for policy in ("chunked", "mixed"):
        expected = run_all(make_engine(False, policy, num_blocks=64), reqs)
        tight = make_engine(True, policy, num_blocks=14, block_size=8)  # 6 x 69 tokens need 54 blocks of 8
        preemptions = []
        tight.scheduler._preempt = lambda r, f=tight.scheduler._preempt: (preemptions.append(r.num_pending), f(r))
        got = run_all(tight, reqs)
        assert {k: v.token_ids for k, v in got.items()} == {k: v.token_ids for k, v in expected.items()}
        assert any(preemptions), "some request must be preempted with a token still on the device"


def test_abort_while_in_flight_frees_blocks_and_others_finish():
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    reqs = [(str(i), list(range(2 + i, 30 + i)), sp) for i in range(4)]
    expected = run_all(make_engine(False), reqs)
    engine = make_engine(True)
    for rid, ids, s in reqs:
        engine.add_request(rid, prompt_token_ids=ids, sampling=s)
    done = {}
    for _ in range(6):  # the prompts, then a decode step of all four
        for out in engine.step():
            assert not out.finished
    assert engine.requests["1"].num_pending == 1  # its token of the step in flight is not read back
    engine.abort_request("1")
    with pytest.raises(KeyError):
        engine.export_request("1")
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id != "1"
            if out.finished:
                done[out.request_id] = out.outputs[0]
    assert sorted(done) == ["0", "2", "3"]
    for rid in done:
        same(done[rid], expected[rid])
    assert engine.block_manager.num_free_blocks == NUM_BLOCKS


def test_export_is_refused_while_a_token_is_in_flight_and_the_import_continues():
    prompt, sp = list(range(5, 80)), SamplingParams(max_tokens=20, temperature=0.8, seed=2, ignore_eos=True)
    expected = run_all(make_engine(False), [("r", prompt, sp)])["r"]
    prefill, decode = make_engine(True), make_engine(True, num_blocks=64)
    prefill.add_request("r", prompt_token_ids=prompt, sampling=sp, prefill_only=True)
    while prefill.requests["r"].status.value != "prefilled":
        prefill.step()
    kv = prefill.export_request("r")
    assert prefill.block_manager.num_free_blocks == NUM_BLOCKS and not prefill.has_unfinished_requests()
    decode.import_request(kv)
    decode.step()  # the imported request's next token is now on the device
    with pytest.raises(ValueError, match="still on the device"):
        decode.export_request("r")
    done = {}
    while decode.has_unfinished_requests():
        for out in decode.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    same(done["r"], expected)
    assert decode.block_manager.num_free_blocks == 64


def test_default_is_off_on_the_cpu():
    """None (the default) means off on the CPU, where nothing would overlap (on for CUDA devices:
    tests/test_engine_gpu.py)."""
    assert EngineSchedulerConfig().async_scheduling is None
    assert LLMEngine(EngineConfig(model="tiny", cache=CacheConfig(num_blocks=16))).async_scheduling is False


def test_switching_off_with_a_step_in_flight_reads_it_back_first():
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    reqs = [(str(i), list(range(2 + i, 20 + i)), sp) for i in range(3)]
    expected = run_all(make_engine(False), reqs)
    engine = make_engine(True)
    for rid, ids, s in reqs:
        engine.add_request(rid, prompt_token_ids=ids, sampling=s)
    done = {}
    for _ in range(3):
        engine.step()
    assert any(r.num_pending for r in engine.requests.values())
    engine.async_scheduling = False
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    for rid in expected:
        same(done[rid], expected[rid])
    assert not any(r.num_pending for r in engine.requests.values())
    assert engine.block_manager.num_free_blocks == NUM_BLOCKS


def test_llm_takes_the_flag():
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    plain = LLM("tiny", chunk_size=32, num_blocks=64).generate(["Hello", "world"], sp)
    overlapped = LLM("tiny", chunk_size=32, num_blocks=64, async_scheduling=True).generate(["Hello", "world"], sp)
    assert [o.outputs[0].token_ids for o in overlapped] == [o.outputs[0].token_ids for o in plain]
