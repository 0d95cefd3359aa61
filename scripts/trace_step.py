"""Where one engine step spends its time (not a test): CPU wall time of each phase of a decode step,
plus a torch-profiler trace of a few steps.

    PYTHONPATH=. python scripts/trace_step.py --model llama3-8b --batch 256 --context 1024 --out DIR

Phases: scheduling (`scheduler.schedule`), input preparation (`runner.prepare`), forward launch
(graph replay or eager launches, LM head), sampling launch, waiting for the sampled tokens (the GPU
finishing a step), bookkeeping (the rest of `engine.step`: token append, stop checks, outputs).
With `--async-scheduling` a step waits for the tokens of the step before, queued while this one
was planned, so the wait shrinks by the CPU work that now overlaps the GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from tetriinfer import LLM, SamplingParams
from tetriinfer.engine.sampler import SampledTokens


def timed(fn, bucket: list[float]):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            bucket.append(time.perf_counter() - start)
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--async-scheduling", action="store_true")
    ap.add_argument("--quantization", choices=["fp8"], default=None)
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    sync = torch.cuda.synchronize if args.device != "cpu" else (lambda: None)
    out.mkdir(parents=True, exist_ok=True)

    llm = LLM(args.model, device=args.device, dtype="bfloat16" if args.device != "cpu" else "float32", chunk_size=2048, max_num_seqs=args.batch, async_scheduling=args.async_scheduling,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    engine = llm.engine
    g = torch.Generator().manual_seed(0)
    vocab = min(1000, engine.arch.vocab_size)
    for i in range(args.batch):
        engine.add_request(f"r{i}", prompt_token_ids=torch.randint(0, vocab, (args.context,), generator=g).tolist(),
                           sampling=SamplingParams(max_tokens=2 * args.steps + 20, temperature=0, ignore_eos=True))
    while engine.scheduler.waiting:  # prefill everything first
        engine.step(final_only=True)
    for _ in range(5):
        engine.step(final_only=True)

    phases: dict[str, list[float]] = defaultdict(list)
    runner = engine.runner
    engine.scheduler.schedule = timed(engine.scheduler.schedule, phases["schedule"])
    runner.prepare = timed(runner.prepare, phases["prepare"])
    runner.execute = timed(runner.execute, phases["execute"])
    engine.sampler = timed(engine.sampler, phases["sample"])
    SampledTokens.result = timed(SampledTokens.result, phases["wait"])
    totals = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        engine.step(final_only=True)
        totals.append(time.perf_counter() - start)

    m = {name: 1e3 * statistics.median(v) for name, v in phases.items()}
    total = 1e3 * statistics.median(totals)
    median = {
        "schedule": m["schedule"],
        "prepare inputs": m["prepare"],
        "forward launch + LM head (graph replay on GPU)": m["execute"] - m["prepare"],
        "sampling launch": m["sample"],
        "waiting for the sampled tokens (the GPU)": m["wait"],
        "bookkeeping (append, stop checks)": total - m["schedule"] - m["execute"] - m["sample"] - m["wait"],
        "step total": total,
    }
    device_name = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    result = {"model": args.model, "batch": args.batch, "context": args.context, "device": device_name,
              "async_scheduling": args.async_scheduling,
              "quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype, "median_ms": median}
    (out / "step_phases.json").write_text(json.dumps(result, indent=1))

    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device != "cpu":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            engine.step(final_only=True)
        sync()
    prof.export_chrome_trace(str(out / "trace_3_steps.json"))
    # GPU time per step by kernel (kernels inside graph replays included): what the device itself spends.
    kernels = sorted(((e.key, e.self_device_time_total / 3e3, e.count / 3) for e in prof.key_averages()
                      if e.self_device_time_total > 0), key=lambda k: -k[1])
    result["gpu_ms_per_step"] = {"total": sum(ms for _, ms, _ in kernels),
                                 "kernels": [{"name": n, "ms": ms, "calls": c} for n, ms, c in kernels[:25]]}
    (out / "step_phases.json").write_text(json.dumps(result, indent=1))

    print(f"{args.model} decode, batch {args.batch}, context {args.context}, median of {args.steps} steps")
    for name, ms in median.items():
        print(f"  {name:<48} {ms:7.2f} ms")
    print(f"GPU kernels per step: {result['gpu_ms_per_step']['total']:.2f} ms")
    for k in result["gpu_ms_per_step"]["kernels"][:8]:
        print(f"  {k['ms']:7.3f} ms  x{k['calls']:<5.0f} {k['name'][:70]}")


if __name__ == "__main__":
    main()
