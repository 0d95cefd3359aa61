"""The API process's view of a request whose KV moves: its output reaches the client in token order
even when the decode instance's first deltas overtake the prefill instance's last ones (they travel
on different sockets; under load the prefill instance's can come later)."""

from __future__ import annotations

from tetriinfer.cluster import messages as msg
from tetriinfer.cluster.client import ClusterClient, _Live

P, D = 0, 1


def client_with(request_id: str) -> tuple[ClusterClient, _Live]:
    client = ClusterClient.__new__(ClusterClient)  # only the message handling, no sockets
    live = _Live(owner=P)
    client._live, client._num_waiting, client.deaths = {request_id: live}, 1, []
    return client, live


def batch(instance: int, *deltas: msg.TokenDelta) -> msg.TokenBatch:
    return msg.TokenBatch(instance, list(deltas))


def delivered(live: _Live) -> list[int]:
    tokens = []
    while not live.queue.empty():
        tokens += live.queue.get_nowait().token_ids
    return tokens


def test_the_decode_instances_tokens_wait_for_the_prefill_instances_last_ones():
    client, live = client_with("r")
    client._on_message(batch(P, msg.TokenDelta("r", [1, 2], "ab")))
    client._on_message(batch(D, msg.TokenDelta("r", [], "", output_offset=4)))  # moved after 4 tokens
    client._on_message(batch(D, msg.TokenDelta("r", [5], "e"), msg.TokenDelta("r", [6], "f", finish_reason="length")))
    assert delivered(live) == [1, 2] and len(live.held) == 2  # tokens 3 and 4 are still on their way
    client._on_message(batch(P, msg.TokenDelta("r", [3, 4], "cd")))
    assert delivered(live) == [3, 4, 5, 6] and not live.held


def test_in_order_deltas_and_errors_pass_at_once():
    client, live = client_with("r")
    client._on_message(batch(P, msg.TokenDelta("r", [1, 2], "ab")))
    client._on_message(batch(D, msg.TokenDelta("r", [], "", output_offset=2), msg.TokenDelta("r", [3], "c")))
    assert delivered(live) == [1, 2, 3]
    client, live = client_with("s")
    client._on_message(batch(D, msg.TokenDelta("s", [], "", output_offset=3)))
    client._on_message(batch(D, msg.TokenDelta.ended("s", "error", "KV did not fit")))
    assert live.queue.get_nowait().finish_reason == "error"


def test_held_tokens_are_released_when_the_prefill_instance_dies():
    client, live = client_with("r")
    client._on_message(batch(D, msg.TokenDelta("r", [], "", output_offset=2), msg.TokenDelta("r", [3], "c")))
    assert delivered(live) == [] and live.held
    client._on_message(msg.InstanceDied(P, "killed"))
    assert delivered(live) == [3]
