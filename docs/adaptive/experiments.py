"""Reproduce the simulator tables and figures of docs/adaptive.md (issue 12).

    python docs/adaptive/experiments.py [--requests 600] [--jobs 2] [--out docs/adaptive/sweep.json]

Every shipped workload, Llama-3-8B on an H100 (the measured profile) and an H200 (roofline), at 2,
4 and 8 GPUs, from light load to saturation: TetriInfer adaptive (the default) and the paper's
fixed split against `vllm`, `sarathi` and `disagg` at equal GPU counts. A load is a fraction of a
capacity estimate per GPU (one prompt token at the prefill rate of a full chunk plus one output
token at the decode rate of a batch of 64); arrivals are Poisson, and `conversation` also bursty,
with as many sessions as `SESSION_SPAN_S` seconds of session starts need to reach the rate.
Writes raw JSON and a figure; prints the markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from tetriinfer.bench.workload import ALL_WORKLOADS, SESSION_WORKLOADS, build_specs
from tetriinfer.config import ClusterConfig, ClusterShape, FlipConfig, PolicyConfig, SimConfig, SLOConfig
from tetriinfer.sim.cluster import simulate
from tetriinfer.sim.cost import RooflineCostModel, TableCostModel

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HARDWARE = {"h100": "profile", "h200": "roofline"}
GPUS = (2, 4, 8)
LOADS = (0.3, 0.6, 0.9)
SYSTEMS = {  # name -> (system, policy overrides)
    "vllm": ("vllm", {}),
    "sarathi": ("sarathi", {}),
    "disagg": ("disagg", {}),
    "paper": ("tetriinfer", {"disagg_policy": "paper"}),
    "tetriinfer": ("tetriinfer", {}),
}
SLOS = {"loose": (1.0, 0.050), "tight": (0.5, 0.025)}
MAX_TOTAL_TOKENS = 8192
# Session workloads chain a user's turns (think time, reply time): a session lasts about a minute,
# so a few hundred requests never overlap enough to reach the nominal rate. Their cells take as
# many requests as `SESSION_SPAN_S` seconds of session starts need.
SESSION_SPAN_S = 300.0


def cost_model(gpu: str):
    if HARDWARE[gpu] == "profile":
        return TableCostModel.from_file(REPO / "docs" / "benchmarks" / f"profile-{gpu}-llama3-8b.json")
    return RooflineCostModel.from_names(gpu, "llama3-8b")


def capacity_rps_per_gpu(cost, specs) -> float:
    """Requests/s one GPU sustains for this mix: prompt tokens at a full chunk's rate plus output
    tokens at the per-token cost of a decode batch of 64 (mean context of the mix)."""
    prompt = statistics.mean(s.prompt_tokens for s in specs)
    output = statistics.mean(s.output_tokens for s in specs)
    per_prompt_token = cost.step_time(2048, 0, 0, 0) / 2048
    per_output_token = cost.step_time(0, 0, 64, int(64 * (prompt + output / 2))) / 64
    return 1.0 / (prompt * per_prompt_token + output * per_output_token)


def arrivals(workload: str) -> tuple[str, ...]:
    return ("poisson", "bursty") if workload == "conversation" else ("poisson",)


def run_cell(args: tuple) -> dict:
    gpu, num_gpus, workload, arrival, load, num_requests = args
    cost = cost_model(gpu)
    probe = build_specs(workload, num_requests, rate=1.0, arrival="poisson", seed=0, max_total_tokens=MAX_TOTAL_TOKENS)
    rate = load * num_gpus * capacity_rps_per_gpu(cost, probe)
    if workload in SESSION_WORKLOADS:
        num_requests = max(num_requests, int(rate * SESSION_SPAN_S))
    specs = build_specs(workload, num_requests, rate=rate, arrival=arrival, seed=0, max_total_tokens=MAX_TOTAL_TOKENS)
    out = {"gpu": gpu, "num_gpus": num_gpus, "workload": workload, "arrival": arrival, "load": load,
           "rate_rps": rate, "num_requests": num_requests, "systems": {}}
    for name, (system, policy) in SYSTEMS.items():
        shape = ClusterShape(num_gpus // 2, num_gpus - num_gpus // 2, num_gpus)
        cluster = ClusterConfig(system=system, shape=shape, gpu=gpu, model="llama3-8b")
        config = SimConfig(cluster, PolicyConfig(**policy), FlipConfig(), SLOConfig(*SLOS["loose"]))
        result = simulate(specs, config, cost)
        loose = result.summary(*SLOS["loose"])
        tight = result.summary(*SLOS["tight"])
        out["systems"][name] = {
            "ttft_mean": loose.ttft.mean, "ttft_p99": loose.ttft.p99, "tpot_mean": loose.tpot.mean,
            "tpot_p99": loose.tpot.p99, "jct_mean": loose.jct.mean, "jct_p99": loose.jct.p99,
            "goodput_loose": loose.goodput_rps, "goodput_tight": tight.goodput_rps,
            "num_flips": result.num_flips, "num_preemptions": result.num_preemptions,
        }
    return out


def cells(num_requests: int) -> list[tuple]:
    return [(gpu, n, w, a, load, num_requests) for gpu in HARDWARE for n in GPUS for w in ALL_WORKLOADS
            for a in arrivals(w) for load in LOADS]


def verdict(systems: dict) -> str:
    """Where TetriInfer stands against the best colocated baseline (mean JCT, goodput, TPOT p99)."""
    t = systems["tetriinfer"]
    best_jct = min(systems[s]["jct_mean"] for s in ("vllm", "sarathi"))
    best_good = max(systems[s]["goodput_loose"] for s in ("vllm", "sarathi"))
    best_tpot = min(systems[s]["tpot_p99"] for s in ("vllm", "sarathi"))
    misses = []
    if t["jct_mean"] > best_jct * 1.01:
        misses.append(f"JCT +{(t['jct_mean'] / best_jct - 1) * 100:.0f}%")
    if t["goodput_loose"] < best_good * 0.99:
        misses.append(f"goodput {(t['goodput_loose'] / best_good - 1) * 100:.0f}%")
    if t["tpot_p99"] >= best_tpot:
        misses.append(f"TPOT p99 +{(t['tpot_p99'] / best_tpot - 1) * 100:.0f}%")
    return "met" if not misses else ", ".join(misses)


def print_tables(rows: list[dict]) -> None:
    met = sum(verdict(r["systems"]) == "met" for r in rows)
    print(f"\nTarget met in {met} of {len(rows)} cells.\n")
    print("| GPU | GPUs | workload | load | rate | JCT mean s (vllm / sarathi / disagg / paper / tetriinfer) "
          "| TPOT p99 ms (sarathi / tetriinfer) | goodput (sarathi / tetriinfer) | verdict |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["systems"]
        jct = " / ".join(f"{s[k]['jct_mean']:.2f}" for k in SYSTEMS)
        name = r["workload"] + ("" if r["arrival"] == "poisson" else f" ({r['arrival']})")
        print(f"| {r['gpu']} | {r['num_gpus']} | {name} | {r['load']:.1f} | {r['rate_rps']:.1f} | {jct} "
              f"| {s['sarathi']['tpot_p99'] * 1e3:.1f} / {s['tetriinfer']['tpot_p99'] * 1e3:.1f} "
              f"| {s['sarathi']['goodput_loose']:.2f} / {s['tetriinfer']['goodput_loose']:.2f} | {verdict(s)} |")


def print_summary(rows: list[dict]) -> None:
    """docs/adaptive.md's first table: each system against the best colocated baseline per cell."""
    print("| system | mean JCT / best: median | worst | cells > 1% worse | goodput / best: worst "
          "| cells > 1% worse | TPOT p99 / best: median | cells with a lower TPOT p99 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("paper", "disagg", "tetriinfer"):
        jct, good, tpot = [], [], []
        for r in rows:
            s = r["systems"]
            jct.append(s[name]["jct_mean"] / min(s[b]["jct_mean"] for b in ("vllm", "sarathi")))
            good.append(s[name]["goodput_loose"] / max(s[b]["goodput_loose"] for b in ("vllm", "sarathi")))
            tpot.append(s[name]["tpot_p99"] / min(s[b]["tpot_p99"] for b in ("vllm", "sarathi")))
        n = len(rows)
        print(f"| {name} | {statistics.median(jct):.3f} | {max(jct):.2f} | {sum(j > 1.01 for j in jct)} / {n} "
              f"| {min(good):.2f} | {sum(g < 0.99 for g in good)} / {n} | {statistics.median(tpot):.2f} "
              f"| {sum(t < 1 for t in tpot)} / {n} |")


def print_variants(rows: list[dict], names) -> None:
    """One line per TetriInfer variant (docs/adaptive/variants.py, keep_probe.py): mean JCT, TPOT p99
    and goodput against the better of `vllm` and `sarathi`, cell by cell."""
    def best(row, metric, pick):
        return pick(row["systems"][s][metric] for s in ("vllm", "sarathi"))

    print(f"{len(rows)} cells; each variant against the better of vllm and sarathi")
    for name in names:
        jct = [r["systems"][name]["jct_mean"] / best(r, "jct_mean", min) for r in rows]
        tpot = [r["systems"][name]["tpot_p99"] / best(r, "tpot_p99", min) for r in rows]
        good = [r["systems"][name]["goodput_loose"] / best(r, "goodput_loose", max) for r in rows]
        print(f"{name:30s} mean JCT median {statistics.median(jct):.3f}, worst {max(jct):.2f}, "
              f"{sum(x > 1.01 for x in jct):2d} worse | TPOT p99 median {statistics.median(tpot):.2f}, "
              f"{sum(x < 1 for x in tpot):2d} lower | goodput worst {min(good):.2f}, {sum(x < 0.99 for x in good):2d} worse")


def print_slice(rows: list[dict], gpu: str, num_gpus: int, load: float) -> None:
    """One hardware, GPU count and load: mean JCT of every system, then sarathi / TetriInfer."""
    print(f"\n**{gpu.upper()}, {num_gpus} GPUs, {load} of capacity**\n")
    print("| workload | rate (req/s) | mean JCT (s) | TTFT p99 | TPOT p99 | goodput | tight goodput |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if (r["gpu"], r["num_gpus"], r["load"]) != (gpu, num_gpus, load):
            continue
        s = r["systems"]
        a, t = s["sarathi"], s["tetriinfer"]
        name = r["workload"] + ("" if r["arrival"] == "poisson" else f" ({r['arrival']})")
        jct = " / ".join(f"{s[k]['jct_mean']:.2f}" for k in SYSTEMS)
        print(f"| {name} | {r['rate_rps']:.1f} | {jct} "
              f"| {a['ttft_p99']:.2f} / {t['ttft_p99']:.2f} | {a['tpot_p99'] * 1e3:.1f} / {t['tpot_p99'] * 1e3:.1f} "
              f"| {a['goodput_loose']:.1f} / {t['goodput_loose']:.1f} | {a['goodput_tight']:.1f} / {t['goodput_tight']:.1f} |")


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no figure")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, marker in (("paper", "x"), ("tetriinfer", "o"), ("vllm", "^")):
        xs = [r["load"] + 0.02 * (r["num_gpus"] / 4 - 1) for r in rows]
        ys = [r["systems"][name]["jct_mean"] / r["systems"]["sarathi"]["jct_mean"] for r in rows]
        ax.scatter(xs, ys, marker=marker, label=name, alpha=0.6)
    ax.axhline(1.0, color="gray", lw=1)
    ax.set_xlabel("load (fraction of estimated capacity)")
    ax.set_ylabel("mean JCT / sarathi's")
    ax.set_title("Simulated Llama-3-8B, every workload, 2-8 GPUs, H100 and H200")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "sweep.json"))
    parser.add_argument("--report-only", action="store_true", help="tables and figure from an existing --out")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report_only:
        rows = json.loads(out.read_text())["rows"]
    else:
        start = time.time()
        todo = cells(args.requests)
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(tqdm(pool.map(run_cell, todo), total=len(todo), desc="cells"))
        out.write_text(json.dumps({"requests_per_cell": args.requests, "rows": rows}, indent=1))
        print(f"wrote {out} ({time.time() - start:.0f} s)")
    with contextlib.redirect_stdout(io.StringIO()) as tables:
        print_summary(rows)
        print_slice(rows, "h100", 4, 0.9)
        print_slice(rows, "h200", 8, 0.6)
        print_tables(rows)
    out.with_suffix(".md").write_text(tables.getvalue())
    print(tables.getvalue())
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
