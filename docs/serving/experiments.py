"""Reproduce the measurements of docs/serving.md on this machine's CPU with the tiny model.

    python docs/serving/experiments.py profile   # step-time profile of the tiny model on one CPU thread
    python docs/serving/experiments.py compare   # real servers vs the simulator on one workload
    python docs/serving/experiments.py flip      # how long an instance flip takes
    python docs/serving/experiments.py all

Each part writes its raw results as JSON next to this file and prints markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROFILE = HERE / "profile-cpu-tiny.json"
LOGS = Path(tempfile.gettempdir())  # server logs
SERVER_FLAGS = ["--chunk-size", "256", "--max-model-len", "2048", "--num-blocks", "8192", "--torch-threads", "1",
                "--predictor", "none"]
# (name, serve flags, simulator system, simulated instance counts)
SYSTEMS = [
    ("tetriinfer 1P+1D", ["--prefill-instances", "1", "--decode-instances", "1"], "tetriinfer", dict(num_prefill=1, num_decode=1)),
    ("sarathi x2", ["--mode", "colocated", "--instances", "2", "--baseline", "sarathi"], "sarathi", dict(num_instances=2)),
    ("vllm x2", ["--mode", "colocated", "--instances", "2", "--baseline", "vllm"], "vllm", dict(num_instances=2)),
]
WORKLOAD = dict(workload="mixed", num_requests=80, rate=1.5, seed=0, max_total_tokens=2048)


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("TETRIINFER_COMMIT", "unknown")


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TETRIINFER_LOG="WARNING")


# ---- profile --------------------------------------------------------------------------------------
def profile() -> None:
    cmd = [sys.executable, "-m", "tetriinfer.cli", "profile", "--model", "tiny", "--device", "cpu",
           "--chunk-tokens", "32,64,128,256,512,1024,2048", "--context-tokens", "0,512,1536",
           "--batch-sizes", "1,4,16,32,64", "--context-per-seq", "64,512,1536", "--repeats", "5",
           "--num-blocks", "8192", "--out", str(PROFILE), "--plot", str(HERE / "profile-cpu-tiny.png")]
    print("$ OMP_NUM_THREADS=1", " ".join(cmd[2:]))
    subprocess.run(cmd, check=True, env=env(), cwd=ROOT)


# ---- a server in a subprocess ----------------------------------------------------------------------
def start(flags: list[str], log: Path):
    from tetriinfer.bench.server_process import ServerProcess

    return ServerProcess.start(flags, log, env=env())


# ---- real vs simulated -------------------------------------------------------------------------------
def compare() -> None:
    from tetriinfer.bench.report import plot_distributions
    from tetriinfer.bench.serve_client import run_load_sync
    from tetriinfer.bench.workload import build_specs
    from tetriinfer.config import ClusterConfig, ClusterShape, EngineSchedulerConfig, PolicyConfig, SimConfig
    from tetriinfer.sim.cluster import simulate
    from tetriinfer.sim.cost import TableCostModel

    specs = build_specs(WORKLOAD["workload"], WORKLOAD["num_requests"], rate=WORKLOAD["rate"], seed=WORKLOAD["seed"],
                        max_total_tokens=WORKLOAD["max_total_tokens"])
    results = {"commit": commit(), "workload": WORKLOAD, "server_flags": SERVER_FLAGS, "systems": {}}
    link = None
    curves = {}
    for name, flags, system, shape in SYSTEMS:
        server = start([*flags, *SERVER_FLAGS], LOGS / "tetriinfer-serve-compare.log")
        try:
            load = run_load_sync(server.url, specs, model="tiny", progress=True)
            time.sleep(1.0)  # the last stats reach /metrics
            counters = server.kv_counters()
            transfer = {"bytes": counters["bytes"], "seconds": counters["seconds"], "transfers": counters["count"]}
        finally:
            server.stop()
        if load.failures:
            raise RuntimeError(f"{name}: {len(load.failures)} requests failed: {load.failures_by_reason()}")
        instances = shape.get("num_instances") or shape["num_prefill"] + shape["num_decode"]
        real = load.summary(instances)
        if transfer["seconds"] > 0:
            link = transfer["bytes"] * 8 / transfer["seconds"] / 1e9
        cost = TableCostModel.from_file(PROFILE, **({"link_gbps": link} if link else {}))
        cluster = ClusterConfig(system=system, shape=ClusterShape(**shape), gpu="h100", model="tiny")
        sim = simulate(specs, SimConfig(cluster, PolicyConfig(), scheduler=EngineSchedulerConfig(chunk_size=256)), cost)
        results["systems"][name] = {"real": dataclasses.asdict(real), "sim": dataclasses.asdict(sim.summary()),
                                    "kv_transfer": transfer}
        curves[f"{name} real"], curves[f"{name} sim"] = load.records, sim.records()
    (HERE / "compare.json").write_text(json.dumps(results, indent=1))
    plot_distributions(curves, HERE / "compare.png")
    print(f"\n{WORKLOAD['num_requests']} `{WORKLOAD['workload']}` requests, Poisson {WORKLOAD['rate']} req/s, "
          f"tiny model, CPU (commit {results['commit']})\n")
    print("| system | metric | real mean | sim mean | error | real p50 | sim p50 | real p99 | sim p99 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results["systems"].items():
        for metric in ("ttft", "tpot", "jct"):
            real, sim = r["real"][metric], r["sim"][metric]
            err = (sim["mean"] / real["mean"] - 1) * 100
            print(f"| {name} | {metric.upper()} (ms) | {real['mean'] * 1e3:.0f} | {sim['mean'] * 1e3:.0f} | {err:+.0f}% "
                  f"| {real['p50'] * 1e3:.0f} | {sim['p50'] * 1e3:.0f} | {real['p99'] * 1e3:.0f} | {sim['p99'] * 1e3:.0f} |")
    for name, r in results["systems"].items():
        t = r["kv_transfer"]
        if t["transfers"]:
            print(f"\n{name}: {t['transfers']:.0f} KV transfers, {t['bytes'] / 1e6:.1f} MB, "
                  f"{t['bytes'] / t['seconds'] / 1e9:.2f} GB/s reservation-to-landing")


# ---- flip ---------------------------------------------------------------------------------------------
def flip() -> None:
    from concurrent.futures import ThreadPoolExecutor

    import openai

    flags = ["--prefill-instances", "1", "--decode-instances", "2", "--flip", "--flip-idle", "0.2",
             "--chunk-size", "64", "--max-model-len", "512", "--num-blocks", "512", "--torch-threads", "1"]
    server = start(flags, LOGS / "tetriinfer-serve-flip.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)

        def prompt_only(i: int) -> int:
            return client.completions.create(model="tiny", prompt=f"{i} " + "long prompt " * 40, max_tokens=1,
                                             temperature=0).usage.completion_tokens

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(prompt_only, range(400)))
        time.sleep(0.5)
    finally:
        server.stop()
    flips = [dict(instance=int(m[0]), role=m[1], drain_s=float(m[2]), switch_s=float(m[3]))
             for m in re.findall(r"instance (\d+) is now (\w+): drained in ([\d.]+) s, switched in ([\d.]+) s",
                                 (LOGS / "tetriinfer-serve-flip.log").read_text())]
    (HERE / "flip.json").write_text(json.dumps({"commit": commit(), "flags": flags, "flips": flips}, indent=1))
    print("\n| instance | to role | drain (s) | switch (ms) |\n|---|---|---|---|")
    for f in flips:
        print(f"| {f['instance']} | {f['role']} | {f['drain_s']:.3f} | {f['switch_s'] * 1e3:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["profile", "compare", "flip", "all"])
    part = parser.parse_args().part
    for name, fn in (("profile", profile), ("compare", compare), ("flip", flip)):
        if part in (name, "all"):
            fn()


if __name__ == "__main__":
    main()
