"""`tetriinfer predictor {prepare,train,eval,table}`: build data, train, evaluate, tabulate length predictors."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

DEFAULT_DATA_ROOT = "../shared/data"  # where the text data sits beside a checkout; $TETRIINFER_DATA_DIR wins
SOURCES = ("sharegpt-v3-partial", "alpaca-eval", "gsm8k")
SCORE_HELP = ("what requests are ranked by: `head` (the score output), `expected` (expected length under the "
              "bucket probabilities) or `expected_log_length` (expected log length under them); default: {}")


def data_root(arg: str | None) -> Path:
    """--data-root, else $TETRIINFER_DATA_DIR (as the workloads read it), else ../shared/data; an
    error naming the folders `prepare` needs when they are not there."""
    from tetriinfer.bench.workload import DATA_DIR_ENV

    root = Path(arg or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_ROOT)
    missing = [name for name in SOURCES if not (root / name).is_dir()]
    if missing:
        raise SystemExit(f"predictor prepare: {root} lacks {', '.join(missing)}; pass --data-root or set "
                         f"${DATA_DIR_ENV} to a folder with {', '.join(SOURCES)} (the text data is not shipped: "
                         "ShareGPT V3, AlpacaEval outputs, GSM8K test; see docs/predictor.md)")
    return root


def _prepare(args: argparse.Namespace) -> int:
    from tetriinfer.predictor.examples import write_examples
    from tetriinfer.predictor.sources import (
        alpaca_eval_examples, gsm8k_examples, sharegpt_examples, split_examples,
    )

    root, out = data_root(args.data_root), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = split_examples(sharegpt_examples(root / "sharegpt-v3-partial", args.context_chars))
    files["alpaca-eval"] = alpaca_eval_examples(root / "alpaca-eval")
    files["gsm8k"] = gsm8k_examples(root / "gsm8k")
    for name, examples in files.items():
        write_examples(out / f"{name}.jsonl", examples)
        print(f"{out / name}.jsonl: {len(examples)} examples")
    return 0


def _train(args: argparse.Namespace) -> int:
    from tetriinfer.predictor.config import TrainConfig
    from tetriinfer.predictor.train import train

    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__})
    meta = train(cfg)
    print(json.dumps(meta.training, indent=1))
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    import torch

    from tetriinfer.predictor.ensemble import combine

    torch.set_num_threads(args.threads)
    print(json.dumps(combine(args.runs, args.out, args.data, args.score), indent=1))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from tetriinfer.predictor.evaluate import evaluate
    from tetriinfer.predictor.examples import read_examples

    torch.set_num_threads(args.threads)
    examples = read_examples(args.data)[: args.limit]
    if args.online is not None:
        from tetriinfer.predictor.prequential import evaluate_stream

        report = evaluate_stream(args.model, examples, args.online, args.probe).as_dict()
        report.update(model=str(args.model or "default"), data=str(args.data), probe=args.probe)
        return _print_report(report, args.json)
    report = evaluate(args.model, examples, batch_size=args.batch_size, device=args.device).as_dict()
    report.update(model=str(args.model or "default"), data=str(args.data))
    return _print_report(report, args.json)


def _print_report(report: dict, json_path: str | None) -> int:
    text = json.dumps(report, indent=1)
    print(text)
    if json_path:
        Path(json_path).write_text(text + "\n")
    return 0


def _table(args: argparse.Namespace) -> int:
    from tetriinfer.predictor.report import markdown_table, plot_label_shares

    reports = [json.loads(Path(p).read_text()) for p in args.reports]
    print(markdown_table(reports))
    if args.plot:
        from tetriinfer.bench.report import save_plot

        save_plot(lambda path: plot_label_shares(reports, path), args.plot)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from tetriinfer.predictor.artifact import SCORE_SOURCES
    from tetriinfer.predictor.config import LOSSES, SELECTIONS, TrainConfig
    from tetriinfer.predictor.features import FEATURE_SETS

    defaults = TrainConfig(data="", out="")
    parser = subparsers.add_parser("predictor", help="decode-length predictor: prepare data, train, evaluate")
    commands = parser.add_subparsers(dest="predictor_command", required=True)

    prepare = commands.add_parser("prepare", help="write train/val/test (ShareGPT) and cross-distribution JSONL files")
    prepare.add_argument("--data-root", default=None,
                         help=f"folder with {', '.join(SOURCES)} (default: $TETRIINFER_DATA_DIR, else {DEFAULT_DATA_ROOT})")
    prepare.add_argument("--out", required=True)
    prepare.add_argument("--context-chars", type=int, default=2000, help="earlier turns kept in a prompt (chars)")
    prepare.set_defaults(func=_prepare)

    tr = commands.add_parser("train", help="train a predictor from DATA/train.jsonl and DATA/val.jsonl")
    tr.add_argument("--data", required=True, help="folder written by `predictor prepare`")
    tr.add_argument("--out", required=True, help="predictor directory to write")
    tr.add_argument("--model", default=defaults.model, help="`bag`, `transformer`, or a local Hugging Face model dir")
    tr.add_argument("--loss", default=defaults.loss, choices=LOSSES)
    tr.add_argument("--label-tokenizer", default=None, help="served model's tokenizer.json (or its dir) to count labels")
    for name in ("granularity", "open_from", "epochs", "batch_size", "vocab_size", "dim", "max_prompt_tokens",
                 "eval_every", "seed", "threads"):
        tr.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "weight_decay", "rank_weight"):
        tr.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    tr.add_argument("--hidden", type=int, default=defaults.hidden, help="built-in models: MLP head width")
    tr.add_argument("--features", default=defaults.features, choices=FEATURE_SETS,
                    help="built-in models: `shape` (4 conversation-shape numbers) or `text` (34: shape + cheap text cues)")
    tr.add_argument("--select", default=defaults.select, choices=SELECTIONS,
                    help="validation metric that keeps the checkpoint (auto: tau for --loss rank, else accuracy)")
    tr.add_argument("--max-train-examples", type=int, default=None, help="subsample the training split")
    tr.add_argument("--score", default=None, choices=SCORE_SOURCES,
                    help=SCORE_HELP.format("`expected` for --loss ce, else `head`"))
    tr.set_defaults(func=_train)

    ens = commands.add_parser("ensemble", help="combine trained built-in predictors (e.g. seeds) into one directory")
    ens.add_argument("runs", nargs="+", help="predictor directories written by `predictor train` (same shape)")
    ens.add_argument("--data", required=True, help="folder written by `predictor prepare` (its val.jsonl sets "
                     "each member's score scale)")
    ens.add_argument("--out", required=True, help="predictor directory to write")
    ens.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ens.add_argument("--score", default=None, choices=SCORE_SOURCES,
                     help=SCORE_HELP.format("`head` (the averaged score) if every member has it, else `expected`"))
    ens.set_defaults(func=_ensemble)

    ev = commands.add_parser("eval", help="evaluate a predictor directory on a JSONL example file")
    ev.add_argument("--model", default=None, help="predictor directory (default: the shipped one)")
    ev.add_argument("--data", required=True, help="JSONL: prompt + response or output_tokens per line")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ev.add_argument("--device", default="cpu", help="cpu or cuda")
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    ev.add_argument("--json", default=None, help="also write the report here")
    ev.add_argument("--online", type=int, default=None, metavar="N",
                    help="prequential: predict each example before its label, learn every N examples (0: prior alone)")
    ev.add_argument("--probe", default=None, metavar="HF_DIR",
                    help="with --online: learn on this causal LM's last prompt hidden state (a TRAIL-style probe)")
    ev.set_defaults(func=_eval)

    table = commands.add_parser("table", help="markdown table from `eval --json` reports")
    table.add_argument("reports", nargs="+")
    table.add_argument("--plot", default=None, help="also save a bar plot of label bucket shares per data set")
    table.set_defaults(func=_table)
