"""A request handed off between engines (cluster.handoff): its state travels as one record,
`engine.serving.RequestState`, inside `KVPush`, and its times survive the move."""

from __future__ import annotations

import pytest

from tetriinfer import SamplingParams
from tetriinfer.cluster import messages as msg
from tetriinfer.cluster.handoff.decode import state_on_this_clock
from tetriinfer.config import CacheConfig, EngineConfig, EngineSchedulerConfig
from tetriinfer.engine.engine import LLMEngine
from tetriinfer.engine.serving import RequestKV


def make_engine(num_blocks: int = 64) -> LLMEngine:
    return LLMEngine(EngineConfig(model="tiny", cache=CacheConfig(block_size=16, num_blocks=num_blocks),
                                  scheduler=EngineSchedulerConfig(chunk_size=32, async_scheduling=False)))


def test_a_handed_off_request_is_timed_from_its_arrival_not_its_landing():
    prompt, sampling = list(range(5, 60)), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prefill, decode = make_engine(), make_engine()
    prefill.add_request("r", prompt_token_ids=prompt, sampling=sampling, prefill_only=True, arrival_time=100.0)
    while prefill.requests["r"].status.value != "prefilled":
        prefill.step()
    kv = prefill.export_request("r")
    ttft = kv.state.first_token_time - kv.state.arrival_time
    assert kv.state.arrival_time == 100.0 and ttft > 0

    # The push crosses to a machine whose monotonic clock reads 5000 s more at the same instant.
    sent_at = kv.state.first_token_time + 0.25
    push = msg.decode(msg.encode(msg.KVPush(kv.state, 0, 1 << 32 | 1, {"nbytes": kv.nbytes}, sent_at)))
    assert push.state == kv.state and push.request_id == "r"
    state = state_on_this_clock(push, received_at=sent_at + 5000.0)
    assert state.arrival_time == pytest.approx(5100.0)
    assert state.first_token_time - state.arrival_time == pytest.approx(ttft)

    decode.import_request(RequestKV(state, kv.k, kv.v), decode.reserve_blocks(kv.num_cached_tokens))
    done = {}
    while decode.has_unfinished_requests():
        done.update((out.request_id, out) for out in decode.step() if out.finished)
    metrics = done["r"].metrics
    assert metrics.arrival_time == pytest.approx(5100.0)
    assert metrics.ttft == pytest.approx(ttft)  # the first token was made on the prefill engine
    assert len(done["r"].outputs[0].token_ids) == 6


def test_the_serving_facade_reports_a_parked_request_and_the_running_batch():
    engine = make_engine()
    engine.add_request("p", prompt_token_ids=list(range(5, 40)), prefill_only=True,
                       sampling=SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    while engine.requests["p"].status.value != "prefilled":
        engine.step()
    parked = engine.parked_kv("p")
    assert (parked.num_cached_tokens, parked.num_blocks, parked.token_on_device) == (35, 3, False)
    assert engine.running_tokens() == {} and engine.has_request("p") and not engine.has_request("x")
    engine.decode_here("p")
    assert engine.running_tokens() == {"p": 36}
    engine.abort_request("p")
    assert not engine.has_request("p") and engine.free_blocks == 64
