"""`tetriinfer bench serve`: drive a running OpenAI-compatible server with a workload and report.

The requests are the ones `tetriinfer simulate` builds for the same --workload/--trace/--num-requests/
--rate/--seed flags (closed batch without --rate, Poisson at --rate, traces keep their timestamps),
so a real run and a simulated one can be compared line by line. Each is a streaming /v1/completions
of token ids (ignore_eos, greedy). Metrics are taken at the client: TTFT from the send to the first
streamed token. The client cannot see instances, so resource time is makespan x --instances (each
instance counted from the start to the last finish).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tetriinfer.bench.trace_files import TRACE_FORMATS
from tetriinfer.bench.workload import ALL_WORKLOADS


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks against a running server",
                                  description="Benchmarks against a running server.")
    commands = bench.add_subparsers(dest="bench_command", required=True)
    p = commands.add_parser(
        "serve", help="send a workload to a running server and report TTFT/TPOT/JCT",
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server root (…/v1 is added)")
    p.add_argument("--workload", default="mixed", help="|".join(ALL_WORKLOADS))
    p.add_argument("--trace", default=None, help=TRACE_FORMATS)
    p.add_argument("--num-requests", type=int, default=128, help="ignored with --trace (every row is sent)")
    p.add_argument("--rate", type=float, default=None,
                   help="Poisson arrivals at this many requests/s; None: closed batch (traces keep their timestamps)")
    p.add_argument("--seed", type=int, default=0, help="workload draw, arrivals and prompt token ids")
    p.add_argument("--concurrency", type=int, default=None, help="most requests in flight; None: no cap")
    p.add_argument("--model", default=None, help="model name to request; None: the first of GET /v1/models")
    p.add_argument("--api-key", default=None)
    p.add_argument("--vocab-size", type=int, default=256, help="prompt token ids are drawn from [0, this)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="drop requests whose prompt + output exceed it, as simulate does with the "
                        "model's context; None: no cap")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="cut longer prompts to this many tokens (output lengths unchanged)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per request; None: no limit")
    p.add_argument("--instances", type=int, default=1,
                   help="GPUs/instances behind the server: resource time = this x makespan")
    p.add_argument("--label", default="server", help="system name in the table and the JSON")
    p.add_argument("--ttft-slo", type=float, default=None, help="seconds")
    p.add_argument("--tpot-slo", type=float, default=None, help="seconds")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT",
                   help="write the report as JSON here (the layout of simulate --json)")
    p.add_argument("--plot", default=None, help="TTFT/JCT CDF image; None: beside --json if given")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def cap_prompts(specs: list, max_prompt_tokens: int) -> list:
    import dataclasses

    if max_prompt_tokens < 1:
        raise ValueError(f"--max-prompt-tokens must be >= 1, got {max_prompt_tokens}")
    return [dataclasses.replace(s, prompt_tokens=min(s.prompt_tokens, max_prompt_tokens)) for s in specs]


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from tetriinfer.bench.report import format_table, plot_distributions, save_plot
    from tetriinfer.bench.serve_client import run_load_sync
    from tetriinfer.bench.workload import build_specs

    if args.instances < 1:
        raise ValueError(f"--instances must be >= 1, got {args.instances}")
    specs = build_specs(args.workload, args.num_requests, trace=args.trace, rate=args.rate, seed=args.seed,
                        max_total_tokens=args.max_model_len)
    if args.max_prompt_tokens is not None:
        specs = cap_prompts(specs, args.max_prompt_tokens)
    result = run_load_sync(args.url, specs, model=args.model, api_key=args.api_key, vocab_size=args.vocab_size,
                           progress=not args.no_progress, concurrency=args.concurrency, seed=args.seed,
                           timeout_s=args.timeout)
    print(f"{len(specs)} requests of {args.trace or args.workload} against {args.url} "
          f"in {result.wall_s:.2f} s: {len(result.records)} ok, {len(result.failures)} failed")
    for reason, count in result.failures_by_reason().items():
        example = next(f for f in result.failures if f.reason == reason)
        print(f"  failed {count}x {reason} (e.g. request {example.request_id}: {example.error[:120]})")
    asked = {s.request_id: s.output_tokens for s in specs}
    short = sum(1 for r in result.records if r.output_tokens != asked[r.request_id])
    if short:
        print(f"  note: {short} requests streamed a different number of tokens than max_tokens asked")
    if not result.records:
        print("no request succeeded: nothing to summarize")
        return 1

    summary = result.summary(args.instances, ttft_slo_s=args.ttft_slo, tpot_slo_s=args.tpot_slo)
    print(format_table({args.label: summary}))

    config = {k: getattr(args, k) for k in (
        "url", "workload", "trace", "num_requests", "rate", "seed", "concurrency", "model", "vocab_size",
        "max_model_len", "max_prompt_tokens", "timeout", "instances", "ttft_slo", "tpot_slo")}
    config["model"] = result.model
    report = {args.label: {
        "config": config,
        "summary": dataclasses.asdict(summary),
        "num_sent": len(specs),
        "num_failures": len(result.failures),
        "failures_by_reason": result.failures_by_reason(),
        "failures": [dataclasses.asdict(f) for f in result.failures],
        "wall_s": result.wall_s,
    }}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json_out}")
    plot = args.plot or (str(Path(args.json_out).with_suffix(".png")) if args.json_out else None)
    if plot:
        save_plot(lambda path: plot_distributions({args.label: result.records}, path), plot, asked=bool(args.plot))
    return 0
