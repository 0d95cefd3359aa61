"""Issue 13, items 3, 8 (ZeroMQ) and 9, against real processes and real sockets.

- A request offered to a decode instance that freezes or dies before answering is placed again on
  a live one, or fails within the KV timeouts; nothing hangs, no KV block stays held.
- A send to a peer whose queue is full is counted and fails its request; it never blocks for long.
- The cluster's inboxes admit only holders of its CURVE keys: forged messages from a local process
  (Shutdown, InstanceDied, a KVPush naming a file to unlink, a TokenBatch ending a live stream) have
  no effect; inboxes are ipc sockets in a 0700 directory, no TCP port is open, /metrics shows no
  address, and a decode instance receives only transfers it issued.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import secrets
import signal
import stat
import threading
import time

import httpx
import pytest
import zmq

from serve_utils import start_server, wait_until
from tetriinfer.cluster import messages as msg
from tetriinfer.cluster.zmq_io import Inbox, Outboxes, Wire
from tetriinfer.config import CacheConfig, EngineConfig, FlipConfig, PolicyConfig
from tetriinfer.engine.serving import RequestState
from tetriinfer.sampling_params import SamplingParams

ARGS = ["--num-blocks", "256", "--chunk-size", "64", "--max-model-len", "512", "--policy", "paper"]


def complete(server, i: int, max_tokens: int = 8, timeout: float = 60) -> tuple[int, dict, float]:
    """(HTTP status, body, seconds) of one completion."""
    start = time.monotonic()
    r = httpx.post(f"{server.url}/v1/completions", timeout=timeout,
                   json={"model": "tiny", "prompt": f"request {i}", "max_tokens": max_tokens, "temperature": 0,
                         "ignore_eos": True})
    return r.status_code, r.json(), time.monotonic() - start


def complete_all(server, n: int, max_tokens: int = 8) -> list[tuple[int, dict, float]]:
    with cf.ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: complete(server, i, max_tokens), range(n)))


def kv_held(server) -> float:
    return server.metric_sum("tetriinfer_kv_blocks_used")


def decode_pids(server, n: int) -> list[int]:
    return [pid for role, pid in server.wait_for_instances(n).values() if role == "decode"]


# ---- item 3: an offer to a decode instance that freezes or dies ---------------------------------------
def test_requests_offered_to_a_frozen_then_killed_decode_instance_are_placed_again_and_none_hangs(tmp_path):
    """The issue's repro: SIGSTOP one of two decode instances, send 12 requests, SIGKILL it 1.5 s
    later. Before: 7 of 12 hung and the prefill instance kept 7 blocks."""
    with start_server([*ARGS, "--decode-instances", "2", "--kv-timeout", "5"], tmp_path) as server:
        frozen = decode_pids(server, 3)[0]
        os.kill(frozen, signal.SIGSTOP)
        with cf.ThreadPoolExecutor(1) as pool:
            batch = pool.submit(complete_all, server, 12)
            time.sleep(1.5)
            os.kill(frozen, signal.SIGKILL)
            results = batch.result(timeout=60)
        assert [status for status, _, _ in results] == [200] * 12, results
        assert all(body["usage"]["completion_tokens"] == 8 for _, body, _ in results)
        slowest = max(seconds for _, _, seconds in results)
        print(f"\n12 requests, one of two decode instances frozen then killed at 1.5 s: all served, "
              f"slowest {slowest:.2f} s")
        server.wait_until(lambda: server.metric_sum("tetriinfer_kv_redispatches_total") >= 1, 5,
                          "the offers to the frozen instance counted as taken back")
        server.wait_until(lambda: kv_held(server) == 0, 20, "every KV block freed")


def test_an_offer_to_a_frozen_decode_instance_is_taken_back_when_its_lease_lapses(tmp_path):
    """Frozen, not dead (the controller would wait 60 s): no KVHold renews the lease, so the prefill
    instance takes its offers back after --kv-timeout and the other decode instance serves them.
    Thawed, the frozen one drops the offers it was cancelled and serves again."""
    with start_server([*ARGS, "--decode-instances", "2", "--kv-timeout", "2", "--dead-after", "60"],
                      tmp_path) as server:
        frozen = decode_pids(server, 3)[0]
        os.kill(frozen, signal.SIGSTOP)
        try:
            results = complete_all(server, 8)
        finally:
            os.kill(frozen, signal.SIGCONT)
        assert [status for status, _, _ in results] == [200] * 8, results
        slowest = max(seconds for _, _, seconds in results)
        print(f"\n8 requests, one of two decode instances frozen: all served, slowest {slowest:.2f} s")
        assert slowest < 2 + 8, "taken back after the 2 s lease, not after the controller's 60 s"
        server.wait_until(lambda: server.metric_sum("tetriinfer_kv_redispatches_total") >= 1, 5,
                          "the offers to the frozen instance counted as taken back")
        server.wait_until(lambda: kv_held(server) == 0, 20, "the thawed instance to free what it reserved")
        time.sleep(4.5)  # the prefill instance avoids the frozen one for 2 x --kv-timeout, then offers to it again
        assert [status for status, _, _ in complete_all(server, 8)] == [200] * 8
        server.wait_until(lambda: kv_held(server) == 0, 20, "every KV block freed")


def test_with_its_only_decode_instance_frozen_a_request_fails_within_two_kv_timeouts_and_frees_its_kv(tmp_path):
    """Nowhere to go: the lease lapses (one timeout), then no decode instance is left to offer it to
    (a second one): a 503 the client may retry, and the prefill instance holds no block."""
    with start_server([*ARGS, "--kv-timeout", "2", "--dead-after", "60"], tmp_path) as server:
        frozen = decode_pids(server, 2)[0]
        os.kill(frozen, signal.SIGSTOP)
        try:
            results = complete_all(server, 3)
            server.wait_until(lambda: server.metric_sum("tetriinfer_kv_blocks_used", role="prefill") == 0, 10,
                              "the prefill instance to free the failed requests' KV")
        finally:
            os.kill(frozen, signal.SIGCONT)
        for status, body, seconds in results:
            assert status == 503 and "no decode instance" in body["error"]["message"], body
            assert 2 <= seconds < 2 * 2 + 4, seconds
        print(f"\nonly decode instance frozen: 503 after {max(s for _, _, s in results):.2f} s")
        server.wait_until(lambda: complete(server, 0)[0] == 200, 20, "serving again once thawed")
        server.wait_until(lambda: kv_held(server) == 0, 20, "every KV block freed")


# ---- item 9: forged messages from a local process ------------------------------------------------------
def unix_sockets(pid: int) -> set[str]:
    """Paths of the unix sockets process `pid` holds (its inbox among them), from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    with open("/proc/net/unix") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return {row[7] for row in rows if len(row) >= 8 and row[6] in inodes}


def listens_on_tcp(pid: int) -> bool:
    inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
              if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            if any(row.split()[3] == "0A" and row.split()[9] in inodes for row in f.readlines()[1:]):
                return True
    return False


def forge(address: str, *messages) -> None:
    """What any local process can do: a plain PUSH socket sending msgpack frames."""
    socket = zmq.Context.instance().socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 500)
    socket.connect(address)
    for message in messages:
        socket.send(msg.encode(message), zmq.NOBLOCK)
    socket.close()


def test_forged_messages_from_a_local_process_take_no_effect(tmp_path):
    canary = f"/dev/shm/tetriinfer-canary-{secrets.token_hex(4)}"
    with open(canary, "wb") as f:
        f.write(b"precious")
    try:
        with start_server([*ARGS], tmp_path) as server:
            pids = server.wait_for_instances(2)
            inboxes = unix_sockets(server.process.pid) | {p for _, pid in pids.values() for p in unix_sockets(pid)}
            ipc_dirs = {os.path.dirname(path) for path in inboxes if path.startswith("/")}
            assert len(ipc_dirs) == 1, inboxes
            assert stat.S_IMODE(os.stat(ipc_dirs.pop()).st_mode) == 0o700
            assert not any(listens_on_tcp(pid) for _, pid in pids.values())
            assert not any("ipc://" in key or "tcp://" in key for key in server.metrics())
            with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, json={
                    "model": "tiny", "prompt": "a long story", "max_tokens": 200, "temperature": 0,
                    "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}) as stream:  # the usage chunk only when asked
                lines = stream.iter_lines()
                first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
                sampling = SamplingParams(max_tokens=4)
                descriptor = {"transport": "shm", "shape": [1, 1, 1, 1], "dtype": "float32", "nbytes": 8,
                              "name": os.path.basename(canary)}
                for path in inboxes:
                    forge(f"ipc://{path}", msg.InstanceDied(0, "forged"), msg.InstanceDied(1, "forged"),
                          msg.TokenBatch(0, [msg.TokenDelta.ended(first["id"], "error", "forged")]),
                          msg.KVPush(RequestState(first["id"], None, [1], [2], [], sampling, 0.0, None), 0, 1 << 32 | 1,
                                     descriptor, 0.0),
                          msg.Shutdown())
                chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            finish = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
            assert finish[-1] == "length" and chunks[-1]["usage"]["completion_tokens"] == 200, chunks[-2:]
            assert complete(server, 0)[0] == 200
            assert server.instance_pids() == pids
            assert os.path.exists(canary)
            assert server.metric_sum("tetriinfer_kv_pushes_refused_total") == 0  # never got that far
    finally:
        os.unlink(canary)


def test_an_inbox_admits_only_holders_of_the_cluster_keys_and_caps_frame_size():
    wire, other = Wire.create(one_host=True), Wire.create(one_host=False)
    inbox = Inbox(wire, "127.0.0.1", max_message_bytes=4096)
    try:
        forge(inbox.address, msg.Shutdown())  # no CURVE
        stranger = zmq.Context.instance().socket(zmq.PUSH)  # CURVE, right server key, own client keys
        stranger.curve_serverkey = wire.public_key
        stranger.curve_publickey, stranger.curve_secretkey = zmq.curve_keypair()
        stranger.sndtimeo = 2000  # its handshake fails: between retries it has no pipe, and a PUSH would block
        stranger.connect(inbox.address)
        with contextlib.suppress(zmq.Again):
            stranger.send(msg.encode(msg.Shutdown()))
        Outboxes(other).send(inbox.address, msg.Shutdown())  # another cluster's keys
        Outboxes(wire).send(inbox.address, msg.Abort("x" * 8192))  # a key holder, beyond MAXMSGSIZE
        time.sleep(1.0)
        assert inbox.drain(timeout_ms=100) == []
        stranger.close(linger=0)
        ours = Outboxes(wire, zmq.Context())
        ours.send(inbox.address, msg.Abort("ok"))
        got = wait_until(lambda: inbox.drain(timeout_ms=100), 5, "the cluster's own message")
        assert got == [msg.Abort("ok")]
        ours.close()
    finally:
        inbox.close()
        wire.remove()


# ---- item 8: a full queue is a counted, bounded failure -------------------------------------------------
def test_sends_to_a_dead_peer_fail_counted_and_bounded_once_its_queue_is_full():
    wire = Wire.create(one_host=True)
    address = wire.address("127.0.0.1", 4242)  # nobody binds it: a peer that died
    out = Outboxes(wire, zmq.Context(), high_water_mark=4, send_timeout_s=0.2)
    inbox = None
    try:
        timings = []
        for i in range(50):
            start = time.monotonic()
            timings.append((out.send(address, msg.Abort(str(i))), time.monotonic() - start))
        sent = [ok for ok, _ in timings]
        assert sent[:4] == [True] * 4 and not any(sent[4:]), sent
        assert out.failures == 46
        assert 0.15 < timings[4][1] < 1.0  # the first failure waits the timeout once
        assert max(seconds for _, seconds in timings[5:]) < 0.05  # then fails at once
        inbox = Inbox(wire, "127.0.0.1", port=4242)  # the peer is back: what was queued arrives, in order
        got = wait_until(lambda: inbox.drain(timeout_ms=100), 5, "the queued messages")
        got += wait_until(lambda: [m for _ in range(5) for m in inbox.drain(timeout_ms=50)] or [None], 5, "rest")
        assert [m.request_id for m in got if m is not None] == ["0", "1", "2", "3"]
        assert out.send(address, msg.Abort("again")) and out.failures == 46
    finally:
        out.close()
        if inbox is not None:
            inbox.close()
        wire.remove()


def run_instance_in_thread(wire: Wire, role: str, api_address: str, **changes):
    """A real Instance (tiny model) running its own loop in a thread of this process."""
    from tetriinfer.cluster.instance import Instance, InstanceConfig

    engine = EngineConfig(max_model_len=256, cache=CacheConfig(num_blocks=64))
    config = InstanceConfig(0, role, engine, PolicyConfig(), FlipConfig(), api_address, api_address, world_size=2,
                            kv_timeout_s=5.0, predictor="none", torch_threads=1, wire=wire, **changes)
    instance = Instance(config)
    thread = threading.Thread(target=instance.serve, daemon=True)
    return instance, thread


def test_an_instance_that_cannot_reach_the_api_ends_its_requests_and_frees_their_kv():
    wire = Wire.create(one_host=True)
    dead_api = wire.address("127.0.0.1")
    instance, thread = run_instance_in_thread(wire, "colocated", dead_api)
    instance.out.close()
    instance.out = Outboxes(wire, high_water_mark=2, send_timeout_s=0.05)  # full after two batches
    thread.start()
    ours = Outboxes(wire, zmq.Context())
    try:
        for i in range(4):
            ours.send(instance.inbox.address, msg.Submit(f"r{i}", [1, 2, 3, 4], SamplingParams(max_tokens=200,
                                                                                            ignore_eos=True)))
        wait_until(lambda: instance.out.failures > 0 and not instance.engine.requests, 30,
                   "the requests ended once their tokens could not be sent")
        assert instance.engine.block_manager.num_free_blocks == instance.capacity_blocks
    finally:
        ours.send(instance.inbox.address, msg.Shutdown())
        thread.join(10)
        wire.remove()
    assert not thread.is_alive()


def test_a_decode_instance_refuses_a_kv_push_it_never_issued_even_from_a_key_holder():
    wire = Wire.create(one_host=True)
    api = Inbox(wire, "127.0.0.1")
    canary = f"/dev/shm/tikv{wire.cluster_id}_1_{1 << 32 | 1:x}"  # even a name of the cluster's own form
    with open(canary, "wb") as f:
        f.write(b"\0" * 8)
    instance, thread = run_instance_in_thread(wire, "decode", api.address)
    thread.start()
    ours = Outboxes(wire, zmq.Context())
    try:
        descriptor = {"transport": "shm", "shape": [1, 1, 1, 2], "dtype": "float32", "nbytes": 16,
                      "name": os.path.basename(canary)}
        state = RequestState("r", None, [1], [2], [], SamplingParams(), 0.0, None)
        ours.send(instance.inbox.address, msg.KVPush(state, 1, 1 << 32 | 1, descriptor, 0.0))
        wait_until(lambda: instance.kv_pushes_refused == 1, 10, "the push refused")
        assert os.path.exists(canary) and not instance._receives
    finally:
        ours.send(instance.inbox.address, msg.Shutdown())
        thread.join(10)
        api.close()
        os.unlink(canary)
        wire.remove()
    assert not thread.is_alive()
