"""Reproduce every table and figure of docs/simulation.md.

    python docs/simulation/experiments.py all    # or: paper h100-mixes h100 sjf admission dispatch flip speed

Prints markdown tables; figures land next to this file. Everything is simulated (no GPU needed).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tetriinfer.metrics import LatencyStats, Summary
from tetriinfer.bench.workload import RequestSpec, make_workload
from tetriinfer.config import ClusterConfig, ClusterShape, EngineSchedulerConfig, FlipConfig, PolicyConfig, SimConfig
from tetriinfer.sim.cluster import simulate
from tetriinfer.sim.cost import RooflineCostModel

HERE = Path(__file__).resolve().parent
MIXES = ("lpld", "lphd", "hpld", "hphd", "mixed")
# The paper's Table (TetriInfer vs vLLM): TTFT, JCT, resource time changes and perf/$.
PAPER = {
    "lpld": ("-44%", "-40%", "~0%", "1.4x"),
    "lphd": ("-97%", "-47%", "-38%", "2.4x"),
    "hpld": ("-9%", "-23%", "+43%", "1.14x"),
    "hphd": ("small gain", "-", "-", "~1.1x"),
    "mixed": ("-85%", "-50%", "-21%", "1.9x"),
}
V100 = ("v100", "opt-13b")  # the paper's hardware and model
H100 = ("h100", "llama3-8b")


def config(system: str, hardware: tuple[str, str], prefill: int = 1, decode: int = 1, instances: int = 1,
           flip: FlipConfig | None = None, seed: int = 0, chunk_size: int = 512, **policy) -> SimConfig:
    gpu, model = hardware
    cluster = ClusterConfig(system=system, shape=ClusterShape(prefill, decode, instances),
                            gpu=gpu, model=model)
    policy.setdefault("disagg_policy", "paper")  # this page reproduces the paper's fixed split (docs/adaptive.md: the default)
    return SimConfig(cluster, PolicyConfig(**policy), flip or FlipConfig(), seed=seed,
                     scheduler=EngineSchedulerConfig(chunk_size=chunk_size))


def poisson(mix: str, num_requests: int, rate: float, max_total_tokens: int = 8192) -> list[RequestSpec]:
    return make_workload(mix, num_requests, seed=0, arrival="poisson", rate=rate, max_total_tokens=max_total_tokens)


def header(*columns: str) -> None:
    print("\n| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def row(*cells) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |")


def pct(new: float, old: float) -> str:
    return f"{(new / old - 1) * 100:+.0f}%"


def perf(summary: Summary, baseline: Summary) -> str:
    return f"{summary.requests_per_resource_s / baseline.requests_per_resource_s:.2f}x"


def mean_p99(stats: LatencyStats, fmt: str = ".2f", scale: float = 1.0) -> str:
    return f"{stats.mean * scale:{fmt}} / {stats.p99 * scale:{fmt}}"


def paper() -> None:
    """The paper's setup: V100-32GB, OPT-13B, chunk 512, 1 prefill + 1 decode vs one vLLM, 128 requests."""
    for link_gbps, name in ((200.0, "200 Gbps"), (2400.0, "300 GB/s")):
        cost = RooflineCostModel.from_names(*V100, link_gbps=link_gbps)
        print(f"\n#### KV link {name}")
        header("mix", "vLLM TTFT / JCT (s)", "TetriInfer TTFT / JCT (s)", "TTFT", "JCT", "resource time", "perf/$",
               "paper TTFT / JCT / res / perf/$")
        for mix in MIXES:
            specs = make_workload(mix, 128, seed=0, max_total_tokens=2048)
            v = simulate(specs, config("vllm", V100), cost).summary()
            t = simulate(specs, config("tetriinfer", V100), cost).summary()
            row(mix, f"{v.ttft.mean:.2f} / {v.jct.mean:.1f}", f"{t.ttft.mean:.2f} / {t.jct.mean:.1f}",
                pct(t.ttft.mean, v.ttft.mean), pct(t.jct.mean, v.jct.mean),
                pct(t.resource_time_s, v.resource_time_s), perf(t, v), " / ".join(PAPER[mix]))


def h100_mixes() -> None:
    """The paper's table on H100 + Llama-3-8B at equal GPU counts: 1P+1D vs 2 x vllm, 2 x sarathi."""
    cost = RooflineCostModel.from_names(*H100)
    header("mix", "vllm (2) TTFT / JCT (s)", "sarathi (2) TTFT / JCT (s)", "TetriInfer 1P+1D TTFT / JCT (s)",
           "TTFT vs vllm / sarathi", "JCT vs vllm / sarathi", "perf/$ vs vllm / sarathi")
    for mix in MIXES:
        specs = make_workload(mix, 128, seed=0, max_total_tokens=8192)
        v = simulate(specs, config("vllm", H100, instances=2), cost).summary()
        c = simulate(specs, config("sarathi", H100, instances=2, chunk_size=2048), cost).summary()
        t = simulate(specs, config("tetriinfer", H100, chunk_size=2048), cost).summary()
        row(mix, *(f"{s.ttft.mean:.2f} / {s.jct.mean:.2f}" for s in (v, c, t)),
            f"{pct(t.ttft.mean, v.ttft.mean)} / {pct(t.ttft.mean, c.ttft.mean)}",
            f"{pct(t.jct.mean, v.jct.mean)} / {pct(t.jct.mean, c.jct.mean)}", f"{perf(t, v)} / {perf(t, c)}")


def h100(num_requests: int = 3000) -> None:
    """H100 + Llama-3-8B, 4 GPUs each: TetriInfer 2P+2D vs 4 x vllm vs 4 x sarathi, Poisson sweep.
    Chunks (and Sarathi's token budget) are 2048 tokens, near the H100's prefill saturation point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cost = RooflineCostModel.from_names(*H100)
    systems = {
        "vllm (4)": config("vllm", H100, instances=4),
        "sarathi (4)": config("sarathi", H100, instances=4, chunk_size=2048),
        "disagg (2P+2D)": config("disagg", H100, prefill=2, decode=2, chunk_size=2048),
        "tetriinfer (2P+2D)": config("tetriinfer", H100, prefill=2, decode=2, chunk_size=2048),
        "tetriinfer (1P+3D)": config("tetriinfer", H100, prefill=1, decode=3, chunk_size=2048),
    }
    slo = dict(ttft_slo_s=1.0, tpot_slo_s=0.05)
    for mix, rates in (("mixed", (20, 40, 60, 80, 100, 120, 140)), ("lphd", (40, 80, 120, 160, 200))):
        print(f"\n#### {mix}, Poisson, {num_requests} requests per point (SLO: TTFT <= 1 s, TPOT <= 50 ms)")
        header("rate (req/s)", "system", "TTFT mean / p99 (s)", "TPOT mean / p99 (ms)", "JCT mean / p99 (s)",
               "goodput (req/s)", "perf/$ vs vllm")
        curves = {name: [] for name in systems}
        for rate in rates:
            specs = poisson(mix, num_requests, rate)
            base = None
            for name, cfg in systems.items():
                s = simulate(specs, cfg, cost).summary(**slo)
                base = base or s
                curves[name].append((rate, s))
                row(rate, name, mean_p99(s.ttft, ".3f"), mean_p99(s.tpot, ".1f", 1e3), mean_p99(s.jct),
                    f"{s.goodput_rps:.1f}", perf(s, base))
        fig, axes = plt.subplots(1, 4, figsize=(18, 4), layout="constrained")
        panels = (
            ("TTFT p99 (s)", lambda s: s.ttft.p99),
            ("TPOT p99 (ms)", lambda s: s.tpot.p99 * 1e3),
            ("JCT p99 (s)", lambda s: s.jct.p99),
            ("goodput (req/s)", lambda s: s.goodput_rps),
        )
        for ax, (title, metric) in zip(axes, panels):
            for name, points in curves.items():
                ax.plot([r for r, _ in points], [metric(s) for _, s in points], marker="o", label=name)
            ax.set_xlabel("arrival rate (req/s)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].set_yscale("log")
        axes[2].set_yscale("log")
        axes[3].legend()
        fig.suptitle(f"H100, Llama-3-8B, 4 GPUs per system, {mix} (ShareGPT), Poisson")
        fig.savefig(HERE / f"h100-{mix}-sweep.png", dpi=110)
        plt.close(fig)


def sjf() -> None:
    """Prefill waiting (arrival to first chunk) by queue policy and sort window."""
    cost = RooflineCostModel.from_names(*V100)
    for label, specs in (
        ("closed batch of 512, mixed", make_workload("mixed", 512, seed=0, max_total_tokens=2048)),
        ("Poisson 5.5 req/s, 2000 mixed", poisson("mixed", 2000, 5.5, max_total_tokens=2048)),
    ):
        print(f"\n#### V100 / OPT-13B, 1P+1D, {label}: mean prefill waiting / mean TTFT (s)")
        header("window", "FCFS", "SJF", "LJF", "SJF vs FCFS waiting")
        for window in (16, 32, 64, 128):
            cells, waits = [], {}
            for policy in ("fcfs", "sjf", "ljf"):
                cfg = config("tetriinfer", V100, prefill_policy=policy, sort_window=window)
                result = simulate(specs, cfg, cost)
                waits[policy] = sum(result.prefill_wait_s()) / len(specs)
                cells.append(f"{waits[policy]:.2f} / {result.summary().ttft.mean:.2f}")
            row(window, *cells, pct(waits["sjf"], waits["fcfs"]))


def admission() -> None:
    """Decode admission policies at 74.9% and 100% predictor accuracy (V100 / OPT-13B, 1P+1D)."""
    cost = RooflineCostModel.from_names(*V100)
    for mix in ("lphd", "mixed"):
        specs = make_workload(mix, 128, seed=0, max_total_tokens=2048)
        print(f"\n#### {mix}, closed batch of 128: JCT mean / p99 (s), preemptions")
        header("admission", "accuracy 74.9%", "accuracy 100%")
        for policy in ("greedy", "reserve_static", "reserve_dynamic"):
            cells = []
            for accuracy in (0.749, 1.0):
                cfg = config("tetriinfer", V100, admission_policy=policy, predictor_accuracy=accuracy)
                result = simulate(specs, cfg, cost)
                cells.append(f"{mean_p99(result.summary().jct, '.1f')}, {result.num_preemptions}")
            row(policy, *cells)


def dispatch() -> None:
    """Dispatcher alternatives with several decode instances under memory pressure."""
    cost = RooflineCostModel.from_names(*V100)
    for mix, rate in (("mixed", 2.0), ("lphd", 2.5)):
        specs = poisson(mix, 2000, rate, max_total_tokens=2048)
        print(f"\n#### V100 / OPT-13B, 1P+4D, {mix} Poisson {rate} req/s, 2000 requests")
        header("dispatcher", "JCT mean / p99 (s)", "TPOT mean / p99 (ms)", "preemptions")
        for policy in ("power2", "random", "round_robin", "least_loaded", "oracle"):
            result = simulate(specs, config("tetriinfer", V100, prefill=1, decode=4, dispatch_policy=policy), cost)
            s = result.summary()
            row(policy, mean_p99(s.jct, ".1f"), mean_p99(s.tpot, ".0f", 1e3), result.num_preemptions)


def shifting_load(seed: int = 0) -> list[RequestSpec]:
    """Prompt-heavy traffic for 60 s, then decode-heavy traffic for 60 s."""
    first = make_workload("hpld", 3600, seed=seed, arrival="poisson", rate=60.0, max_total_tokens=8192)
    second = make_workload("lphd", 4800, seed=seed + 1, arrival="poisson", rate=80.0, max_total_tokens=8192)
    offset = max(60.0, first[-1].arrival_s)
    return first + [
        RequestSpec(len(first) + r.request_id, offset + r.arrival_s, r.prompt_tokens, r.output_tokens) for r in second
    ]


def flip() -> None:
    """Flip on and off (H100 / Llama-3-8B, 4 GPUs): a load shifting from prompt-heavy to
    decode-heavy, and steady loads on a badly split cluster."""
    cost = RooflineCostModel.from_names(*H100)
    on = FlipConfig(enabled=True, idle_s=1.0, cooldown_s=5.0)
    scenarios = (
        ("shift: 60 s hpld at 60 req/s, then 60 s lphd at 80 req/s", shifting_load(), (2, 2)),
        ("mixed, Poisson 60 req/s, 3000 requests", poisson("mixed", 3000, 60), (1, 3)),
        ("mixed, Poisson 100 req/s, 3000 requests", poisson("mixed", 3000, 100), (1, 3)),
        ("lphd, Poisson 160 req/s, 3000 requests", poisson("lphd", 3000, 160), (2, 2)),
    )
    header("load", "system", "flips", "TTFT mean / p99 (s)", "TPOT mean / p99 (ms)", "JCT mean / p99 (s)",
           "resource time (s)")
    for label, specs, (prefill, decode) in scenarios:
        split = dict(prefill=prefill, decode=decode, chunk_size=2048)
        for name, cfg in (
            ("vllm (4)", config("vllm", H100, instances=4)),
            (f"tetriinfer {prefill}P+{decode}D, flip off", config("tetriinfer", H100, **split)),
            (f"tetriinfer {prefill}P+{decode}D, flip on", config("tetriinfer", H100, flip=on, **split)),
        ):
            result = simulate(specs, cfg, cost)
            s = result.summary()
            row(label, name, result.num_flips, mean_p99(s.ttft), mean_p99(s.tpot, ".0f", 1e3), mean_p99(s.jct),
                f"{s.resource_time_s:.0f}")


def speed(num_requests: int = 100_000) -> None:
    """Wall time of 100k requests on a 16-instance cluster (run under `taskset -c 0` for one core)."""
    cost = RooflineCostModel.from_names(*H100)
    specs = poisson("mixed", num_requests, 250.0)
    print(f"\n#### {num_requests} mixed requests, Poisson 250 req/s, H100 / Llama-3-8B, 16 instances")
    header("system", "wall (s)", "events", "simulated span (s)", "JCT mean (s)")
    for name, cfg in (
        ("tetriinfer 8P+8D", config("tetriinfer", H100, prefill=8, decode=8, chunk_size=2048)),
        ("disagg 8P+8D", config("disagg", H100, prefill=8, decode=8, chunk_size=2048)),
        ("vllm x16", config("vllm", H100, instances=16)),
        ("sarathi x16", config("sarathi", H100, instances=16, chunk_size=2048)),
    ):
        start = time.perf_counter()
        result = simulate(specs, cfg, cost)
        wall = time.perf_counter() - start
        row(name, f"{wall:.1f}", f"{result.num_events:,}", f"{result.end_s - result.start_s:.0f}",
            f"{result.summary().jct.mean:.2f}")


EXPERIMENTS = {
    "paper": paper,
    "h100-mixes": h100_mixes,
    "h100": h100,
    "sjf": sjf,
    "admission": admission,
    "dispatch": dispatch,
    "flip": flip,
    "speed": speed,
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    names = list(EXPERIMENTS) if (which := parser.parse_args().experiment) == "all" else [which]
    for name in names:
        print(f"\n### {name}")
        EXPERIMENTS[name]()
