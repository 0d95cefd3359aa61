"""`tetriinfer profile`: measure step times of one engine and write the simulator's profile file."""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess

from tetriinfer.entrypoints.generate import add_engine_arguments, engine_kwargs


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v]
    if not values or any(v < 0 for v in values) or sorted(set(values)) != values:
        raise argparse.ArgumentTypeError(f"need increasing non-negative integers, got {text!r}")
    return values


CHUNK_TOKENS = (256, 512, 1024, 2048, 4096)
CONTEXT_TOKENS = (0, 1024, 4096)
BATCH_SIZES = (1, 8, 32, 64, 128, 256)
CONTEXT_PER_SEQ = (128, 1024, 4096)


def _csv(values) -> str:
    return ",".join(map(str, values))


def fit_grid(args: argparse.Namespace, max_model_len: int, kv_tokens: int, block_size: int) -> None:
    """Fill the grid flags left at None with the defaults that fit the model's context and the KV
    cache; ValueError naming the flags to change when the grid (given or not) does not fit."""
    if args.chunk_tokens is None:
        args.chunk_tokens = [n for n in CHUNK_TOKENS if n <= max_model_len // 2] or [max_model_len // 2]
    if args.context_tokens is None:
        args.context_tokens = [c for c in CONTEXT_TOKENS if c + max(args.chunk_tokens) <= max_model_len]
    if args.context_per_seq is None:
        args.context_per_seq = [c for c in CONTEXT_PER_SEQ if c + 1 <= max_model_len] or [max_model_len - 1]
    if args.batch_sizes is None:
        per_seq = max(args.context_per_seq) + block_size
        args.batch_sizes = [b for b in BATCH_SIZES if b * per_seq <= kv_tokens] or [1]
    longest = max(args.chunk_tokens) + max(args.context_tokens or [0])
    if not args.context_tokens or longest > max_model_len:
        raise ValueError(
            f"profile grid exceeds the model's context of {max_model_len} tokens: the largest --chunk-tokens "
            f"({max(args.chunk_tokens)}) plus the largest --context-tokens ({max(args.context_tokens or [0])}) "
            f"must fit it; pass smaller --chunk-tokens / --context-tokens, or a larger --max-model-len if the "
            f"model allows one")
    if max(args.context_per_seq) + 1 > max_model_len:
        raise ValueError(
            f"profile grid exceeds the model's context of {max_model_len} tokens: --context-per-seq "
            f"{max(args.context_per_seq)} + the decoded token; pass smaller --context-per-seq, or a larger "
            f"--max-model-len if the model allows one")
    need = max(longest, max(args.batch_sizes) * (max(args.context_per_seq) + block_size))
    if need > kv_tokens:
        raise ValueError(
            f"profile grid needs {need} KV tokens (largest --batch-sizes x (--context-per-seq + a block)); the "
            f"cache holds {kv_tokens}: pass smaller --batch-sizes / --context-per-seq, or a larger cache "
            f"(--num-blocks, --memory-fraction)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="measure prefill/decode step times; write the simulator's profile (docs/profile-format.md)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_engine_arguments(p)
    p.add_argument("--out", required=True, help="profile JSON to write")
    # The grid's defaults are cut to the model's context and KV cache (None here: `fit_grid`), so
    # the defaults run on any model; values given explicitly are checked and never cut.
    p.add_argument("--chunk-tokens", type=_ints, default=None,
                   help=f"prefill chunk sizes to time (None: those of {_csv(CHUNK_TOKENS)} within half the context)")
    p.add_argument("--context-tokens", type=_ints, default=None,
                   help=f"cached context before each chunk (None: those of {_csv(CONTEXT_TOKENS)} that fit the "
                        "context with the largest chunk)")
    p.add_argument("--batch-sizes", type=_ints, default=None,
                   help=f"decode batch sizes to time (None: those of {_csv(BATCH_SIZES)} whose KV fits the cache)")
    p.add_argument("--context-per-seq", type=_ints, default=None,
                   help=f"tokens per sequence before a decode step (None: those of {_csv(CONTEXT_PER_SEQ)} within "
                        "the context)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per shape (median)")
    p.add_argument("--gpu", default=None, help="sim/hardware.py key recorded in the metadata (h100, h200, ...)")
    p.add_argument("--plot", default=None, help="also draw the saturation curve and decode step times (PNG)")
    p.set_defaults(func=run)


def plot_profile(profile, path: str) -> None:
    """Prefill throughput against chunk size (the paper's saturation curve, knee marked) and decode
    step time against batch size, one line per context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    chunks = profile.prefill.rows
    for j, ctx in enumerate(profile.prefill.cols):
        left.plot(chunks, [n / profile.prefill.values[i][j] for i, n in enumerate(chunks)], marker="o",
                  label=f"{ctx} cached")
    knee = profile.metadata.get("recommended_chunk_size")
    if knee:
        left.axvline(knee, color="grey", linestyle="--", label=f"knee: {knee}")
    left.set_xscale("log", base=2)
    left.set(xlabel="chunk tokens", ylabel="prefill tokens/s", title="prefill saturation")
    left.set_xticks(chunks, [str(c) for c in chunks])
    left.minorticks_off()
    left.legend()
    batches = profile.decode.rows
    for j, ctx in enumerate(profile.decode.cols):
        right.plot(batches, [1e3 * profile.decode.values[i][j] for i in range(len(batches))], marker="o",
                   label=f"{ctx} tokens/seq")
    right.set(xlabel="decode batch", ylabel="step time (ms)", title="decode step")
    right.legend()
    meta = profile.metadata
    fig.suptitle(f"{meta['model']} {meta['dtype']} on {meta['device']} (commit {meta['commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from tetriinfer.engine.profiler import knee, profile_steps
    from tetriinfer.llm import LLM
    from tetriinfer.sim.profile import Grid2D, Profile, save_profile

    kwargs = engine_kwargs(args)
    kwargs["max_num_seqs"] = max(kwargs["max_num_seqs"], max(args.batch_sizes or BATCH_SIZES))
    engine = LLM(args.model, **kwargs).engine
    blocks = engine.block_manager
    fit_grid(args, engine.max_model_len, blocks.num_blocks * blocks.block_size, blocks.block_size)

    shapes = len(args.chunk_tokens) + len(args.batch_sizes)
    with tqdm(total=shapes, desc="profile", unit="row") as bar:
        def progress(msg: str) -> None:
            bar.set_postfix_str(msg)
            bar.update(1)
        times = profile_steps(engine, args.chunk_tokens, args.context_tokens, args.batch_sizes,
                              args.context_per_seq, args.repeats, progress)

    device_name = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu"
    commit = os.environ.get("TETRIINFER_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    at_zero = [row[0] for row in times.prefill]
    recommended = knee(args.chunk_tokens, at_zero)
    dtype_bytes = torch.finfo(getattr(torch, args.dtype)).bits // 8
    profile = Profile(
        metadata={"device": device_name, "model": args.model, "dtype": args.dtype, "commit": commit or "unknown",
                  "gpu": args.gpu, "tensor_parallel": engine.config.tensor_parallel_size, "block_size": engine.block_manager.block_size,
                  "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "repeats": args.repeats, "cuda_graphs": bool(engine.runner.graphs),
                  "engine_chunk_size": engine.config.scheduler.chunk_size,
                  "recommended_chunk_size": recommended,
                  "notes": "measured by `tetriinfer profile`: median step times, synchronised, sampling included"},
        kv_bytes_per_token=engine.arch.kv_bytes_per_token * dtype_bytes,
        kv_capacity_tokens=engine.block_manager.num_blocks * engine.block_manager.block_size,
        prefill=Grid2D(tuple(args.chunk_tokens), tuple(args.context_tokens),
                       tuple(tuple(r) for r in times.prefill)),
        decode=Grid2D(tuple(args.batch_sizes), tuple(args.context_per_seq), tuple(tuple(r) for r in times.decode)),
    )
    save_profile(profile, args.out)
    if args.plot:
        from tetriinfer.bench.report import save_plot

        save_plot(lambda path: plot_profile(profile, path), args.plot)

    print(f"{args.model} on {device_name} ({args.dtype}); profile written to {args.out}")
    print("prefill (no cached context):  chunk  ms/step  tokens/s")
    for n, s in zip(args.chunk_tokens, at_zero):
        print(f"  {n:>27} {s * 1e3:8.2f} {n / s:9.0f}")
    print(f"recommended chunk_size (throughput knee: doubling gains < 10%): {recommended}")
    print("decode:  batch  " + "  ".join(f"ctx {c:>5} ms" for c in args.context_per_seq))
    for b, row in zip(args.batch_sizes, times.decode):
        print(f"  {b:>12}  " + "  ".join(f"{s * 1e3:12.2f}" for s in row))
    return 0
