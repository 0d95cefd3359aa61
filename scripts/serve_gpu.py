"""Serve a model with `tetriinfer serve` on this machine's GPU(s) and load it with `bench serve`.

    PYTHONPATH=. python scripts/serve_gpu.py --out results/ \
        --system "1P+1D=--prefill-instances 1 --decode-instances 1 --device cuda:0 --num-blocks 8000" \
        --system "sarathi=--mode colocated --instances 1 --device cuda:0"

Each --system is NAME=FLAGS added to the common flags (model, dtype). For each: start the server,
wait for /health, send the workload, read /metrics (KV transfer bytes and seconds), stop it. Writes
serve-gpu.json (summaries, transfer stats, server logs' tails) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import time
from pathlib import Path

from tetriinfer.bench.metrics import format_table, summarize
from tetriinfer.bench.serve_client import run_load_sync
from tetriinfer.bench.server_process import ServerProcess
from tetriinfer.bench.workload import build_specs


def run_system(name: str, flags: list[str], specs, args, out: Path) -> dict:
    log = out / f"server-{name.replace('/', '_')}.log"
    flags = ["--model", args.model, "--dtype", args.dtype, "--predictor", "none", "--chunk-size", str(args.chunk_size),
             *flags]
    print("$ tetriinfer serve", " ".join(flags), flush=True)
    started = time.monotonic()
    server = ServerProcess.start(flags, log, env={"TETRIINFER_LOG": "WARNING"}, timeout_s=args.startup_timeout)
    try:
        startup_s = time.monotonic() - started
        print(f"{name}: healthy after {startup_s:.0f} s", flush=True)
        load = run_load_sync(server.url, specs, model=args.model, vocab_size=args.vocab_size, progress=False)
        time.sleep(1.0)
        transfer = {k: server.metric_sum(f"tetriinfer_kv_transfer_{k}_total") / 2 for k in ("bytes", "seconds")}
        transfer["count"] = server.metric_sum("tetriinfer_kv_transfers_total") / 2
        transfer["failures"] = server.metric_sum("tetriinfer_kv_transfer_failures_total")
    finally:
        server.stop(60)
    finish = max((r.finish_s for r in load.records), default=0.0)
    summary = summarize(load.records, {"server": finish}, start_s=0.0) if load.records else None
    return {"flags": flags, "startup_s": startup_s, "summary": dataclasses.asdict(summary) if summary else None,
            "records": [dataclasses.asdict(r) for r in sorted(load.records, key=lambda r: r.request_id)],
            "failures": load.failures_by_reason(), "kv_transfer": transfer, "wall_s": load.wall_s,
            "log_tail": log.read_text()[-2000:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--system", action="append", required=True, help="NAME=FLAGS")
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--workload", default="mixed")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--rate", type=float, default=8.0)
    p.add_argument("--chunk-size", type=int, default=512, help="passed to every system")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--vocab-size", type=int, default=128000)
    p.add_argument("--startup-timeout", type=float, default=300)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = build_specs(args.workload, args.num_requests, rate=args.rate, seed=0, max_total_tokens=args.max_model_len)
    results = {"commit": os.environ.get("TETRIINFER_COMMIT", "unknown"), "device": _device(), "args": vars(args),
               "systems": {}}
    for item in args.system:
        name, _, flags = item.partition("=")
        try:
            results["systems"][name] = run_system(name, shlex.split(flags), specs, args, out)
        except Exception as e:  # noqa: BLE001 - keep the other systems' results
            results["systems"][name] = {"error": str(e)}
            print(f"{name}: FAILED {e}", flush=True)
        (out / "serve-gpu.json").write_text(json.dumps(results, indent=1))
    summaries = {n: r["summary"] for n, r in results["systems"].items() if r.get("summary")}
    if summaries:
        from tetriinfer.bench.metrics import LatencyStats, Summary

        def load_summary(d):
            d = dict(d)
            for k in ("ttft", "tpot", "jct"):
                d[k] = LatencyStats(**d[k])
            return Summary(**d)

        print(format_table({n: load_summary(s) for n, s in summaries.items()}))
    for n, r in results["systems"].items():
        t = r.get("kv_transfer")
        if t and t["count"]:
            print(f"{n}: {t['count']:.0f} KV transfers, {t['bytes'] / 1e9:.2f} GB, "
                  f"{t['bytes'] / t['seconds'] / 1e9:.2f} GB/s reservation-to-landing, {t['failures']:.0f} failures; "
                  f"startup {r['startup_s']:.0f} s; failures {r['failures']}")


def _device() -> str:
    try:
        return subprocess.check_output(["nvidia-smi", "-L"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
