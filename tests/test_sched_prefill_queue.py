"""Prefill queue ordering: FCFS, and SJF/LJF sorting only within the sort window."""

from dataclasses import dataclass

import pytest

from tetriinfer.sched.prefill_queue import PrefillQueue


@dataclass
class Req:
    request_id: int
    prompt_len: int
    num_prefilled: int = 0


def order(policy, lengths, window, chunk_size=10**9):
    queue = PrefillQueue(policy, window)
    for i, n in enumerate(lengths):
        queue.add(Req(i, n))
    return [r.request_id for r in queue.ordered(chunk_size)]


def test_sjf_sorts_only_within_its_window():
    lengths = [50, 40, 30, 20, 10, 5]
    # Windows of 3: [50, 40, 30] then [20, 10, 5], each sorted by itself.
    assert order("sjf", lengths, 3) == [2, 1, 0, 5, 4, 3]
    assert order("ljf", [10, 30, 20, 5, 50, 40], 3) == [1, 2, 0, 4, 5, 3]
    assert order("fcfs", lengths, 3) == [0, 1, 2, 3, 4, 5]


def test_windows_are_sorted_only_as_far_as_a_chunk_needs():
    queue = PrefillQueue("sjf", 2)
    for i, n in enumerate([300, 100, 50, 20]):
        queue.add(Req(i, n))
    # 400 tokens in the first window cover a 256-token chunk: the second window stays unsorted.
    assert [r.request_id for r in queue.ordered(256)] == [1, 0]
    assert [r.request_id for r in queue.ordered(512)] == [1, 0, 3, 2]


def test_new_arrivals_do_not_jump_a_sorted_window():
    queue = PrefillQueue("sjf", 2)
    queue.add(Req(0, 300))
    queue.add(Req(1, 200))
    chunk = queue.next_chunk(100)
    assert chunk.pieces[0].request_id == 1
    queue.commit(chunk)
    queue.add(Req(2, 1))  # shortest of all, but the window [1, 0] is already being served
    assert [r.request_id for r in queue.ordered(10**6)] == [1, 0, 2]


def test_commit_advances_prompts_and_load_counts_unprefilled_tokens():
    queue = PrefillQueue("fcfs", 16)
    queue.add(Req(0, 600))
    queue.add(Req(1, 100))
    assert queue.pending_tokens == 700
    done = queue.commit(queue.next_chunk(512))
    assert done == [] and queue.pending_tokens == 188
    done = queue.commit(queue.next_chunk(512))
    assert [r.request_id for r in done] == [0, 1] and queue.pending_tokens == 0 and len(queue) == 0


def test_commit_rejects_a_chunk_that_is_not_the_queue_head():
    queue = PrefillQueue("fcfs", 16)
    queue.add(Req(0, 10))
    chunk = queue.next_chunk(512)
    queue.commit(chunk)
    queue.add(Req(1, 10))
    with pytest.raises(ValueError):
        queue.commit(chunk)


def test_bad_policy_or_window_raises():
    with pytest.raises(ValueError):
        PrefillQueue("random")
    with pytest.raises(ValueError):
        PrefillQueue("sjf", 0)


def test_take_pops_whole_requests_in_policy_order():
    q = PrefillQueue("sjf", sort_window=3)
    for rid, n in [("a", 50), ("b", 10), ("c", 30), ("d", 5)]:
        q.add(Req(rid, n))
    taken = q.take(35)  # the first window sorted by length: b(10), c(30) cover 35 -> stop
    assert [r.request_id for r in taken] == ["b", "c"]
    assert q.pending_tokens == 55 and len(q) == 2
    assert [r.request_id for r in q.take(10**6)] == ["a", "d"]
    assert q.pending_tokens == 0 and len(q) == 0 and q.take(1) == []


def test_remove_drops_a_request_and_its_load():
    q = PrefillQueue("fcfs", sort_window=2)
    for rid, n in [("a", 5), ("b", 7), ("c", 11)]:
        q.add(Req(rid, n))
    q.take(1)  # sorts the first window: a leaves, b stays ordered
    assert q.remove("b") and q.remove("c") and not q.remove("zzz")
    assert q.pending_tokens == 0 and len(q) == 0
