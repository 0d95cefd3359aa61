"""Prefix index (sched.prefix_index) and cache-aware placement (sched.global_scheduler, sched.router):
LRU eviction, longest-run matching, and the trade between a cached prefix and a queue."""

from __future__ import annotations

import hashlib
from array import array

import pytest

from tetriinfer.sched.dispatcher import DecodeLoad
from tetriinfer.sched.global_scheduler import GlobalScheduler
from tetriinfer.sched.prefix_index import PrefixIndex, cached_tokens, prefix_block_keys
from tetriinfer.sched.router import AdaptiveRouter


class LinearCost:
    """2 ms a step, 20 us a prompt token, 50 us a decode, 10 ns a decode's context token."""

    def step_time(self, prefill_tokens, prefill_context, decode_seqs, decode_context):
        return 2e-3 + 2e-5 * prefill_tokens + 5e-5 * decode_seqs + 1e-8 * decode_context


def test_matching_counts_only_the_leading_run_of_held_keys():
    index = PrefixIndex(100)
    index.record("a", ["k0", "k1", "k2"])
    assert index.matched_blocks("a", ["k0", "k1", "k2", "k3"]) == 3
    assert index.matched_blocks("a", ["k0", "x", "k2"]) == 1  # k2 is held, but after a miss
    assert index.matched_blocks("b", ["k0"]) == 0  # per instance
    assert index.num_blocks("a") == 3 and index.num_blocks("b") == 0


def test_the_least_recently_used_chain_is_evicted_tail_first_and_nothing_beyond_capacity_stays():
    index = PrefixIndex(4)
    index.record(0, ["a0", "a1", "a2"])
    index.record(0, ["b0", "b1"])  # 5 keys for 4 slots: chain a loses its tail, not its head
    assert index.num_blocks(0) == 4 and index.num_evicted == 1
    assert index.matched_blocks(0, ["a0", "a1", "a2"]) == 2
    assert index.matched_blocks(0, ["b0", "b1"]) == 2
    index.record(0, ["a0", "a1"])  # touched: chain b is now the oldest
    index.record(0, ["c0", "c1"])
    assert index.matched_blocks(0, ["a0", "a1"]) == 2
    assert index.matched_blocks(0, ["b0", "b1"]) == 0
    assert index.num_blocks(0) == 4 and index.num_evicted == 1 + 2  # conservation: 7 recorded, 4 held


def test_a_chain_longer_than_the_capacity_keeps_its_head_and_zero_capacity_holds_nothing():
    index = PrefixIndex(2)
    index.record(0, ["k0", "k1", "k2", "k3"])
    assert index.matched_blocks(0, ["k0", "k1", "k2"]) == 2
    off = PrefixIndex(0)
    off.record(0, ["k0"])
    assert off.matched_blocks(0, ["k0"]) == 0 and off.num_blocks(0) == 0
    index.drop(0)
    assert index.num_blocks(0) == 0
    with pytest.raises(ValueError):
        PrefixIndex(-1)


def test_cached_tokens_never_covers_the_prompts_last_token():
    index = PrefixIndex(10)
    index.record(0, ["k0", "k1"])
    assert cached_tokens(index, 0, ["k0", "k1"], 512, prompt_tokens=1024) == 1023
    assert cached_tokens(index, 0, ["k0", "k1"], 512, prompt_tokens=2000) == 1024
    assert cached_tokens(None, 0, ["k0"], 512, prompt_tokens=2000) == 0


def test_block_keys_chain_full_blocks_as_the_engine_does():
    tokens = list(range(40))
    keys = prefix_block_keys(tokens, 16, parent=b"salt")
    assert len(keys) == 2  # the 8 tokens of the partial last block have no key
    first = hashlib.sha256(b"salt" + array("I", tokens[:16]).tobytes()).digest()
    assert keys[0] == first
    assert keys[1] == hashlib.sha256(first + array("I", tokens[16:32]).tobytes()).digest()
    other = prefix_block_keys([0] * 16 + tokens[16:32], 16, parent=b"salt")
    assert other[1] != keys[1]  # equal block, different prefix: a different key
    assert prefix_block_keys(tokens[:32] + [7] * 16, 16, parent=b"salt")[:2] == keys


def test_a_cached_prefix_beats_a_short_queue():
    index = PrefixIndex(100)
    index.record(1, ["k0", "k1", "k2", "k3"])
    gs = GlobalScheduler([0, 1], index)
    gs.update({0: 0, 1: 500})
    # Instance 0 would compute 3000 tokens; instance 1 queues 500 + computes 3000 - 2048.
    assert gs.pick(3000, ["k0", "k1", "k2", "k3", "k4"], 512) == 1
    assert gs.least_loaded() == (0, 0)
    assert gs._load[1] == 500 + 3000 - 2048  # conservation: only the uncached tokens were added


def test_a_long_queue_beats_a_small_hit():
    index = PrefixIndex(100)
    index.record(1, ["k0"])
    gs = GlobalScheduler([0, 1], index)
    gs.update({0: 100, 1: 5000})
    assert gs.pick(3000, ["k0", "k1"], 512) == 0
    assert index.matched_blocks(0, ["k0", "k1"]) == 2  # the guess learns what it routed there


def test_without_an_index_or_keys_placement_is_least_loaded_as_before():
    index = PrefixIndex(100)
    index.record(1, ["k0", "k1", "k2", "k3"])
    for gs, keys in ((GlobalScheduler([0, 1]), ["k0", "k1"]), (GlobalScheduler([0, 1], index), [])):
        gs.update({0: 100, 1: 500})
        assert gs.pick(3000, keys, 512) == 0
        assert gs._load == {0: 3100, 1: 500}
    assert index.num_blocks(0) == 0  # no keys, nothing recorded


def decode(instance_id=10, room=1000, running=0, context=0, queued=0, slots=64):
    return DecodeLoad(instance_id, room, free_slots=slots, queued_prompt_tokens=queued, num_running=running,
                      context_tokens=context)


def test_a_decode_instance_holding_the_conversation_serves_the_next_turn_itself():
    keys = [f"c{i}" for i in range(6)]
    busy = decode(running=20, context=20 * 2000)
    plain = AdaptiveRouter(LinearCost(), chunk_size=512, kv_seconds_per_token=1e-6, interference_weight=1.0)
    plain.update({0: 0}, [busy])
    assert not plain.route(3200, need_blocks=250, prefix_keys=keys, block_tokens=512).local

    index = PrefixIndex(100)
    r = AdaptiveRouter(LinearCost(), chunk_size=512, kv_seconds_per_token=1e-6, interference_weight=1.0,
                       prefix_index=index)
    r.update({0: 0}, [busy])
    r.observe(10, keys)  # it decoded the previous turn: it holds 6 x 512 of the 3200 prompt tokens
    costs = r.price(3200, 250, keys, 512)
    assert costs.local_s + costs.interference_s < costs.remote_s
    route = r.route(3200, need_blocks=250, prefix_keys=keys, block_tokens=512)
    assert route.local and route.instance_id == 10
    assert r._decode[0].queued_prompt_tokens == 3200 - 6 * 512  # only the uncached tokens queue there


def test_the_router_sends_a_remote_prefill_to_the_prefill_instance_holding_the_prefix():
    index = PrefixIndex(100)
    index.record(1, ["k0", "k1", "k2"])
    r = AdaptiveRouter(LinearCost(), chunk_size=512, kv_seconds_per_token=1e-6, prefix_index=index)
    r.update({0: 0, 1: 600}, [decode(room=5)])  # no decode room: remote
    with_hit = r.price(2000, 100, ["k0", "k1", "k2"], 512).remote_s
    assert with_hit < r.price(2000, 100).remote_s
    assert r.route(2000, 100, ["k0", "k1", "k2"], 512) .instance_id == 1
