"""Issue 14: the KV sent to a decode engine skips the full blocks its prefix cache holds already.

Through the engine facade (`engine.serving`): engine B (decode) decoded the previous turn of a
conversation and holds it cached; engine A prefills the next turn, B pins the cached run of A's
block keys (`reserve_kv`), A exports only the KV from there on, B imports it after the pinned
blocks. The tokens are those of one engine that never moved anything, and no block leaks.
"""

from __future__ import annotations

import pytest

from tetriinfer import SamplingParams
from tetriinfer.config import CacheConfig, EngineConfig, EngineSchedulerConfig
from tetriinfer.engine.engine import LLMEngine
from tetriinfer.engine.serving import KVReservation, RequestKV

BLOCK = 8
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=True)


def make_engine(num_blocks: int = 64, caching: bool = True) -> LLMEngine:
    return LLMEngine(EngineConfig(model="tiny", cache=CacheConfig(BLOCK, num_blocks, enable_prefix_caching=caching),
                                  scheduler=EngineSchedulerConfig(chunk_size=32, async_scheduling=False)))


def tokens(start: int, n: int) -> list[int]:
    return [3 + (start + 7 * j) % 200 for j in range(n)]


def conserved(engine: LLMEngine) -> None:
    """Free + cached (evictable) + held blocks are exactly the cache, every block in one of them."""
    bm = engine.block_manager
    bm.check()
    held = sum(1 for b in range(bm.num_blocks) if bm.ref_count(b) > 0)
    assert (bm.num_free_blocks - bm.num_evictable_blocks) + bm.num_evictable_blocks + held == bm.num_blocks


def idle(engine: LLMEngine) -> None:
    """Nothing held: every block free or cached-evictable."""
    conserved(engine)
    bm = engine.block_manager
    assert bm.num_used_blocks == 0 and all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))


def finish(engine: LLMEngine, each_step=lambda: None) -> dict:
    outs = {}
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o.outputs[0]) for o in engine.step() if o.finished)
        conserved(engine)
        each_step()
    return outs


def prefilled(engine: LLMEngine, rid: str, ids: list[int], sampling: SamplingParams = GREEDY) -> None:
    engine.add_request(rid, prompt_token_ids=ids, sampling=sampling, prefill_only=True)
    while engine.requests[rid].status.value != "prefilled":
        engine.step()
        conserved(engine)


def offer(a: LLMEngine, b: LLMEngine, rid: str) -> KVReservation:
    """What the hand-off does on an offer: B pins what it holds of A's keys, reserves the rest."""
    return b.reserve_kv(a.parked_kv(rid).num_cached_tokens, a.kv_block_keys(rid))


def move(a: LLMEngine, b: LLMEngine, rid: str) -> tuple[KVReservation, RequestKV]:
    res = offer(a, b, rid)
    kv = a.export_request(rid, res.skip_tokens)
    b.import_request(kv, res.block_ids)
    return res, kv


def alone(prompts: list[list[int]]) -> list:
    """Each prompt on one engine without prefix caching, nothing moved: the expected outputs."""
    engine = make_engine(caching=False)
    outs = []
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), prompt_token_ids=ids, sampling=GREEDY)
        outs.append(finish(engine)[str(i)])
    return outs


def same(got, expected) -> None:
    assert got.token_ids == expected.token_ids
    assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-4)


def first_turn(a: LLMEngine, b: LLMEngine, ids: list[int]):
    """Turn 1: prefilled on A, moved whole to B (B holds nothing yet), decoded on B."""
    prefilled(a, "t1", ids)
    res, kv = move(a, b, "t1")
    assert res.skip_tokens == 0 and kv.start_token == 0
    return finish(b)["t1"]


def test_the_second_turn_moves_only_what_the_decode_engine_does_not_hold_and_decodes_exactly():
    conv = tokens(0, 29)
    a, b = make_engine(), make_engine()
    out1 = first_turn(a, b, conv)
    turn2 = conv + out1.token_ids + tokens(50, 10)  # 47 tokens: the conversation so far + the new message
    exp1, exp2 = alone([conv, turn2])
    same(out1, exp1)
    # B computed the KV of 29 + 7 tokens; its 4 full blocks are cached (the 5th is partial).
    prefilled(a, "t2", turn2)
    full = a.parked_kv("t2").num_cached_tokens
    res, kv = move(a, b, "t2")
    assert (res.skip_tokens, kv.start_token, kv.k.shape[1], kv.num_cached_tokens) == (32, 32, full - 32, full)
    assert kv.nbytes == (full - 32) * a.kv_bytes_per_token  # what moved: the suffix only
    idle(a)
    same(finish(b)["t2"], exp2)
    idle(b)


def test_the_pinned_blocks_are_the_cached_ones_and_the_table_is_cached_then_new():
    conv = tokens(0, 29)
    a, b = make_engine(), make_engine()
    out1 = first_turn(a, b, conv)
    prefilled(a, "t2", conv + out1.token_ids + tokens(50, 10))
    keys = a.kv_block_keys("t2")
    bm = b.block_manager
    cached = [bm._block_of[k] for k in keys[:4]]
    assert all(bm.ref_count(x) == 0 for x in cached) and bm.num_evictable_blocks >= 4
    res = offer(a, b, "t2")
    assert res.block_ids[:4] == cached and all(bm.ref_count(x) == 1 for x in cached)
    assert not set(res.block_ids[4:]) & set(cached) and len(res.block_ids) == bm.blocks_for_tokens(46)
    b.release_blocks(res.block_ids)  # an offer given up: the hits go back to the evictable pool
    idle(b)
    assert all(bm.cached_key(x) == k for x, k in zip(cached, keys))
    a.abort_request("t2")
    idle(a)


@pytest.mark.parametrize("case", ["diverges mid-block", "cached run ends mid-block"])
def test_only_full_blocks_are_skipped(case):
    conv = tokens(0, 29)
    a, b = make_engine(), make_engine()
    out1 = first_turn(a, b, conv)
    if case == "diverges mid-block":  # the new prompt shares 31 tokens with B's: 3 full blocks
        turn2 = conv + out1.token_ids[:2] + tokens(90, 12)
        expected_skip = 24
    else:  # shares all 36 computed tokens of B's, which ends in a partial block: 4 full blocks
        turn2 = conv + out1.token_ids + tokens(50, 3)
        expected_skip = 32
    prefilled(a, "t2", turn2)
    res, kv = move(a, b, "t2")
    assert res.skip_tokens == expected_skip and kv.k.shape[1] == len(turn2) - expected_skip
    same(finish(b)["t2"], alone([turn2])[0])
    idle(a)
    idle(b)


def test_a_fully_cached_context_still_moves_its_last_block():
    """B holds every full block of the new context: the block of its last token still moves (a
    transfer is never empty), as a local prefill never skips the last token."""
    conv = tokens(0, 29)
    a, b = make_engine(), make_engine()
    out1 = first_turn(a, b, conv)
    turn2 = conv + out1.token_ids[:3] + [5]  # 33 tokens: KV of 33 with 4 full blocks cached on B
    prefilled(a, "t2", turn2)
    res, kv = move(a, b, "t2")
    assert res.skip_tokens == 32 and kv.k.shape[1] == 1
    same(finish(b)["t2"], alone([turn2])[0])
    idle(b)


def test_pinned_blocks_survive_eviction_pressure_during_the_transfer():
    conv = tokens(0, 29)
    a, b = make_engine(), make_engine(num_blocks=20)
    out1 = first_turn(a, b, conv)
    b.add_request("other", prompt_token_ids=tokens(120, 30), sampling=GREEDY)  # more evictable blocks
    finish(b)
    turn2 = conv + out1.token_ids + tokens(50, 10)
    prefilled(a, "t2", turn2)
    res = offer(a, b, "t2")  # the KV is "on its way" from here until the import
    bm = b.block_manager
    pinned = res.block_ids[:res.skip_tokens // BLOCK]
    keys = [bm.cached_key(x) for x in pinned]
    assert len(pinned) == 4 and bm.num_evictable_blocks > 0  # other blocks are evictable
    # A request that takes every allocatable block: it must evict all it can, and never a pinned block.
    filler_len = bm.num_free_blocks * BLOCK - 1  # its KV, second token included, fills them exactly
    b.add_request("filler", prompt_token_ids=tokens(170, filler_len),
                  sampling=SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    peak = []

    def check_pins():
        assert [bm.cached_key(x) for x in pinned] == keys and all(bm.ref_count(x) >= 1 for x in pinned)
        filler = b.requests.get("filler")
        if filler is not None:
            assert not set(filler.block_ids) & set(res.block_ids)
        peak.append(bm.num_free_blocks)

    finish(b, check_pins)
    assert min(peak) == 0  # the cache was full: every evictable block but the pinned ones was taken
    kv = a.export_request("t2", res.skip_tokens)
    b.import_request(kv, res.block_ids)
    same(finish(b)["t2"], alone([turn2])[0])  # the pinned KV was not overwritten
    idle(a)
    idle(b)


def test_an_offer_that_never_lands_leaves_nothing_pinned_and_a_later_one_hits_again():
    conv = tokens(0, 29)
    a, b = make_engine(), make_engine()
    out1 = first_turn(a, b, conv)
    turn2 = conv + out1.token_ids + tokens(50, 10)
    prefilled(a, "t2", turn2)
    first = offer(a, b, "t2")
    b.release_blocks(first.block_ids)  # the push never came (or the offer was taken back)
    idle(b)
    second = offer(a, b, "t2")  # offered again: the blocks are still cached
    assert second.skip_tokens == first.skip_tokens == 32
    kv = a.export_request("t2", second.skip_tokens)
    b.import_request(kv, second.block_ids)
    same(finish(b)["t2"], alone([turn2])[0])
    idle(b)


def test_keys_that_are_not_the_pushed_request_are_refused_before_anything_is_written():
    conv = tokens(0, 29)
    a, b = make_engine(), make_engine()
    out1 = first_turn(a, b, conv)
    prefilled(a, "t2", conv + out1.token_ids + tokens(50, 10))
    res = offer(a, b, "t2")
    kv = a.export_request("t2", res.skip_tokens)
    state = kv.state
    state.prompt_token_ids = [7] + state.prompt_token_ids[1:]  # not the tokens the keys were made of
    with pytest.raises(ValueError, match="not this request's prefix"):
        b.import_request(kv, res.block_ids)
    assert not b.requests
    b.release_blocks(res.block_ids)
    idle(b)
    with pytest.raises(ValueError, match="needs the reserved blocks"):
        b.import_request(kv)  # a suffix without the table holding the prefix
    with pytest.raises(ValueError, match="block boundary"):
        prefilled(a, "t3", conv)
        a.export_request("t3", 4)
    idle(b)


def test_without_prefix_caching_nothing_is_keyed_or_skipped():
    conv = tokens(0, 29)
    a, b = make_engine(caching=False), make_engine(caching=False)
    out1 = first_turn(a, b, conv)
    prefilled(a, "t2", conv + out1.token_ids + tokens(50, 10))
    assert a.kv_block_keys("t2") == []
    hot = make_engine()  # keys from a caching prefill side change nothing on a non-caching decode side
    prefilled(hot, "t2", conv + out1.token_ids + tokens(50, 10))
    res = b.reserve_kv(hot.parked_kv("t2").num_cached_tokens, hot.kv_block_keys("t2"))
    assert res.skip_tokens == 0
    b.release_blocks(res.block_ids)
    res, kv = move(a, b, "t2")
    assert res.skip_tokens == 0 and kv.start_token == 0
    finish(b)
    idle(b)


# ---- a real decode instance (cluster.handoff.decode): the test plays the prefill instance --------------


class FakePrefill:
    """Instance 1 of a two-instance cluster: its inbox, its shm transport and the messages it got."""

    def __init__(self, wire):
        from tetriinfer.cluster.kv import ShmTransport
        from tetriinfer.cluster.zmq_io import Inbox, Outboxes

        self.inbox = Inbox(wire, "127.0.0.1")
        self.out = Outboxes(wire)
        self.transport = ShmTransport(rank=1, cluster_id=wire.cluster_id)
        self.got: list = []

    def expect(self, kind, request_id: str, timeout_s: float = 10.0):
        from serve_utils import wait_until

        def find():
            self.got += self.inbox.drain(timeout_ms=20)
            return next((m for m in self.got if isinstance(m, kind) and m.request_id == request_id), None)
        return wait_until(find, timeout_s, f"{kind.__name__} for {request_id}")

    def close(self):
        self.transport.close()
        self.inbox.close()
        self.out.close()


def decode_instance(wire, api_address: str, kv_timeout_s: float):
    import threading

    from tetriinfer.cluster.instance import Instance, InstanceConfig
    from tetriinfer.config import FlipConfig, PolicyConfig

    engine = EngineConfig(model="tiny", max_model_len=256, cache=CacheConfig(BLOCK, 64),
                          scheduler=EngineSchedulerConfig(chunk_size=32, async_scheduling=False))
    config = InstanceConfig(0, "decode", engine, PolicyConfig(), FlipConfig(), api_address, api_address, world_size=2,
                            kv_timeout_s=kv_timeout_s, predictor="none", torch_threads=1, wire=wire)
    instance = Instance(config)
    return instance, threading.Thread(target=instance.serve, daemon=True)


def test_a_decode_instance_skips_what_it_holds_and_every_failure_path_unpins():
    """Turn 1 of a conversation decoded on the decode instance D. Turn 2 offered four times: taken
    back after KVReady, never pushed (D's timeout), aborted with its push in flight, and landed.
    Each KVReady asks for the KV from token 32 on; the landed one decodes the offline tokens, D
    counts the 32 tokens it did not receive, and no block stays pinned or leaks."""
    from serve_utils import wait_until
    from tetriinfer.cluster import messages as msg
    from tetriinfer.cluster.zmq_io import Inbox, Wire
    from tetriinfer.sched.lengths import blocks_for

    wire = Wire.create(one_host=True)
    api = Inbox(wire, "127.0.0.1")  # the API and the controller: token batches and stats
    d, thread = decode_instance(wire, api.address, kv_timeout_s=1.5)
    p = FakePrefill(wire)
    a = make_engine()
    conv = tokens(0, 29)
    out1 = first_turn(a, d.engine, conv)
    turn2 = conv + out1.token_ids + tokens(50, 10)
    expected = alone([turn2])[0]
    d.addresses = {1: p.inbox.address}  # as the controller's Snapshot would (none is sent here)
    thread.start()
    api_got = []
    try:
        def offer_to_d(rid: str, offer_id: int) -> msg.KVReady:
            prefilled(a, rid, turn2)
            n = a.parked_kv(rid).num_cached_tokens
            p.out.send(d.inbox.address, msg.KVOffer(rid, 1, n, blocks_for(n + 8, BLOCK), blocks_for(n + 8, BLOCK),
                                                    False, 8, offer_id, a.kv_block_keys(rid)))
            ready = p.expect(msg.KVReady, rid)
            assert ready.offer_id == offer_id and ready.skip_tokens == 32
            return ready

        def released(rid: str) -> None:
            wait_until(lambda: rid not in d.incoming and not d._receives, 10, f"{rid} given up")

        offer_to_d("withdrawn", 1)
        p.out.send(d.inbox.address, msg.KVCancel("withdrawn", -1, "taken back"))
        released("withdrawn")

        offer_to_d("never-pushed", 2)
        released("never-pushed")  # after D's kv timeout

        ready = offer_to_d("aborted", 3)
        kv = a.export_request("aborted", ready.skip_tokens)
        desc = p.transport.start_send(0, ready.transfer_id, kv.k, kv.v)
        p.out.send(d.inbox.address, msg.KVPush(kv.state, 1, ready.transfer_id, desc, 0.0))
        p.out.send(d.inbox.address, msg.Abort("aborted"))
        released("aborted")
        wait_until(lambda: not d.engine.has_request("aborted"), 10, "the aborted request gone")

        ready = offer_to_d("landed", 4)
        kv = a.export_request("landed", ready.skip_tokens)
        assert kv.start_token == 32 and kv.nbytes == (len(turn2) - 32) * a.kv_bytes_per_token
        desc = p.transport.start_send(0, ready.transfer_id, kv.k, kv.v)
        p.out.send(d.inbox.address, msg.KVPush(kv.state, 1, ready.transfer_id, desc, 0.0))
        assert p.expect(msg.KVDone, "landed").ok

        def landed_tokens():
            api_got.extend(api.drain(timeout_ms=20))
            deltas = [dl for m in api_got if isinstance(m, msg.TokenBatch) for dl in m.deltas
                      if dl.request_id == "landed"]
            return deltas if deltas and deltas[-1].finish_reason else None
        deltas = wait_until(landed_tokens, 20, "the landed request's tokens")
        assert deltas[-1].finish_reason == "length" and not any(dl.error for dl in deltas)
        got = expected.token_ids[:1] + [t for dl in deltas for t in dl.token_ids]  # token 1 came from prefill
        assert got == expected.token_ids
        assert d.transfers_in.skipped_tokens == 32 and d.transfers_in.count == 1

        def reported():
            api_got.extend(api.drain(timeout_ms=20))
            return any(isinstance(m, msg.InstanceStats) and m.kv_transfer_skipped_tokens == 32 for m in api_got)
        wait_until(reported, 5, "the skipped tokens in D's report")
    finally:
        p.out.send(d.inbox.address, msg.Shutdown())
        thread.join(10)
        p.close()
        api.close()
        wire.remove()
    assert not thread.is_alive()
    idle(d.engine)  # every pin released, nothing leaked
    assert d.engine.block_manager.num_evictable_blocks > 0  # and the conversation is still cached
    for rid in ("withdrawn", "never-pushed"):
        a.abort_request(rid)
    idle(a)


# ---- served end to end: a two-turn conversation through a disaggregated cluster --------------------------


@pytest.mark.parametrize("caching", [True, False])
def test_a_served_second_turn_moves_only_the_kv_its_decode_instance_lacks(tmp_path, caching):
    """1 prefill + 1 decode instance, the paper policy (every request moves). Turn 2 resends turn 1
    and its answer: with prefix caching its transfer skips the full blocks the decode instance
    cached while decoding turn 1 (/metrics: fewer bytes than its context, the skipped tokens
    counted); with --no-prefix-caching the whole context moves, as before. Both turns' tokens are
    the offline engine's."""
    import openai

    from serve_utils import start_server
    from tetriinfer import LLM

    args = ["--policy", "paper", "--decode-instances", "1", "--num-blocks", "256", "--chunk-size", "64",
            "--max-model-len", "512", *([] if caching else ["--no-prefix-caching"])]
    llm = LLM("tiny", num_blocks=256, chunk_size=64, max_model_len=512, enable_prefix_caching=False)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    turn1 = tokens(0, 61)
    out1 = llm.generate(prompt_token_ids=[turn1], sampling_params=sp)[0].outputs[0]
    turn2 = turn1 + out1.token_ids + tokens(80, 21)  # 94 tokens
    out2 = llm.generate(prompt_token_ids=[turn2], sampling_params=sp)[0].outputs[0]
    per_token = llm.engine.kv_bytes_per_token
    with start_server(args, tmp_path) as server:
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)

        def complete(ids):
            r = c.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
            return r.choices[0].text

        def decode_side(name: str, at_least: float = 0.0):
            """A decode instance's counter, once its report shows at least `at_least` transfers."""
            samples = server.metrics()
            if server.metric_sum("tetriinfer_kv_transfers_total", samples, role="decode") < at_least:
                return None
            return {"value": server.metric_sum(name, samples, role="decode")}

        assert complete(turn1) == out1.text
        bytes1 = server.wait_until(lambda: decode_side("tetriinfer_kv_transfer_bytes_total", 1), 10,
                                   "turn 1's transfer in /metrics")["value"]
        assert bytes1 == len(turn1) * per_token  # nothing held yet: the whole context moved
        assert complete(turn2) == out2.text
        bytes2 = server.wait_until(lambda: decode_side("tetriinfer_kv_transfer_bytes_total", 2), 10,
                                   "turn 2's transfer in /metrics")["value"]
        skipped = server.metric_sum("tetriinfer_kv_transfer_skipped_tokens_total", role="decode")
        # D computed turn 1's prompt and 11 of its 12 output tokens: 72 tokens, 4 full blocks of 16.
        expected_skip = 64 if caching else 0
        assert skipped == expected_skip
        assert bytes2 - bytes1 == (len(turn2) - expected_skip) * per_token
        server.wait_until(lambda: server.metric_sum("tetriinfer_kv_blocks_used") == 0, 20, "every KV block freed")
