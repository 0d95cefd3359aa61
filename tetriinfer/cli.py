"""`tetriinfer` command line: one subcommand per module that owns it.

Each module listed in SUBCOMMANDS has `add_parser(subparsers)`, which adds its subcommand and sets
`func(args) -> int` on it. Modules keep heavy imports (torch) inside `func`, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = (
    "tetriinfer.entrypoints.generate",
    "tetriinfer.entrypoints.profile",
    "tetriinfer.entrypoints.serve",
    "tetriinfer.predictor.cli",
    "tetriinfer.sim.cli",
    "tetriinfer.bench.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tetriinfer", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMANDS:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
