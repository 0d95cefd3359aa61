"""The policies' inputs built from one instance's plain counts (sched.instance_view)."""

from __future__ import annotations

from types import SimpleNamespace

from tetriinfer.sched.admission import AdmissionView
from tetriinfer.sched.dispatcher import DecodeLoad
from tetriinfer.sched.instance_view import admission_view, decode_load, placement, prefill_site_load


def test_the_running_request_predicted_to_end_first_gives_its_reservation_back():
    view = admission_view(100, 30, 8, running_tokens={"a": 50, "b": 90, "c": 10}, num_incoming=1,
                          reserved_blocks={"a": 10, "b": 20, "c": 5, "landing": 7},
                          predicted_total_tokens={"a": 300, "b": 100, "landing": 400})
    # b has 10 tokens to go, a 250; c has no prediction, so it is never the first to end.
    assert view == AdmissionView(100, 30, 42, 20, 4, 8)


def test_an_admission_view_without_running_requests_frees_no_reservation():
    view = admission_view(100, 30, 8, running_tokens={}, num_incoming=2, reserved_blocks={"x": 9},
                          predicted_total_tokens={"x": 50})
    assert view == AdmissionView(100, 30, 9, 0, 2, 8)


def test_a_decode_load_promises_what_neither_its_kv_nor_its_assigned_requests_take_and_a_slot_each():
    load = decode_load(3, capacity_blocks=64, used_blocks=20, assigned_need_blocks=30, num_heavy=1, num_light=2,
                       max_num_seqs=8, queued_prompt_tokens=70, num_running=2, context_tokens=500)
    assert load == DecodeLoad(3, 34, 1, 2, 0, 5, 70, 2, 500)  # 64 - max(20 held, 30 needed)


def test_a_prefill_instance_as_a_decode_site():
    here = prefill_site_load(0, free_blocks=12, max_num_seqs=8, queued_prompt_tokens=5, num_running=3,
                             context_tokens=90)
    assert here == DecodeLoad(0, 12, free_slots=5, queued_prompt_tokens=5, num_running=3, context_tokens=90)


def test_placement_sizes_by_the_predicted_bucket_capped_at_max_tokens_and_capacity():
    prediction = SimpleNamespace(bucket=1, lower=200, upper=400)
    placed = placement(100, 300, prediction, 200, 200, block_size=16, capacity_blocks=1000)
    assert (placed.need_blocks, placed.reserve_blocks, placed.heavy, placed.predicted_decode_tokens) == (19, 25, True, 300)
    light = placement(100, 300, SimpleNamespace(bucket=0, lower=0, upper=200), 200, 200, 16, 10)
    assert (light.need_blocks, light.reserve_blocks, light.heavy, light.predicted_decode_tokens) == (7, 10, False, 200)
    unknown = placement(100, 300, None, 200, 200, 16, 1000)
    assert (unknown.need_blocks, unknown.reserve_blocks, unknown.heavy, unknown.predicted_decode_tokens) == (7, 25, False, 300)
