"""Faults, bad input and a soak against real `tetriinfer serve` processes (tiny model, CPU): what the
client sees, how long until it sees it, and the KV blocks held afterwards. The numbers in
docs/reliability.md come from this script.

    PYTHONPATH=. python scripts/reliability_probe.py --out /tmp/probe.json [--soak 2000 --concurrency 600]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tetriinfer.bench.server_process import ServerProcess, process_running as running

ARGS = ["--num-blocks", "256", "--chunk-size", "64", "--max-model-len", "512", "--dead-after", "2"]
ENV = {"OMP_NUM_THREADS": "1", "TETRIINFER_LOG": "WARNING"}
ROWS: list[dict] = []


def start(flags: list[str]) -> ServerProcess:
    return ServerProcess.start(flags, Path(tempfile.mkdtemp()) / "serve.log", env=ENV)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def post(server, body, timeout: float = 60, **kw) -> tuple[int, str, float]:
    """(status, error message or finish reason, seconds); `kw` goes to httpx (content=, headers=)."""
    t = time.monotonic()
    try:
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=timeout, **kw)
    except httpx.HTTPError as e:
        return -1, type(e).__name__, time.monotonic() - t
    try:
        data = r.json()
        what = data["error"]["message"] if "error" in data else data["choices"][0]["finish_reason"]
    except (ValueError, KeyError, IndexError):
        what = r.text[:80]
    return r.status_code, what, time.monotonic() - t


def req(max_tokens: int = 4, prompt: str = "hello", **extra) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, **extra}


def kv_after(server, timeout_s: float = 20) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        used = server.metric_sum("tetriinfer_kv_blocks_used")
        if used == 0 or time.monotonic() > deadline:
            return used
        time.sleep(0.2)


def until(predicate, timeout_s: float) -> float:
    """Seconds until predicate() holds (polled), or -1."""
    t = time.monotonic()
    while time.monotonic() - t < timeout_s:
        try:
            if predicate():
                return time.monotonic() - t
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return -1.0


def serving(server) -> bool:
    return httpx.get(f"{server.url}/health", timeout=5).status_code == 200 and post(server, req())[0] == 200


def row(fault: str, client_sees: str, to_error: float | None, recovered: float | None, kv: float) -> None:
    ROWS.append({"fault": fault, "client sees": client_sees, "time to error (s)": to_error,
                 "back (s)": recovered, "KV blocks held after": kv})
    print(json.dumps(ROWS[-1]), flush=True)


def summary(results: list[tuple[int, str, float]]) -> str:
    seen: dict[str, int] = {}
    for status, what, _ in results:
        key = f"{status} {what}"
        seen[key] = seen.get(key, 0) + 1
    return "; ".join(f"{n}x {k}" for k, n in seen.items())


# ---- faults --------------------------------------------------------------------------------------
def controller_faults(server) -> None:
    for fault in (signal.SIGKILL, signal.SIGSTOP):
        instances = {pid for _, pid in server.instance_pids().values()}
        (controller,) = server.cluster_pids() - instances
        with cf.ThreadPoolExecutor(2) as pool:
            routed = pool.submit(post, server, req(300))
            until(lambda: server.metric_sum("tetriinfer_num_running") > 0, 10)
            t = time.monotonic()
            os.kill(controller, fault)
            new = pool.submit(post, server, req())
            status, what, took = new.result()
            back = until(lambda: serving(server), 30)
            name = "kill -9" if fault == signal.SIGKILL else "SIGSTOP (frozen)"
            row(f"controller {name}; one request streaming, one sent right after",
                f"new: {status} {what}; streaming: {summary([routed.result()])}", round(took, 2),
                round(time.monotonic() - t, 2) if back >= 0 else None, kv_after(server))


def post_ended(server, body) -> tuple[int, str, float, float]:
    """post(), and the monotonic time it ended."""
    return (*post(server, body), time.monotonic())


def instance_faults(server, fault: int, victim_role: str) -> None:
    before = server.instance_pids()
    victim = next(i for i, (role, _) in before.items() if role == victim_role)
    with cf.ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(post_ended, server, req(400, f"story {i}")) for i in range(4)]
        until(lambda: server.metric_sum("tetriinfer_num_running", instance=victim) > 0
              or server.metric_sum("tetriinfer_num_waiting", instance=victim) > 0, 20)
        t = time.monotonic()
        os.kill(before[victim][1], fault)
        results = [f.result() for f in busy]
    failed = [end - t for status, _, _, end in results if status != 200]
    old_pid = before[victim][1]
    back = until(lambda: server.instance_pids().get(victim, (None, old_pid))[1] != old_pid and serving(server), 60)
    name = "kill -9" if fault == signal.SIGKILL else "SIGSTOP (frozen)"
    row(f"{victim_role} instance {name}; 4 requests of 400 tokens running", summary([r[:3] for r in results]),
        round(max(failed), 2) if failed else None, round(time.monotonic() - t, 2) if back >= 0 else None,
        kv_after(server))


def disconnect(server) -> None:
    with httpx.stream("POST", f"{server.url}/v1/completions", json=req(400, stream=True), timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 5:
                break
    row("client disconnects mid-stream", "(gone)", None, None, kv_after(server))


BAD_INPUT = [
    ("JSON nested 100,000 deep", dict(content="[" * 100_000 + "]" * 100_000)),
    ("lone surrogate in the prompt", dict(content=r'{"model": "tiny", "prompt": "hi \ud800"}')),
    ("seed = 2**70", dict(json=req(seed=2**70))),
    ("top_k = 2**70, streaming", dict(json=req(top_k=2**70, stream=True))),
    ("temperature NaN", dict(content='{"model": "tiny", "prompt": "hi", "temperature": NaN}')),
    ("top_p 1e-50", dict(json=req(top_p=1e-50))),
    ("1,000,000 stop_token_ids", dict(json=req(stop_token_ids=[1] * 1_000_000))),
    ("50 MB body", dict(content=b'{"prompt": "' + b"a" * 50_000_000 + b'"}')),
    ("text/plain body", dict(content=json.dumps(req()), headers={"content-type": "text/plain"})),
    ("unknown model", dict(json={**req(), "model": "gpt-9"})),
    ("prompt + max_tokens beyond the context", dict(json=req(600))),
]


def bad_input(server) -> None:
    for name, kw in BAD_INPUT:
        body = kw.pop("json", None)
        status, what, took = post(server, body, headers=kw.pop("headers", {"content-type": "application/json"}), **kw)
        row(name, f"{status} {what[:70]}", round(took, 3), None, kv_after(server))


def overload() -> None:
    server = start([*ARGS, "--max-waiting-requests", "4"])
    try:
        with cf.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda i: post(server, req(8, f"{i} " + "long prompt " * 30)), range(32)))
        rejected = sorted(r[2] for r in results if r[0] == 429)  # each one's whole round trip
        row("32 at once, --max-waiting-requests 4", summary(results),
            round(rejected[len(rejected) // 2], 3) if rejected else None, None, kv_after(server))
    finally:
        server.stop()


def shutdown(kind: int) -> None:
    server = start([*ARGS, "--max-model-len", "4096", "--num-blocks", "512", "--shutdown-timeout", "5"])
    kids = server.cluster_pids()
    with cf.ThreadPoolExecutor(2) as pool:
        short = pool.submit(post, server, req(60))
        long = pool.submit(post, server, req(4000, "long"))
        until(lambda: server.metric_sum("tetriinfer_requests_running") == 2, 20)
        t = time.monotonic()
        server.process.send_signal(kind)
        server.process.wait(60)
        exited = time.monotonic() - t
        gone = until(lambda: not any(running(p) for p in kids), 30)
        results = [short.result(), long.result()]
    leftovers = [p for p in kids if running(p)]
    name = "SIGTERM to the API process (--shutdown-timeout 5)" if kind == signal.SIGTERM else \
        "kill -9 of the API process"
    row(name, f"{summary(results)}; children left: {len(leftovers)}; exit after {exited:.1f} s",
        None, round(exited + max(gone, 0), 2), 0.0)
    for p in leftovers:
        os.kill(p, signal.SIGKILL)


# ---- soak ----------------------------------------------------------------------------------------
async def _soak(url: str, n: int, concurrency: int) -> dict[int, int]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    counts: dict[int, int] = {}
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=600) as session:
        async def one(i: int) -> None:
            async with gate:
                try:
                    r = await session.post(f"{url}/v1/completions", json=req(8 + i % 9, f"soak {i} " * (1 + i % 7),
                                                                              stream=i % 2 == 0))
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1
            counts[status] = counts.get(status, 0) + 1

        await asyncio.gather(*(one(i) for i in range(n)))
    return counts


def soak(n: int, concurrency: int, rounds: int) -> list[dict]:
    """`rounds` rounds of `n` requests, `concurrency` at a time; RSS (MB) of the API process and of
    each child before and after each round."""
    server = start(["--num-blocks", "1024", "--chunk-size", "64", "--max-model-len", "512"])
    try:
        procs = [server.process.pid, *sorted(server.cluster_pids())]
        asyncio.run(_soak(server.url, 50, 50))  # warm up
        out = []
        for _ in range(rounds):
            before = [round(rss_mb(p)) for p in procs]
            t = time.monotonic()
            counts = asyncio.run(_soak(server.url, n, concurrency))
            out.append({"requests": n, "concurrency": concurrency, "seconds": round(time.monotonic() - t, 1),
                        "statuses": counts, "rss_mb_before": before, "rss_mb_after": [round(rss_mb(p)) for p in procs],
                        "kv_blocks_after": kv_after(server)})
            print(json.dumps(out[-1]), flush=True)
        return out
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write the rows (and the soak) as JSON here")
    p.add_argument("--soak", type=int, default=2000, help="requests in the soak (0: no soak)")
    p.add_argument("--concurrency", type=int, default=600)
    p.add_argument("--soak-rounds", type=int, default=2, help="rounds of --soak requests (RSS after each)")
    args = p.parse_args()
    server = start([*ARGS, "--policy", "paper"])
    try:
        controller_faults(server)
        instance_faults(server, signal.SIGKILL, "decode")
        instance_faults(server, signal.SIGSTOP, "decode")
        instance_faults(server, signal.SIGKILL, "prefill")
        disconnect(server)
        bad_input(server)
        restarts = {what: server.metric_sum("tetriinfer_restarts_total", what=what) for what in ("controller", "instance")}
        print("restarts", restarts, flush=True)
    finally:
        server.stop()
    overload()
    shutdown(signal.SIGTERM)
    shutdown(signal.SIGKILL)
    soaked = soak(args.soak, args.concurrency, args.soak_rounds) if args.soak else None
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": ROWS, "soak": soaked}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
