"""Probe: tail-aware routing and TPOT p99 rules for adaptive TetriInfer (docs/adaptive.md,
"Tail-aware routing and TPOT p99: what was tried").

    python docs/adaptive/tail_probe.py [--jobs 1] [--wide] [--variants "NAME;..."]

Every variant is a `PolicyConfig` override of the shipped adaptive policy: the rules live in
`tetriinfer.sched` (router options), not in this script. Default cells are keep_probe.py's 42
(4 GPUs, H100 profile and H200 roofline, seven workloads, 0.3 / 0.6 / 0.9 of capacity, 400
requests, Poisson); `--wide` runs the 2- and 8-GPU cells of every non-duplicate workload instead.
Each variant is compared cell by cell with the better of `vllm` and `sarathi` (mean JCT, goodput,
TTFT p99, TPOT p99), and with the rule before this probe (no TTFT margin): cells > 1% worse or better
on mean JCT and goodput.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import experiments  # noqa: E402

WORKLOADS = ("lpld", "hphd", "mixed", "azure-code", "azure-conv", "vidur-arxiv", "vidur-sharegpt")
INF = float("inf")
BEFORE = "before: no TTFT margin"  # the rule this probe compares every variant with, cell by cell
VARIANTS = {  # name -> PolicyConfig overrides of adaptive TetriInfer (the default: the shipped rule)
    BEFORE: {"local_ttft_margin_s": INF},
    "shipped: TTFT margin 0.1 s": {},
    "ttft margin 0.5 s": {"local_ttft_margin_s": 0.5},
    "ttft margin 0.25 s": {"local_ttft_margin_s": 0.25},
    "ttft margin 0.05 s": {"local_ttft_margin_s": 0.05},
    "ttft margin 0.02 s": {"local_ttft_margin_s": 0.02},
    # The remote-queue factor and the decode-step cap rows of tail.md ran at commit 5689338, whose
    # PolicyConfig had `remote_queue_factor` and `local_prefill_step_factor`; not adopted, removed.
}


def cells(wide: bool) -> list[tuple]:
    if wide:
        return [c for c in experiments.cells(400) if c[1] in (2, 8) and c[3] == "poisson"
                and not c[2].startswith("splitwise")]
    return [c for c in experiments.cells(400) if c[1] == 4 and c[2] in WORKLOADS and c[3] == "poisson"]


def report(rows: list[dict], names) -> None:
    def best(row, metric, pick):
        return pick(row["systems"][s][metric] for s in ("vllm", "sarathi"))

    print(f"{len(rows)} cells; ratios against the better of vllm and sarathi; 'vs before': cells > 1% worse / better than the rule before")
    print("| rule | mean JCT: median | > 1% worse | goodput: worst | > 1% worse | TTFT p99: median | lower "
          "| TPOT p99: median | lower | vs before: JCT > 1% worse / better | goodput > 1% worse / better |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        jct = [r["systems"][name]["jct_mean"] / best(r, "jct_mean", min) for r in rows]
        good = [r["systems"][name]["goodput_loose"] / best(r, "goodput_loose", max) for r in rows]
        ttft = [r["systems"][name]["ttft_p99"] / best(r, "ttft_p99", min) for r in rows]
        tpot = [r["systems"][name]["tpot_p99"] / best(r, "tpot_p99", min) for r in rows]
        sj = [r["systems"][name]["jct_mean"] / r["systems"][BEFORE]["jct_mean"] for r in rows]
        sg = [r["systems"][name]["goodput_loose"] / r["systems"][BEFORE]["goodput_loose"] for r in rows]
        print(f"| {name} | {statistics.median(jct):.3f} | {sum(x > 1.01 for x in jct)} | {min(good):.2f} "
              f"| {sum(x < 0.99 for x in good)} | {statistics.median(ttft):.2f} | {sum(x < 1 for x in ttft)} "
              f"| {statistics.median(tpot):.2f} | {sum(x < 1 for x in tpot)} "
              f"| {sum(x > 1.01 for x in sj)} / {sum(x < 0.99 for x in sj)} "
              f"| {sum(x < 0.99 for x in sg)} / {sum(x > 1.01 for x in sg)} |")


def cells_table(rows: list[dict], names, metric: str = "ttft_p99") -> None:
    """`metric` of each variant in the cells at 0.9 of capacity (sarathi first), for the tail."""
    print(f"\n{metric} at 0.9 of capacity: sarathi | " + " | ".join(names))
    for r in rows:
        if r["load"] == 0.9:
            s = r["systems"]
            print(f"{r['gpu']} {r['num_gpus']} {r['workload']:15s} {s['sarathi'][metric]:.3f} | "
                  + " | ".join(f"{s[n][metric]:.3f}" for n in names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--wide", action="store_true")
    parser.add_argument("--variants", default="", help="names separated by ; (default: all); the rule before always runs")
    parser.add_argument("--out", default="", help="write the raw rows here (JSON)")
    parser.add_argument("--cells", default="", help="also print this metric per cell at 0.9 (e.g. ttft_p99)")
    parser.add_argument("--report-only", default="", help="report from raw rows written by --out")
    args = parser.parse_args()
    names = [BEFORE] + [n for n in (args.variants.split(";") if args.variants else VARIANTS) if n != BEFORE]
    experiments.SYSTEMS = {"vllm": ("vllm", {}), "sarathi": ("sarathi", {}),
                           **{name: ("tetriinfer", VARIANTS[name]) for name in names}}
    if args.report_only:
        rows = json.loads(Path(args.report_only).read_text())
        names = [n for n in names if n in rows[0]["systems"]]
    else:
        with Pool(args.jobs) as pool:
            rows = pool.map(experiments.run_cell, cells(args.wide))
    if args.out:
        Path(args.out).write_text(json.dumps(rows))
    report(rows, names)
    if args.cells:
        cells_table(rows, names, args.cells)


if __name__ == "__main__":
    main()
