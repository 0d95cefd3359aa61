"""Prefill and decode throughput of one engine (not a test).

    python scripts/bench_engine.py                       # tiny model on CPU
    python scripts/bench_engine.py --model llama3-8b --device cuda --dtype bfloat16
    (where the checkout has no .git, e.g. on the GPU machine, set TETRIINFER_COMMIT)

Prefill: prompts of `--prompt-len` tokens through chunks of `--chunk-size`; tokens/s counts real
prompt tokens. Decode: `--batch` requests at `--context` tokens of context, decode steps only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from tetriinfer import LLM, SamplingParams


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_steps(llm: LLM, device: str, want_prefill: bool) -> tuple[float, int, int, float]:
    """Run steps until all requests finish; of the steps of the wanted kind (prefill or decode),
    return (seconds, tokens, steps, median seconds per step). A step is timed whole, scheduling
    included, from a synchronised GPU to a synchronised GPU."""
    engine, times, tokens = llm.engine, [], 0
    schedule = engine.scheduler.schedule
    while engine.has_unfinished_requests():
        sync(device)
        start = time.perf_counter()
        plan = schedule()
        engine.scheduler.schedule = lambda p=plan: p  # step() runs exactly this plan
        engine.step(final_only=True)  # as offline runs step: no per-request output objects
        sync(device)
        elapsed = time.perf_counter() - start
        del engine.scheduler.schedule
        if bool(plan.prefill) == want_prefill:
            times.append(elapsed)
            tokens += sum(p.length for p in plan.prefill) if plan.prefill else len(plan.decode)
    return sum(times), tokens, len(times), statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()

    # Synchronised steps, one at a time (timed_steps): the plain loop, not async scheduling.
    llm = LLM(args.model, device=args.device, dtype=args.dtype, chunk_size=args.chunk_size, async_scheduling=False)
    g = torch.Generator().manual_seed(0)
    vocab = min(llm.engine.arch.vocab_size, 256)

    def prompts(n: int, length: int) -> list[list[int]]:
        return torch.randint(0, vocab, (n, length), generator=g).tolist()

    def measure() -> dict:
        out = {}
        for ids in prompts(args.num_prompts, args.prompt_len):
            llm.engine.add_request(f"p-{time.monotonic_ns()}", prompt_token_ids=ids,
                                   sampling=SamplingParams(max_tokens=1, ignore_eos=True))
        secs, toks, steps, _ = timed_steps(llm, args.device, want_prefill=True)
        out["prefill"] = {"prompt_len": args.prompt_len, "tokens": toks, "steps": steps, "seconds": secs,
                          "tokens_per_s": toks / secs, "ms_per_chunk": 1e3 * secs / steps}
        out["decode"] = []
        for batch in args.batch:
            for ids in prompts(batch, args.context):
                llm.engine.add_request(f"d-{time.monotonic_ns()}", prompt_token_ids=ids,
                                       sampling=SamplingParams(max_tokens=args.decode_steps + 1, ignore_eos=True))
            secs, toks, steps, median = timed_steps(llm, args.device, want_prefill=False)
            out["decode"].append({"batch": batch, "context": args.context, "steps": steps, "seconds": secs,
                                  "tokens_per_s": toks / secs, "ms_per_step": 1e3 * secs / steps,
                                  "median_ms_per_step": 1e3 * median})
        return out

    measure()  # warm-up: the same shapes, so kernel compilation and allocator growth are not timed
    results = {"model": args.model, "device": args.device, "dtype": args.dtype, "chunk_size": args.chunk_size,
               "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
               "commit": os.environ.get("TETRIINFER_COMMIT") or subprocess.run(
                   ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
    results.update(measure())

    print(f"{args.model} on {args.device} ({args.dtype}), chunk {args.chunk_size}, commit {results['commit']}")
    p = results["prefill"]
    print(f"prefill  {p['prompt_len']}-token prompts: {p['tokens_per_s']:>10.0f} tok/s  ({p['ms_per_chunk']:.1f} ms/chunk)")
    for d in results["decode"]:
        print(f"decode   batch {d['batch']:>4} ctx {d['context']}: {d['tokens_per_s']:>10.0f} tok/s  ({d['ms_per_step']:.2f} ms/step)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
