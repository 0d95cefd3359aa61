"""Reproduce the simulator tables of docs/prefix-caching.md (issue 14).

    python docs/prefix-caching/experiments.py [--requests 3000] [--jobs 2]

Llama-3-8B on an H100 (the measured profile, `TableCostModel`), 4 GPUs: TetriInfer adaptive
(2 prefill + 2 decode instances) and `sarathi` (4 colocated instances), on two workloads whose
requests carry prefix block ids:

- `conversation`: multi-turn ShareGPT sessions, each turn resending the conversation so far;
- `doc-qa`: a synthetic trace in Mooncake's format (`timestamp` ms, `input_length`,
  `output_length`, `hash_ids`), written to a temporary file and read back with `--trace`'s reader:
  60 shared documents of 1-6k tokens, drawn by a Zipf law (s = 1.1), each followed by a question of
  its own (no public Mooncake trace is in the data folder, so this stands in for one).

Arrivals are Poisson at a load (0.6, 0.9) times a no-cache capacity estimate (as
docs/adaptive/experiments.py computes it). Each system runs with the cache off, on (each instance's
whole KV capacity, the default) with cache-blind (least-loaded) placement and with cache-aware
placement, and, at load 0.9, cache-aware and blind with the cluster's total cache at 10-100% of the
workload's working set (its distinct full prefix blocks). Writes `results.json` beside this file and
prints the markdown tables.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tetriinfer.bench.traces import HASH_BLOCK_TOKENS
from tetriinfer.bench.workload import build_specs
from tetriinfer.config import ClusterConfig, ClusterShape, PolicyConfig, SimConfig
from tetriinfer.sim.cluster import simulate
from tetriinfer.sim.cost import TableCostModel

HERE = Path(__file__).resolve().parent
PROFILE = HERE.parents[1] / "docs" / "benchmarks" / "profile-h100-llama3-8b.json"
NUM_GPUS = 4
SYSTEMS = ("tetriinfer", "sarathi")
CAPACITIES = (0.1, 0.25, 0.5, 1.0)  # of the working set, over the whole cluster
LOADS = (0.6, 0.9)
FULL = None  # cache share meaning "each instance's whole KV capacity" (prefix_cache_fraction 1.0)
MAX_TOTAL_TOKENS = 8192


def doc_qa_trace(path: Path, num_requests: int, rate: float, seed: int = 0) -> None:
    """Write the synthetic Mooncake-format trace: shared document prefix + own question."""
    rng = random.Random(seed)
    docs = [rng.randint(1024, 6144) for _ in range(60)]
    weights = [1 / (k + 1) ** 1.1 for k in range(len(docs))]
    next_id, t = 1_000_000, 0.0
    with open(path, "w") as f:
        for _ in range(num_requests):
            d = rng.choices(range(len(docs)), weights)[0]
            length = docs[d] + rng.randint(30, 400)
            shared = docs[d] // HASH_BLOCK_TOKENS  # the block holding the document's end is the request's own
            own = -(-length // HASH_BLOCK_TOKENS) - shared
            ids = [d * 1000 + i for i in range(shared)] + list(range(next_id, next_id + own))
            next_id += own
            f.write(json.dumps({"timestamp": round(t * 1000), "input_length": length,
                                "output_length": rng.randint(20, 400), "hash_ids": ids}) + "\n")
            t += rng.expovariate(rate)


def capacity_rps(cost, specs) -> float:
    """Requests/s the cluster sustains without a cache (docs/adaptive/experiments.py's estimate)."""
    prompt = statistics.mean(s.prompt_tokens for s in specs)
    output = statistics.mean(s.output_tokens for s in specs)
    per_prompt_token = cost.step_time(2048, 0, 0, 0) / 2048
    per_output_token = cost.step_time(0, 0, 64, int(64 * (prompt + output / 2))) / 64
    return NUM_GPUS / (prompt * per_prompt_token + output * per_output_token)


def make_specs(workload: str, num_requests: int, load: float) -> tuple[list, float]:
    cost = TableCostModel.from_file(PROFILE)
    if workload == "conversation":
        probe = build_specs(workload, num_requests, rate=1.0, max_total_tokens=MAX_TOTAL_TOKENS)
        rate = load * capacity_rps(cost, probe)
        return build_specs(workload, num_requests, rate=rate, max_total_tokens=MAX_TOTAL_TOKENS), rate
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "doc-qa.jsonl"
        doc_qa_trace(path, num_requests, 1.0)
        rate = load * capacity_rps(cost, build_specs("mixed", 1, trace=str(path)))
        doc_qa_trace(path, num_requests, rate)
        return build_specs("mixed", 1, trace=str(path)), rate


def working_set_blocks(specs) -> int:
    return len({h for s in specs for h in (s.hash_ids or ())[: s.prompt_tokens // HASH_BLOCK_TOKENS]})


def run_cell(args: tuple) -> dict:
    workload, num_requests, load, system, setting, share = args
    specs, rate = make_specs(workload, num_requests, load)
    cost = TableCostModel.from_file(PROFILE)
    working_set = working_set_blocks(specs)
    fraction = 1.0 if share is FULL else 0.0
    if share:  # the cluster's total cache is `share` of the working set
        per_instance = share * working_set * HASH_BLOCK_TOKENS / NUM_GPUS
        fraction = min(1.0, per_instance / cost.kv_capacity_tokens())
    cluster = ClusterConfig(system=system, shape=ClusterShape(NUM_GPUS // 2, NUM_GPUS // 2, NUM_GPUS), gpu="h100",
                            model="llama3-8b")
    config = SimConfig(cluster, PolicyConfig(cache_aware_routing=setting != "blind"), prefix_cache_fraction=fraction)
    start = time.perf_counter()
    result = simulate(specs, config, cost)
    s = result.summary()
    return {"workload": workload, "load": load, "system": system, "setting": setting, "cache_share": share,
            "prefix_cache_fraction": fraction, "rate_rps": rate, "num_requests": len(specs),
            "working_set_blocks": working_set, "hit_rate": result.prefix_hit_rate,
            "evicted_blocks": result.prefix_evicted_blocks, "ttft_mean": s.ttft.mean, "ttft_p99": s.ttft.p99,
            "tpot_mean": s.tpot.mean, "jct_mean": s.jct.mean, "jct_p99": s.jct.p99,
            "num_preemptions": result.num_preemptions, "wall_s": time.perf_counter() - start}


def cells(num_requests: int) -> list[tuple]:
    out = []
    for workload in ("conversation", "doc-qa"):
        for load in LOADS:
            for system in SYSTEMS:
                out += [(workload, num_requests, load, system, "off", 0.0),
                        (workload, num_requests, load, system, "blind", FULL),
                        (workload, num_requests, load, system, "aware", FULL)]
        for system in SYSTEMS:
            out += [(workload, num_requests, LOADS[-1], system, setting, share)
                    for share in CAPACITIES for setting in ("blind", "aware")]
    return out


def print_tables(rows: list[dict]) -> None:
    for workload in ("conversation", "doc-qa"):
        sub = [r for r in rows if r["workload"] == workload]
        print(f"\n{workload}: {sub[0]['num_requests']} requests, working set {sub[0]['working_set_blocks']} "
              f"blocks of {HASH_BLOCK_TOKENS} tokens\n")
        print("| load (req/s) | system | cache | placement | hit rate | TTFT mean / p99 (ms) | JCT mean / p99 (s) "
              "| evicted blocks |")
        print("|---|---|---|---|---|---|---|---|")
        for r in sub:
            share = r["cache_share"]
            cache = "off" if r["setting"] == "off" else ("full KV" if share is FULL else f"{share:.0%} of working set")
            place = "cache-aware" if r["setting"] == "aware" else "least loaded"
            print(f"| {r['load']} ({r['rate_rps']:.1f}) | {r['system']} | {cache} | {place} | {r['hit_rate']:.1%} "
                  f"| {r['ttft_mean'] * 1e3:.0f} / {r['ttft_p99'] * 1e3:.0f} | {r['jct_mean']:.2f} / {r['jct_p99']:.2f} "
                  f"| {r['evicted_blocks']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args()
    todo = cells(args.requests)
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run_cell, todo))
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print_tables(rows)
    print(f"\nwrote {args.out}; simulated {sum(r['wall_s'] for r in rows):.0f} s of wall time in all")


if __name__ == "__main__":
    main()
