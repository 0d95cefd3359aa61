"""A request the controller cannot route gets a clear 503 quickly; it never hangs.

The API process's cluster client (`tetriinfer/cluster/client.py`) connects to the controller
lazily and queues its Submit without waiting, so a controller that is down is not noticed at send
time. What bounds a request instead: a controller that died, or that the supervisor has given up
on, makes new requests fail at once (the supervisor calls `controller_lost`); one that froze (alive,
silent) is found out `--dead-after` seconds after its last heartbeat, and the requests it holds
unrouted then end with the same 503 (the client's own route timeout, 10 s, is the last resort).
Real processes (tiny model, CPU); the killed-controller case is in test_reliability_processes.py.
"""

from __future__ import annotations

import os
import signal
import time

import httpx

from serve_utils import start_server

DEAD_AFTER_S = 2.0
ARGS = ["--num-blocks", "256", "--chunk-size", "64", "--max-model-len", "512", "--predictor", "none",
        "--dead-after", str(DEAD_AFTER_S)]


def complete(server, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", timeout=timeout,
                      json={"model": "tiny", "prompt": "hello", "max_tokens": 4, "ignore_eos": True})


def controller_pid(server) -> int:
    instances = {pid for _, pid in server.instance_pids().values()}
    (pid,) = server.cluster_pids() - instances
    return pid


def test_a_request_sent_to_a_frozen_controller_gets_a_503_within_dead_after(tmp_path):
    with start_server(ARGS, tmp_path) as server:
        assert complete(server).status_code == 200
        frozen = controller_pid(server)
        os.kill(frozen, signal.SIGSTOP)  # alive but silent; the supervisor kills it after --dead-after
        started = time.monotonic()
        r = complete(server, timeout=30)
        waited = time.monotonic() - started
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"] == {"message": "the controller is restarting", "type": "server_error",
                                     "param": None, "code": "service_unavailable"}
        assert waited < DEAD_AFTER_S + 2.0, f"the 503 took {waited:.1f} s"  # not the 10 s route timeout
        assert waited > 0.5, "answered before the freeze could be noticed: this did not test the wait"
        # While it is being replaced, new requests fail at once; then the new controller serves.
        def back() -> bool:
            t = time.monotonic()
            r = complete(server, timeout=30)
            assert r.status_code in (200, 503) and time.monotonic() - t < DEAD_AFTER_S + 2.0, r.text
            return r.status_code == 200
        server.wait_until(back, 30, "the restarted controller to serve")
