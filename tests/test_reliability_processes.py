"""Faults against real `tetriinfer serve` processes (tiny model, CPU): the supervisor brings back a
killed or frozen controller and instance, SIGTERM drains and then leaves nothing behind, children
die with a killed API process, and requests beyond --max-waiting-requests get a 429."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

from serve_utils import start_server, wait_until
from tetriinfer.bench.server_process import process_running as running
from test_ray_launcher import local_ray  # noqa: F401 (a fixture)
from tetriinfer.cluster.supervisor import SupervisorConfig, _Component

ARGS = ["--num-blocks", "256", "--chunk-size", "64", "--max-model-len", "512", "--dead-after", "2"]


def controller_pid(server) -> int:
    instances = {pid for _, pid in server.instance_pids().values()}
    (pid,) = server.cluster_pids() - instances
    return pid


def complete(server, max_tokens: int = 4, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", timeout=timeout,
                      json={"model": "tiny", "prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True})


def health(server) -> int:
    return httpx.get(f"{server.url}/health", timeout=5).status_code


def serving(server) -> bool:
    return health(server) == 200 and complete(server).status_code == 200


def restarts(server, what: str) -> float:
    return server.metric_sum("tetriinfer_restarts_total", what=what)


def assert_no_kv_held(server) -> None:
    server.wait_until(lambda: server.metric_sum("tetriinfer_kv_blocks_used") == 0, 20, "every KV block freed")


def kv_segments() -> set[str]:
    """The KV shared-memory segments on this host (cluster.kv.shm names them tikv<cluster>_...)."""
    return {name for name in os.listdir("/dev/shm") if name.startswith("tikv")} if os.path.isdir("/dev/shm") else set()


# ---- the controller ----------------------------------------------------------------------------------
def test_a_killed_or_frozen_controller_is_restarted_while_new_requests_get_a_fast_503(tmp_path):
    with start_server(ARGS, tmp_path) as server:
        assert restarts(server, "controller") == 0
        with cf.ThreadPoolExecutor(1) as pool:
            streaming = pool.submit(complete, server, 400)  # routed before the kill: streams on
            server.wait_until(lambda: server.metric_sum("tetriinfer_num_running") > 0, 20, "a running request")
            old = controller_pid(server)
            os.kill(old, signal.SIGKILL)
            server.wait_until(lambda: health(server) == 503, 5, "/health to say 503")
            started = time.monotonic()
            r = complete(server)
            assert time.monotonic() - started < 1.0  # fails fast, does not hang
            if r.status_code != 200:  # unless the controller was back already
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["message"] == "the controller is restarting"
            server.wait_until(lambda: serving(server), 20, "the restarted controller to serve")
            assert streaming.result(60).json()["usage"]["completion_tokens"] == 400
        assert not running(old) and controller_pid(server) != old
        assert restarts(server, "controller") == 1

        frozen = controller_pid(server)
        os.kill(frozen, signal.SIGSTOP)  # alive but silent: killed after --dead-after
        server.wait_until(lambda: health(server) == 503, 5, "/health to say 503 for a frozen controller")
        server.wait_until(lambda: serving(server), 20, "a new controller in place of the frozen one")
        assert not running(frozen) and restarts(server, "controller") == 2
        assert server.metric_sum("tetriinfer_instances") == 2
        assert_no_kv_held(server)


# ---- instances ---------------------------------------------------------------------------------------
def test_a_killed_or_frozen_instance_is_replaced_with_its_id_and_role_and_serves_again(tmp_path):
    # The paper policy: every request decodes on the decode instance, so serving proves it is back.
    with start_server([*ARGS, "--policy", "paper"], tmp_path) as server:
        before = server.wait_for_instances(2)
        for fault, what in ((signal.SIGKILL, "killed"), (signal.SIGSTOP, "frozen")):
            victim = before[1][1]
            assert before[1][0] == "decode"
            os.kill(victim, fault)
            after = server.wait_until(
                lambda: (p := server.instance_pids()).get(1, (None, victim))[1] != victim and p,
                30, f"a new process for the {what} decode instance")
            assert after[1][0] == "decode" and after[0] == before[0]  # same id and role; the other untouched
            server.wait_until(lambda: not running(victim), 10, f"the {what} process to be reaped")
            server.wait_until(lambda: serving(server), 20, "requests served through the new decode instance")
            assert server.metric_sum("tetriinfer_dead_instances") == 0
            before = after
        assert restarts(server, "instance") == 2 and restarts(server, "controller") == 0
        assert_no_kv_held(server)


def test_a_request_with_no_output_for_the_idle_timeout_fails_instead_of_hanging(tmp_path):
    # The decode instance freezes and the controller is told to wait a minute: the client's own
    # deadline ends the requests; once the instance thaws, the aborts free its KV.
    with start_server([*ARGS[:-2], "--dead-after", "60", "--request-idle-timeout", "2", "--policy", "paper"],
                      tmp_path) as server:
        decode = server.wait_for_instances(2)[1][1]
        with cf.ThreadPoolExecutor(2) as pool:
            busy = [pool.submit(complete, server, 480) for _ in range(2)]
            server.wait_until(lambda: server.metric_sum("tetriinfer_num_running", instance=1) == 2, 20,
                              "both requests decoding")
            os.kill(decode, signal.SIGSTOP)
            started = time.monotonic()
            try:
                answers = [f.result(30) for f in busy]
            finally:
                os.kill(decode, signal.SIGCONT)
        assert time.monotonic() - started < 2 + 3
        for r in answers:
            assert r.status_code == 500 and r.json()["error"]["message"] == "no output for 2 s"
        assert_no_kv_held(server)
        assert serving(server)


# ---- shutdown ----------------------------------------------------------------------------------------
def open_unread_stream(server, max_tokens: int) -> socket.socket:
    """A streaming request whose response is never read."""
    url = urlparse(server.url)
    body = ('{"model": "tiny", "prompt": "never read", "stream": true, "ignore_eos": true, '
            f'"max_tokens": {max_tokens}}}').encode()
    sock = socket.create_connection((url.hostname, url.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def stream_events(server, max_tokens: int) -> list[str]:
    """The `data:` payloads of a streamed completion, read to the end."""
    body = {"model": "tiny", "prompt": "read to the end", "stream": True, "ignore_eos": True, "max_tokens": max_tokens}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        return [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]


def test_sigterm_drains_in_flight_requests_then_leaves_no_process_or_shared_memory(tmp_path):
    shm_before = kv_segments()
    server = start_server(["--num-blocks", "512", "--chunk-size", "64", "--max-model-len", "4096",
                           "--shutdown-timeout", "4"], tmp_path)
    try:
        children = server.cluster_pids()
        assert len(children) == 3
        with cf.ThreadPoolExecutor(2) as pool:
            short = pool.submit(complete, server, 60)
            long = pool.submit(stream_events, server, 4000)  # runs past the drain: ended by it
            unread = open_unread_stream(server, 4000)  # the same, and nobody reads it
            server.wait_until(lambda: server.metric_sum("tetriinfer_requests_running") == 3, 20, "all running")
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            assert short.result(30).json()["usage"]["completion_tokens"] == 60  # drained, not cut
            events = long.result(30)
            assert events[-1] == "[DONE]" and "server shutting down" in events[-2], events[-2:]
            assert server.process.wait(30) == 0
        took = time.monotonic() - started
        assert took < 4 + 10, took  # the unread stream holds it no longer than --shutdown-timeout
        unread.close()
        wait_until(lambda: not any(running(p) for p in children), 10,
                   "every child to exit")
        assert kv_segments() - shm_before == set()
    finally:
        server.stop()


def test_children_exit_on_their_own_when_the_api_process_is_killed(tmp_path):
    server = start_server(ARGS, tmp_path)
    try:
        children = server.cluster_pids()
        assert len(children) == 3
        server.process.kill()  # no cleanup at all in the API process
        server.process.wait(10)
        wait_until(lambda: not any(running(p) for p in children), 15, "the orphaned children to exit")
    finally:
        server.stop()
        for pid in children:  # never leave them behind, even if the test failed
            if running(pid):
                os.kill(pid, signal.SIGKILL)


# ---- overload ----------------------------------------------------------------------------------------
def test_requests_beyond_max_waiting_get_a_429_with_retry_after_and_an_openai_error(tmp_path):
    with start_server([*ARGS, "--max-waiting-requests", "1"], tmp_path) as server:
        prompt = "a long prompt " * 30  # several chunks: requests wait for their first token a while

        def one(i: int) -> httpx.Response:
            return httpx.post(f"{server.url}/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": f"{i} {prompt}", "max_tokens": 8, "stream": i % 2 == 0})

        with cf.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(16)))
        rejected = [r for r in answers if r.status_code == 429]
        assert rejected and all(r.status_code in (200, 429) for r in answers), [r.status_code for r in answers]
        for r in rejected:
            assert r.headers["retry-after"] == "1"
            error = r.json()["error"]
            assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
            assert "--max-waiting-requests" in error["message"]
        assert server.metric_sum("tetriinfer_requests_total", outcome="rejected") == len(rejected)
        assert complete(server).status_code == 200  # nothing was left counted as waiting
        assert_no_kv_held(server)


@pytest.mark.parametrize("flag, value", [("--max-waiting-requests", "0"), ("--shutdown-timeout", "-1"),
                                         ("--request-idle-timeout", "0")])
def test_bad_reliability_flags_are_refused_before_anything_starts(capsys, flag, value):
    from tetriinfer.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", flag, value])
    assert exit_info.value.code == 2
    assert "max_waiting_requests must be >= 1, shutdown_timeout_s >= 0" in capsys.readouterr().err


# ---- the restart backoff -----------------------------------------------------------------------------
def test_restarts_back_off_while_a_process_keeps_dying_and_start_over_once_it_stays_up():
    cfg = SupervisorConfig(backoff_first_s=0.5, backoff_max_s=4.0, stable_after_s=60.0)
    c, now, delays = _Component(), 0.0, []
    for _ in range(6):
        delays.append(c.schedule(now, cfg))
        c.started(now + delays[-1])
        now += delays[-1] + 1.0  # died a second after each start
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert c.schedule(now + 61.0, cfg) == 0.0  # up for longer than stable_after_s: immediate again


# ---- on Ray --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_on_ray_a_killed_instance_is_replaced_by_a_new_actor_and_serves_again(local_ray, tmp_path):  # noqa: F811
    _, address = local_ray
    with start_server(["--launcher", "ray", "--ray-address", address, "--num-blocks", "128", "--torch-threads", "1",
                       "--dead-after", "2", "--policy", "paper"], tmp_path) as server:
        before = server.wait_for_instances(2)
        os.kill(before[1][1], signal.SIGKILL)
        after = server.wait_until(lambda: (p := server.instance_pids()).get(1, (None, before[1][1]))[1]
                                  != before[1][1] and p, 60, "a new actor for the killed decode instance")
        assert after[1][0] == "decode"
        server.wait_until(lambda: serving(server), 30, "requests served through the new decode instance")
        assert restarts(server, "instance") == 1
