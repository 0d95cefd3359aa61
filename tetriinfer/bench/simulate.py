"""`tetriinfer simulate`: run serving systems over a workload in the discrete-event simulator
(`bench` drives `sim` with its workloads and reports, as `bench serve` drives a real server).

One system prints its metrics; `--compare vllm,sarathi,tetriinfer` runs each on the very same
requests, prints them side by side (perf/$ relative to the first) and plots TTFT/JCT CDFs.
"""

from __future__ import annotations

import argparse

from tetriinfer.bench.trace_files import TRACE_FORMATS
from tetriinfer.bench.workload import ALL_WORKLOADS
from tetriinfer.config import SYSTEMS, ClusterConfig, ClusterShape, EngineSchedulerConfig, FlipConfig, PolicyConfig, SimConfig
from tetriinfer.config.cluster import GPU_SHARING
from tetriinfer.sched.admission import ADMISSION_POLICIES
from tetriinfer.sched.dispatcher import DISPATCH_POLICIES
from tetriinfer.sched.prefill_queue import PREFILL_POLICIES
from tetriinfer.sched.router import DISAGG_POLICIES

_POLICY, _CLUSTER, _STEP, _SIM = PolicyConfig(), ClusterConfig(), EngineSchedulerConfig(), SimConfig()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate", help="simulate a serving cluster (TetriInfer or a baseline) on a workload",
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--system", default=_CLUSTER.system, choices=SYSTEMS)
    p.add_argument("--compare", default=None, help="comma-separated systems run on the same requests")
    p.add_argument("--workload", default="mixed", help="|".join(ALL_WORKLOADS))
    p.add_argument("--trace", default=None, help=TRACE_FORMATS)
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--rate", type=float, default=None,
                   help="Poisson arrivals at this many requests/s "
                        "(default: closed batch; traces keep their timestamps)")
    p.add_argument("--gpu", default=_CLUSTER.gpu, help="v100|a100|h100|h200")
    p.add_argument("--model", default=_CLUSTER.model, help="model preset, e.g. llama3-8b, opt-13b")
    p.add_argument("--tp", type=int, default=_CLUSTER.tp)
    p.add_argument("--profile", default=None,
                   help="measured profile JSON (docs/profile-format.md) instead of the roofline")
    p.add_argument("--link-gbps", type=float, default=None, help="KV link bandwidth (default: the cost model's)")
    p.add_argument("--prefill-instances", type=int, default=_CLUSTER.shape.num_prefill)
    p.add_argument("--decode-instances", type=int, default=_CLUSTER.shape.num_decode)
    p.add_argument("--instances", type=int, default=None,
                   help="colocated baseline instances (default: prefill + decode instances, equal GPUs)")
    p.add_argument("--instances-per-gpu", type=int, default=_CLUSTER.instances_per_gpu,
                   help="instances sharing one GPU (instance i on GPU i // N; prefill ids come first), as `serve "
                        "--device cuda:0` runs them: time-sliced, one forward step at a time, or see --gpu-sharing")
    p.add_argument("--gpu-sharing", default=_CLUSTER.gpu_sharing, choices=GPU_SHARING,
                   help="how instances on one GPU share it: time-slice (one step at a time) or mps (side by side "
                        "on SM shares, each step slowed by its share and its neighbours' work; sim/gpu.py)")
    p.add_argument("--mps-sm-shares", default=",".join(map(str, _CLUSTER.mps_sm_shares)), metavar="P,D",
                   help="with --gpu-sharing mps: percent of the SMs for prefill and for decode instances, as "
                        "`serve --mps-sm-shares` (by the role an instance starts in; colocated instances get all)")
    p.add_argument("--chunk-size", type=int, default=_STEP.chunk_size)
    p.add_argument("--policy", dest="disagg_policy", default=_POLICY.disagg_policy, choices=DISAGG_POLICIES,
                   help="tetriinfer: adaptive (a decode instance prefills a request itself, a prefill instance "
                        "decodes one, when cheaper) or paper (the fixed split)")
    p.add_argument("--interference-weight", type=float, default=_POLICY.interference_weight,
                   help="adaptive: weight of the slowdown a local prefill imposes on running decodes")
    p.add_argument("--local-ttft-margin", dest="local_ttft_margin_s", type=float, default=_POLICY.local_ttft_margin_s,
                   help="adaptive: a decode instance prefills a request itself whenever that saves more than this "
                        "many seconds of TTFT, whatever the interference (inf: never by this rule alone)")
    p.add_argument("--handoff-after-tokens", type=int, default=_POLICY.handoff_after_tokens,
                   help="adaptive: output tokens a prefill instance generates itself before it hands a request "
                        "to a decode instance (a request ending by then never moves; 1: hand off at once)")
    p.add_argument("--cache-aware-routing", action=argparse.BooleanOptionalAction,
                   default=_POLICY.cache_aware_routing,
                   help="place requests where their prefix is cached, weighed against queues (tetriinfer's "
                        "router, the baselines' global scheduler); off: least loaded")
    p.add_argument("--prefix-cache-fraction", type=float, default=_SIM.prefix_cache_fraction,
                   help="each instance's prefix cache, as a fraction of its KV capacity (0: no prefix caching; "
                        "requests share prefixes through hash ids: Mooncake traces, the conversation workload)")
    p.add_argument("--prefill-policy", default=_POLICY.prefill_policy, choices=PREFILL_POLICIES)
    p.add_argument("--sort-window", type=int, default=_POLICY.sort_window)
    p.add_argument("--dispatch", default=None, choices=DISPATCH_POLICIES,
                   help="decode instance for a prefilled request; None: power2 with --policy paper, least_loaded "
                        "with --policy adaptive")
    p.add_argument("--admission", default=_POLICY.admission_policy, choices=ADMISSION_POLICIES)
    p.add_argument("--accuracy", type=float, default=_POLICY.predictor_accuracy, help="length predictor accuracy")
    p.add_argument("--max-num-seqs", type=int, default=_STEP.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=_POLICY.max_num_batched_tokens)
    p.add_argument("--flip", action="store_true", help="let idle instances flip between prefill and decode")
    p.add_argument("--ttft-slo", type=float, default=None, help="seconds")
    p.add_argument("--tpot-slo", type=float, default=None, help="seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write summaries as JSON here")
    p.add_argument("--plot", default=None, help="TTFT/JCT CDF image (default with --compare: beside --json, else simulate-<workload>.png)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def build_specs(args: argparse.Namespace) -> list:
    from tetriinfer.bench.workload import build_specs
    from tetriinfer.presets import get_preset

    # Trace rows are simulated as written; workloads drop requests beyond the model's context.
    max_len = None if args.trace else get_preset(args.model)["max_position_embeddings"]
    return build_specs(args.workload, args.num_requests, trace=args.trace, rate=args.rate, seed=args.seed,
                       max_total_tokens=max_len)


def build_cost(args: argparse.Namespace):
    from tetriinfer.sim.cost import RooflineCostModel, TableCostModel

    link = {} if args.link_gbps is None else {"link_gbps": args.link_gbps}
    if args.profile:
        return TableCostModel.from_file(args.profile, **link)
    return RooflineCostModel.from_names(args.gpu, args.model, args.tp, **link)


def _sm_shares(text: str) -> tuple[int, int]:
    try:
        prefill, decode = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--mps-sm-shares takes two percentages 'PREFILL,DECODE' such as 40,60; got {text!r}") from None
    return prefill, decode


def build_config(args: argparse.Namespace, system: str):
    from tetriinfer.config import SLOConfig

    cluster = ClusterConfig(
        system=system, shape=ClusterShape(args.prefill_instances, args.decode_instances,
                                          args.instances or args.prefill_instances + args.decode_instances),
        gpu=args.gpu, model=args.model, tp=args.tp, instances_per_gpu=args.instances_per_gpu,
        gpu_sharing=args.gpu_sharing, mps_sm_shares=_sm_shares(args.mps_sm_shares),
    )
    policy = PolicyConfig(
        disagg_policy=args.disagg_policy, interference_weight=args.interference_weight,
        local_ttft_margin_s=args.local_ttft_margin_s,
        handoff_after_tokens=args.handoff_after_tokens,
        prefill_policy=args.prefill_policy, sort_window=args.sort_window,
        dispatch_policy=args.dispatch, admission_policy=args.admission, predictor_accuracy=args.accuracy,
        max_num_batched_tokens=args.max_num_batched_tokens, cache_aware_routing=args.cache_aware_routing,
    )
    step = EngineSchedulerConfig(chunk_size=args.chunk_size, max_num_seqs=args.max_num_seqs)
    return SimConfig(cluster, policy, FlipConfig(enabled=args.flip), SLOConfig(args.ttft_slo, args.tpot_slo), args.seed,
                     step, prefix_cache_fraction=args.prefix_cache_fraction)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path

    from tetriinfer.bench.report import format_table, plot_distributions, save_plot
    from tetriinfer.sim.cluster import simulate

    systems = [s.strip() for s in args.compare.split(",")] if args.compare else [args.system]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; choose from {SYSTEMS}")
    specs = build_specs(args)
    cost = build_cost(args)
    summaries, records, report = {}, {}, {}
    for system in systems:
        config = build_config(args, system)
        result = simulate(specs, config, cost, progress=not args.no_progress)
        summaries[system] = result.summary(config.slo.ttft_s, config.slo.tpot_s)
        records[system] = result.records()
        report[system] = {
            "config": dataclasses.asdict(config),
            "summary": dataclasses.asdict(summaries[system]),
            "num_preemptions": result.num_preemptions,
            "num_flips": result.num_flips,
            "num_events": result.num_events,
            "prefix_hit_rate": result.prefix_hit_rate,
            "prefix_hit_tokens": result.prefix_hit_tokens,
            "prefix_queried_tokens": result.prefix_queried_tokens,
            "kv_skipped_tokens": result.kv_skipped_tokens,
        }
    hardware = f"profile {args.profile}" if args.profile else f"{args.gpu} / {args.model} (roofline)"
    print(f"{len(specs)} requests of {args.trace or args.workload} on {hardware}")
    print(format_table(summaries))
    for system, entry in report.items():
        if entry["prefix_queried_tokens"]:
            skipped = f"; KV moves skipped {entry['kv_skipped_tokens']:,} held tokens" if entry["kv_skipped_tokens"] else ""
            print(f"{system}: prefix cache hit rate {entry['prefix_hit_rate']:.1%} of prompt tokens{skipped}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json_out}")
    default_plot = str(Path(args.json_out).with_suffix(".png")) if args.json_out else f"simulate-{args.workload}.png"
    plot = args.plot or (default_plot if len(systems) > 1 else None)
    if plot:
        save_plot(lambda path: plot_distributions(records, path), plot, asked=bool(args.plot))
    return 0
