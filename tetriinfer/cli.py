"""`tetriinfer` command line: one subcommand per module that owns it.

Each module listed in SUBCOMMANDS has `add_parser(subparsers)`, which adds its subcommand and sets
`func(args) -> int` on it. Modules keep heavy imports (torch) inside `func`, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

SUBCOMMANDS = (
    "tetriinfer.entrypoints.generate",
    "tetriinfer.entrypoints.profile",
    "tetriinfer.entrypoints.serve",
    "tetriinfer.entrypoints.top",
    "tetriinfer.entrypoints.dashboard",
    "tetriinfer.predictor.cli",
    "tetriinfer.bench.simulate",
    "tetriinfer.bench.cli",
)


# Help for flags whose module gives none (by subcommand path, then by flag), so that every entry of
# every `--help` says what it does; a module's own help text wins. The owners may move these in.
FALLBACK_HELP = {
    "predictor prepare": {"--out": "folder to write train/val/test and the cross-distribution JSONL files to"},
    "predictor train": {
        "--loss": "ce: bucket logits only (the paper); rank: the ranking score only (pairwise); ce+rank: both",
        "--granularity": "bucket width in output tokens",
        "--open-from": "output length from which the last bucket is open-ended",
        "--epochs": "passes over the training split",
        "--batch-size": "examples per optimiser step",
        "--vocab-size": "built-in models: hashed prompt-token vocabulary",
        "--dim": "built-in models: embedding width",
        "--max-prompt-tokens": "prompt tokens the predictor reads (the rest is cut)",
        "--eval-every": "optimiser steps between validation passes (the best one is kept)",
        "--seed": "initialisation and shuffling",
        "--threads": "torch CPU threads",
        "--lr": "learning rate (AdamW)",
        "--weight-decay": "AdamW weight decay",
        "--rank-weight": "ce+rank: weight of the ranking loss",
    },
    "predictor eval": {"--batch-size": "prompts per predict() call"},
    "predictor table": {"reports": "JSON reports written by `predictor eval --json`"},
    "simulate": {
        "--system": "the system simulated (without --compare)",
        "--num-requests": "requests drawn from the workload (a trace sends every row)",
        "--tp": "tensor-parallel GPUs per instance (the cost model's)",
        "--prefill-instances": "TetriInfer / disagg: prefill instances",
        "--decode-instances": "TetriInfer / disagg: decode instances",
        "--chunk-size": "prefill tokens per step (TetriInfer's chunks, sarathi's token budget)",
        "--prefill-policy": "order of a prefill instance's queue",
        "--sort-window": "queued requests the prefill policy sorts at a time (the paper's PrefillSchedBatch)",
        "--dispatch": "how a prefill instance picks the decode instance",
        "--admission": "when a decode instance admits a request",
        "--max-num-seqs": "requests running at once per instance",
        "--max-num-batched-tokens": "vllm baseline: prompt tokens per prefill step",
        "--seed": "workload draw, arrivals and the simulation's random choices",
        "--no-progress": "no progress bar",
    },
    "bench serve": {
        "--api-key": "sent as 'Authorization: Bearer KEY' (the server's --api-key)",
        "--no-progress": "no progress bar",
    },
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tetriinfer", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMANDS:
        importlib.import_module(module_name).add_parser(subparsers)
    parser.allow_abbrev = False
    for path, sub in walk_subparsers(parser):
        sub.allow_abbrev = False  # `--max-num-batched-token` must not run as `--max-num-batched-tokens`
        # Every subcommand shows its defaults, whatever formatter its module chose.
        if sub.formatter_class is argparse.HelpFormatter:
            sub.formatter_class = argparse.ArgumentDefaultsHelpFormatter
        fallback = FALLBACK_HELP.get(" ".join(path), {})
        for action in sub._actions:
            if not action.help:
                name = action.option_strings[-1] if action.option_strings else action.dest
                action.help = fallback.get(name)
    return parser


def walk_subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(("predictor", "train"), its parser), ... for every subcommand under `parser`, at any depth."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from walk_subparsers(sub, (*path, name))


def unknown_flags_message(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> str:
    """`unrecognized arguments: ...`, naming for each unknown flag the closest one `command` has."""
    sub = dict(walk_subparsers(parser)).get((command,), parser)
    known = [o for _, p in [((), sub), *walk_subparsers(sub)] for a in p._actions for o in a.option_strings]
    hints = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--"):
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            hints.append(f"{flag}: did you mean {close[0]}?" if close else f"{flag}: no such flag (--help lists them; docs/compatibility.md maps vLLM's)")
    return f"unrecognized arguments: {' '.join(unknown)}" + ("".join(f"\n  {h}" for h in hints))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(unknown_flags_message(parser, args.command, unknown))
    try:
        code = int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, not a traceback
        parser.exit(2, f"tetriinfer {args.command}: error: {e}\n")
    if argv is None and getattr(args, "exit_now", False):  # the console script, done: skip the teardown
        from tetriinfer.cluster.supervisor import exit_now

        exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
