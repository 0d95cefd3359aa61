"""Adaptive disaggregation (sched.router): the router's decisions at the edges, and the prefill
instance's choice to keep a request's decode."""

from __future__ import annotations

import pytest

from tetriinfer.sched.dispatcher import DecodeLoad
from tetriinfer.sched.router import AdaptiveRouter, keep_on_prefill


class LinearCost:
    """2 ms a step, 20 us a prompt token, 50 us a decode, 10 ns a decode's context token."""

    def step_time(self, prefill_tokens, prefill_context, decode_seqs, decode_context):
        return 2e-3 + 2e-5 * prefill_tokens + 5e-5 * decode_seqs + 1e-8 * decode_context


def router(kv_seconds_per_token=1e-6, weight=1.0):
    return AdaptiveRouter(LinearCost(), chunk_size=512, kv_seconds_per_token=kv_seconds_per_token,
                          interference_weight=weight)


def decode(instance_id=10, room=1000, running=0, context=0, queued=0, slots=64):
    return DecodeLoad(instance_id, room, free_slots=slots, queued_prompt_tokens=queued, num_running=running,
                      context_tokens=context)


def test_an_idle_decode_instance_takes_a_short_prompt_itself():
    r = router()
    r.update({0: 0}, [decode()])
    route = r.route(prompt_tokens=100, need_blocks=10)
    assert route.local and route.instance_id == 10


def test_a_busy_decode_instance_sends_the_prompt_to_prefill():
    r = router()
    r.update({0: 0}, [decode(running=200, context=200 * 1500)])
    route = r.route(prompt_tokens=2000, need_blocks=200)
    assert not route.local and route.instance_id == 0
    costs = r.price(2000, 200)
    assert costs.interference_s > costs.remote_s  # the slowdown of 200 decodes is what decided


def test_a_queued_prefill_side_sends_long_prompts_to_a_decode_instance_with_spare_steps():
    r = router()
    r.update({0: 50_000, 1: 60_000}, [decode(running=4, context=4000)])
    assert r.route(prompt_tokens=3000, need_blocks=200).local


def test_no_local_prefill_without_room_or_a_slot():
    for load in (decode(room=5), decode(slots=0)):
        r = router()
        r.update({0: 100_000}, [load])
        assert not r.route(prompt_tokens=100, need_blocks=10).local


def test_the_view_counts_its_own_choices_until_the_next_snapshot():
    r = router()
    r.update({0: 100_000}, [decode(room=25)])
    first = r.route(prompt_tokens=100, need_blocks=10)
    second = r.route(prompt_tokens=100, need_blocks=10)
    third = r.route(prompt_tokens=100, need_blocks=10)
    assert first.local and second.local
    assert not third.local  # room 25 - 2 x 10 leaves 5 blocks


def test_interference_weight_zero_prices_only_the_ttft():
    busy = decode(running=200, context=200 * 1500)
    assert not router(weight=1.0).price(2000, 200).local_s > router(weight=0.0).price(2000, 200).local_s
    r = router(weight=0.0)
    r.update({0: 20_000}, [busy])
    assert r.route(prompt_tokens=2000, need_blocks=200).local


def test_without_prefill_instances_everything_prefills_locally():
    r = router()
    r.update({}, [decode()])
    assert r.route(prompt_tokens=5000, need_blocks=100).local


def test_bad_router_settings_are_rejected():
    with pytest.raises(ValueError):
        AdaptiveRouter(LinearCost(), chunk_size=0)
    with pytest.raises(ValueError):
        AdaptiveRouter(LinearCost(), chunk_size=512, interference_weight=-1)


# ---- keep_on_prefill ---------------------------------------------------------------------------------

def here(room=1000, running=0, context=0, queued=0, slots=64):
    return decode(instance_id=0, room=room, running=running, context=context, queued=queued, slots=slots)


def test_a_prefill_instance_keeps_a_request_no_decode_instance_has_room_for():
    assert keep_on_prefill(LinearCost(), here(), [decode(room=5)], need_blocks=50, kv_tokens=700, chunk_size=512)


def test_a_prefill_instance_keeps_decodes_when_the_decode_side_is_slower():
    slow = decode(running=250, context=250 * 2000)
    assert keep_on_prefill(LinearCost(), here(running=3, context=3000), [slow], 50, 700, 512)


def test_a_prefill_instance_with_prompts_queued_moves_decodes_to_a_light_decode_instance():
    light = decode(running=8, context=8000)
    assert not keep_on_prefill(LinearCost(), here(queued=20_000), [light], 50, 700, 512)


def test_a_prefill_instance_without_room_or_slot_never_keeps():
    for full in (here(room=10), here(slots=0)):
        assert not keep_on_prefill(LinearCost(), full, [decode(room=5)], 50, 700, 512)


# ---- tail-aware options (docs/adaptive.md, "Tail-aware routing and TPOT p99") ---------------------

def test_a_ttft_margin_sends_a_long_prompt_local_when_the_prefill_queue_would_cost_more_than_it():
    busy = decode(running=200, context=200 * 1500)
    shipped = router()
    shipped.update({0: 20_000}, [busy])
    assert not shipped.route(prompt_tokens=2000, need_blocks=200).local  # the interference decides
    costs = shipped.price(2000, 200)
    assert 0.2 < costs.remote_s - costs.local_s < 0.5
    for margin, local in ((0.2, True), (0.5, False)):
        r = AdaptiveRouter(LinearCost(), chunk_size=512, kv_seconds_per_token=1e-6, ttft_margin_s=margin)
        r.update({0: 20_000}, [busy])
        assert r.route(prompt_tokens=2000, need_blocks=200).local is local


def test_a_negative_ttft_margin_is_rejected():
    with pytest.raises(ValueError):
        AdaptiveRouter(LinearCost(), chunk_size=512, ttft_margin_s=-1)
