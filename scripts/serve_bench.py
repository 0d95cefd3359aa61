"""Serve each system with `tetriinfer serve`, load it with the paper's workloads, and (optionally)
simulate the same runs: the harness behind docs/serving.md's GPU runs and issue 7's table.

    PYTHONPATH=. python scripts/serve_bench.py --out results/ --common "--model llama3-8b --dtype bfloat16" \\
        --system "tetriinfer=--prefill-instances 1 --decode-instances 1 --device cuda" \\
        --system "vllm=--mode colocated --instances 2 --baseline vllm --device cuda" \\
        --system "sarathi=--mode colocated --instances 2 --baseline sarathi --device cuda" \\
        --workloads lpld,lphd,hpld,hphd,mixed --num-requests 128 --arrivals closed,4,8 \\
        --profile docs/benchmarks/profile-h100-llama3-8b.json

Each --system is NAME=FLAGS for `tetriinfer serve` (after --common). A system's server starts once,
takes `--warmup-requests` unrecorded requests, and serves every workload and arrival pattern in turn (`closed`: the paper's closed batch, all at
t=0; a number: Poisson at that many requests/s). With --profile, each run is also simulated with
the same requests, the same `sched` policies and the system's own settings, priced by that profile.

Instances that `serve` puts on one GPU (an explicit `--device cuda:0`) are simulated time-sliced
on it (`ClusterConfig.instances_per_gpu`; `--sim-instances-per-gpu` overrides), or, where `serve` ran
them under MPS (`--mps-sm-shares P,D`), side by side on those SM shares (`ClusterConfig.gpu_sharing`;
`--sim-gpu-sharing` overrides). `--resim OLD.json
--out DIR` simulates a saved result's runs again with today's simulator, without serving: the same
requests (rebuilt from OLD.json's args) and each system's flags; the previous `sim` is kept as
`sim_before_resim`.

Resource time of a real run is instances x makespan (the client cannot see when each instance last
worked); perf/$ is relative to the system named `vllm` if there is one, else the first. Writes
serve-bench.json (summaries, per-request records, KV transfers and flips per run) and serve-bench.md.
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

from tetriinfer.metrics import LatencyStats, Summary, perf_per_dollar
from tetriinfer.bench.serve_client import run_load_sync
from tetriinfer.bench.server_process import ServerProcess
from tetriinfer.bench.workload import back_to_back, build_specs


def serve_config(flags: list[str]):
    """The ServeConfig `tetriinfer serve FLAGS` would run (the simulator mirrors it)."""
    from tetriinfer.cli import build_parser
    from tetriinfer.entrypoints.serve import serve_config as to_config

    return to_config(build_parser().parse_args(["serve", *flags]))


def instances_per_gpu(cfg) -> int:
    """Instances the launcher puts on one GPU: all of them on an explicit `cuda:k`, one each on
    `cuda` (it only ever does one or the other, so the largest count is the exact one)."""
    from collections import Counter

    from tetriinfer.cluster.plan import instance_devices

    # As if enough GPUs are visible: the placement, not this machine's GPU count, is asked.
    devices = [d for d in instance_devices(cfg, num_gpus=1 << 20) if d.startswith("cuda")]
    return max(Counter(devices).values(), default=1)


def sim_config(cfg, seed: int = 0, gpu_sharing: int | None = None, sharing_mode: str | None = None):
    """The simulated twin of ServeConfig `cfg`; `gpu_sharing` overrides its instances per GPU and
    `sharing_mode` how they share it (default: MPS on its SM shares if `serve` ran MPS, else time-slice)."""
    from tetriinfer.config import ClusterConfig, SimConfig

    colocated = cfg.mode == "colocated"
    mps = {"mps_sm_shares": tuple(cfg.mps_sm_shares)} if cfg.mps_sm_shares else {}
    cluster = ClusterConfig(system=cfg.baseline if colocated else "tetriinfer", shape=cfg.shape, model=cfg.engine.model,
                            tp=cfg.engine.tensor_parallel_size, block_size=cfg.engine.cache.block_size,
                            instances_per_gpu=instances_per_gpu(cfg) if gpu_sharing is None else gpu_sharing,
                            gpu_sharing=sharing_mode or ("mps" if mps else "time-slice"), **mps)
    return SimConfig(cluster, cfg.policy, cfg.flip, seed=seed, scheduler=cfg.engine.scheduler,
                     prefix_cache_fraction=1.0 if cfg.engine.cache.enable_prefix_caching else 0.0)


def run_system(name: str, flags: list[str], runs: list[tuple[str, str, list]], args, out: Path,
               save=lambda result: None) -> dict:
    cfg = serve_config(flags)
    instances = cfg.total_instances
    print(f"$ tetriinfer serve {' '.join(flags)}", flush=True)
    started = time.monotonic()
    server = ServerProcess.start(flags, out / f"server-{name}.log", env={"TETRIINFER_LOG": "WARNING"},
                                 timeout_s=args.startup_timeout)
    result = {"flags": flags, "instances": instances, "startup_s": time.monotonic() - started, "runs": {}}
    try:
        if args.warmup_requests:  # first requests pay one-time costs (Triton JIT of eager shapes)
            warm = build_specs("mixed", args.warmup_requests, seed=1, max_total_tokens=args.max_model_len)
            run_load_sync(server.url, warm, model=None, vocab_size=args.vocab_size, progress=False)
        for workload, arrival, specs in runs:
            before = server.kv_counters()
            load = run_load_sync(server.url, specs, model=None, vocab_size=args.vocab_size, progress=False)
            time.sleep(1.0)  # the last stats reach /metrics
            after = server.kv_counters()
            run = {"failures": load.failures_by_reason(), "wall_s": load.wall_s,
                   "counters": {k: after[k] - before[k] for k in after},  # KV transfers and flips during this run
                   "records": [dataclasses.asdict(r) for r in sorted(load.records, key=lambda r: r.request_id)]}
            if load.records:
                run["summary"] = dataclasses.asdict(load.summary(instances))
            if args.profile:
                run["sim"] = dataclasses.asdict(_simulate(cfg, specs, args.profile, args.sim_instances_per_gpu,
                                                          args.sim_gpu_sharing))
            result["runs"][f"{workload}/{arrival}"] = run
            save(result)  # a run cut short by a time limit keeps what it measured
            print(f"{name} {workload}/{arrival}: {len(load.records)} done, {len(load.failures)} failed", flush=True)
    finally:
        server.stop(60)
    return result


def _simulate(cfg, specs, profile: str, gpu_sharing: int | None = None, sharing_mode: str | None = None) -> Summary:
    from tetriinfer.sim.cluster import simulate
    from tetriinfer.sim.cost import TableCostModel

    config = sim_config(cfg, gpu_sharing=gpu_sharing, sharing_mode=sharing_mode)
    return simulate(specs, config, TableCostModel.from_file(profile)).summary()


def build_runs(args) -> list[tuple[str, str, list]]:
    """(workload, arrival, specs) of every run; deterministic, so a saved result's args rebuild them."""
    runs = []
    listed = getattr(args, "runs", None)  # older results' args have no --runs
    pairs = ([tuple(item.split("@", 1)) for item in listed.split(",")] if listed else
             [(w, a) for w in args.workloads.split(",") for a in args.arrivals.split(",")])
    for workload, arrival in pairs:
        rate = None if arrival == "closed" else float(arrival)
        phases = [build_specs(mix, args.num_requests, rate=rate, seed=0, max_total_tokens=args.max_model_len)
                  for mix in workload.split(">")]
        runs.append((workload, arrival, back_to_back(*phases)))
    return runs


def resim(path: str, profile: str | None, gpu_sharing: int | None, sharing_mode: str | None = None) -> dict:
    """A saved result with every run simulated again (today's simulator, same requests and flags)."""
    results = json.loads(Path(path).read_text())
    saved = argparse.Namespace(**results["args"])
    profile = profile or saved.profile
    if not profile:
        raise SystemExit(f"{path} was run without --profile: pass one")
    runs = {f"{w}/{a}": specs for w, a, specs in build_runs(saved)}
    for name, system in results["systems"].items():
        if "flags" not in system:  # a system that failed to start has nothing to simulate
            continue
        cfg = serve_config(system["flags"])
        for key, run in system.get("runs", {}).items():
            if "sim" in run:
                run["sim_before_resim"] = run["sim"]
            run["sim"] = dataclasses.asdict(_simulate(cfg, runs[key], profile, gpu_sharing, sharing_mode))
            print(f"{name} {key}: simulated again", flush=True)
    results["resim"] = {"of": path, "profile": profile, "commit": os.environ.get("TETRIINFER_COMMIT", "unknown")}
    return results


def _summary(d: dict) -> Summary:
    d = dict(d)
    for key in ("ttft", "tpot", "jct"):
        d[key] = LatencyStats(**d[key])
    return Summary(**d)


def report(results: dict) -> str:
    systems = results["systems"]
    base = "vllm" if "vllm" in systems else next(iter(systems))
    lines = [f"Commit {results['commit']}, {results['device']}.", ""]
    keys = sorted({k for s in systems.values() for k in s.get("runs", {})})
    for key in keys:
        lines += [f"### {key}", "",
                  "| system | TTFT mean / p50 / p99 (ms) | TPOT mean / p50 / p99 (ms) | JCT mean / p50 / p99 (ms) "
                  "| resource time (s) | perf/$ | prefix hit rate | sim JCT mean (error) |", "|---|---|---|---|---|---|---|---|"]
        base_run = systems.get(base, {}).get("runs", {}).get(key, {})
        base_summary = _summary(base_run["summary"]) if "summary" in base_run else None
        for name, system in systems.items():
            run = system.get("runs", {}).get(key)
            if run is None or "summary" not in run:
                lines.append(f"| {name} | failed: {system.get('error') or (run or {}).get('failures')} | | | | | | |")
                continue
            s = _summary(run["summary"])
            ms = lambda st, f=1e3: f"{st.mean * f:.0f} / {st.p50 * f:.0f} / {st.p99 * f:.0f}"  # noqa: E731
            tpot = f"{s.tpot.mean * 1e3:.1f} / {s.tpot.p50 * 1e3:.1f} / {s.tpot.p99 * 1e3:.1f}"
            perf = f"{perf_per_dollar(s, base_summary):.2f}x" if base_summary else "-"
            sim = "-"
            if "sim" in run:
                sim_jct = run["sim"]["jct"]["mean"]
                sim = f"{sim_jct * 1e3:.0f} ({(sim_jct / s.jct.mean - 1) * 100:+.0f}%)"
            counters = run.get("counters", {})
            hits = (f"{counters['prefix_hit'] / counters['prefix_queried']:.1%}"
                    if counters.get("prefix_queried") else "-")
            lines.append(f"| {name} | {ms(s.ttft)} | {tpot} | {ms(s.jct)} | {s.resource_time_s:.1f} | {perf} | {hits} "
                         f"| {sim} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--system", action="append", help="NAME=FLAGS of tetriinfer serve (required unless --resim)")
    p.add_argument("--common", default="--model llama3-8b --dtype bfloat16", help="flags every system gets first")
    p.add_argument("--workloads", default="mixed",
                   help="comma-separated: lpld,lphd,hpld,hphd,mixed,azure-conv,...; A>B runs mix A then mix B "
                        "(a shifting mix, for the flip)")
    p.add_argument("--arrivals", default="closed", help="comma-separated: closed and/or Poisson rates")
    p.add_argument("--runs", default=None,
                   help="comma-separated WORKLOAD@ARRIVAL pairs (e.g. mixed@6,conversation@24), instead of "
                        "every workload at every arrival")
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=8192, help="drop requests longer than this")
    p.add_argument("--vocab-size", type=int, default=128000, help="prompt token ids are drawn below this")
    p.add_argument("--profile", default=None, help="also simulate every run, priced by this profile")
    p.add_argument("--warmup-requests", type=int, default=64,
                   help="unrecorded `mixed` requests sent to each server before its measured runs")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--sim-instances-per-gpu", type=int, default=None,
                   help="simulate this many instances on one GPU (default: as serve places them)")
    p.add_argument("--sim-gpu-sharing", default=None, choices=("time-slice", "mps"),
                   help="how instances on one GPU share it in simulation (default: mps where serve ran "
                        "--mps-sm-shares, on those shares; else time-slice)")
    p.add_argument("--resim", default=None, metavar="JSON",
                   help="serve nothing: simulate a saved serve-bench.json's runs again (its requests and flags; "
                        "--profile overrides its profile) and write the result to --out")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.resim:
        results = resim(args.resim, args.profile, args.sim_instances_per_gpu, args.sim_gpu_sharing)
        (out / "serve-bench.json").write_text(json.dumps(results, indent=1))
        text = report(results)
        (out / "serve-bench.md").write_text(text)
        print(text)
        return
    if not args.system:
        p.error("--system is required (or --resim JSON)")
    runs = build_runs(args)
    results = {"commit": os.environ.get("TETRIINFER_COMMIT", "unknown"), "device": _device(), "args": vars(args),
               "systems": {}}
    for item in args.system:
        name, _, flags = item.partition("=")
        def save(result, name=name):
            results["systems"][name] = result
            (out / "serve-bench.json").write_text(json.dumps(results, indent=1))

        try:
            results["systems"][name] = run_system(name, shlex.split(args.common) + shlex.split(flags), runs, args, out,
                                                  save)
        except Exception as e:  # noqa: BLE001 - keep the other systems' results
            results["systems"][name] = {"error": str(e)}
            print(f"{name}: FAILED {e}", flush=True)
        (out / "serve-bench.json").write_text(json.dumps(results, indent=1))
    text = report(results)
    (out / "serve-bench.md").write_text(text)
    print(text)


def _device() -> str:
    try:
        return subprocess.check_output(["nvidia-smi", "-L"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "CPU"


if __name__ == "__main__":
    main()
