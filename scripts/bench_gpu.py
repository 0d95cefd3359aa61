"""GPU benchmark of issue 6, in one run on one device (not a test):

1. ceiling: the same Llama shapes with plain cuBLAS GEMMs and PyTorch attention in CUDA graphs,
   no engine (scripts/measure_forward.py's LlamaStack);
2. engine: our decode step and prefill chunk at the same shapes (scripts/bench_engine.py's method),
   in each `--precision`, each decode step beside its bandwidth roofline;
3. offline throughput on ShareGPT-length requests (their real prompt and output lengths,
   ignore_eos): our engine, and Hugging Face transformers' continuous batching on the same requests.

    PYTHONPATH=. python scripts/bench_gpu.py --lengths .bench_data/sharegpt_1000.json --out results.json

`--lengths` is a JSON file {"pairs": [[prompt_tokens, output_tokens], ...]}; make it on a machine
with ../shared/data (see docs/benchmarks/gpu.md). Prints a short table last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import timed_steps  # noqa: E402
from fp8_check import copy_bandwidth  # noqa: E402
from measure_forward import LlamaStack, time_graph  # noqa: E402

from tetriinfer import LLM, SamplingParams  # noqa: E402
from tetriinfer.presets import get_preset  # noqa: E402


def ceiling(model: str, batches: list[int], context: int, chunk: int) -> dict:
    torch.manual_seed(0)
    stack = LlamaStack(get_preset(model), torch.device("cuda"))
    dev, bf16 = "cuda", torch.bfloat16
    out = {"decode_ms": {}, "prefill": {}}
    for b in batches:
        x = torch.randn(b, stack.hidden, device=dev, dtype=bf16)
        k = torch.randn(b, stack.kv_heads, context, stack.head_dim, device=dev, dtype=bf16)
        v = torch.randn_like(k)
        out["decode_ms"][b] = 1e3 * time_graph(lambda: stack.decode(x, k, v))
        del k, v
    x = torch.randn(chunk, stack.hidden, device=dev, dtype=bf16)
    k = torch.randn(1, stack.kv_heads, chunk, stack.head_dim, device=dev, dtype=bf16)
    v = torch.randn_like(k)
    seconds = time_graph(lambda: stack.prefill(x, k, v, 0))
    out["prefill"] = {"chunk": chunk, "ms": 1e3 * seconds, "tokens_per_s": chunk / seconds}
    del stack, x, k, v
    return out


def engine_steps(llm: LLM, batches: list[int], context: int, chunk: int, steps: int) -> dict:
    vocab = llm.engine.arch.vocab_size
    g = torch.Generator().manual_seed(0)
    out = {"decode_ms": {}, "prefill": {}, "decode_ms_async": {}}

    def add_requests(n: int, prompt_len: int, max_tokens: int) -> None:
        for i in range(n):
            llm.engine.add_request(f"r{prompt_len}-{i}-{time.monotonic_ns()}",
                                   prompt_token_ids=torch.randint(0, vocab, (prompt_len,), generator=g).tolist(),
                                   sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))

    def async_seconds_per_step(lead_in: int | None, num_steps: int) -> float:
        """Seconds per step of `num_steps` steps back to back with async scheduling: each step's CPU
        work overlaps the step before it, so the GPU is synchronised only at both ends. `lead_in`
        steps come first (None: until no prompt waits, then 2, so a decode is in flight)."""
        engine = llm.engine
        engine.async_scheduling = True  # the engine is idle: safe to switch
        if lead_in is None:
            while engine.scheduler.waiting:
                engine.step(final_only=True)
            lead_in = 2
        for _ in range(lead_in):
            engine.step(final_only=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(num_steps):
            engine.step(final_only=True)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        while engine.has_unfinished_requests():
            engine.step(final_only=True)
        engine.async_scheduling = False
        return elapsed / num_steps

    def run_decode(b: int) -> float:
        add_requests(b, context, steps + 1)
        _, _, _, median = timed_steps(llm, "cuda", want_prefill=False)
        return 1e3 * median  # median step, as the ceiling takes the median replay

    for b in batches:
        run_decode(b)  # warm-up at this shape
        out["decode_ms"][b] = run_decode(b)
        add_requests(b, context, steps + 16)
        out["decode_ms_async"][b] = 1e3 * async_seconds_per_step(None, steps)

    def run_prefill() -> tuple[float, int]:
        add_requests(4, chunk, 1)
        _, toks, n, median = timed_steps(llm, "cuda", want_prefill=True)
        return median, toks // n

    run_prefill()
    seconds, tokens = run_prefill()
    out["prefill"] = {"chunk": chunk, "ms": 1e3 * seconds, "tokens_per_s": tokens / seconds}
    num_chunks = 8
    add_requests(num_chunks + 1, chunk, 1)  # each prompt is one chunk; the first leads in
    seconds = async_seconds_per_step(1, num_chunks)
    out["prefill_async"] = {"chunk": chunk, "ms": 1e3 * seconds, "tokens_per_s": chunk / seconds}
    return out


def engine_throughput(llm: LLM, pairs: list[tuple[int, int]]) -> dict:
    vocab = llm.engine.arch.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (p,), generator=g).tolist() for p, _ in pairs]
    params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for _, o in pairs]
    llm.generate(prompt_token_ids=prompts[:8], sampling_params=params[:8])  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=True)
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    assert generated == sum(o for _, o in pairs), "ignore_eos must give every request its full output"
    return {"requests": len(pairs), "output_tokens": generated, "seconds": seconds,
            "output_tokens_per_s": generated / seconds,
            "total_tokens_per_s": (generated + sum(p for p, _ in pairs)) / seconds}


def hf_throughput(model: str, pairs: list[tuple[int, int]], device: str = "cuda",
                  dtype: torch.dtype = torch.bfloat16) -> dict:
    """transformers' continuous batching (generate_batch) on the same requests, random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    preset = get_preset(model)
    config = AutoConfig.for_model(preset.pop("model_type"), **preset)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    hf.eval()
    vocab = preset["vocab_size"]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (p,), generator=g).tolist() for p, _ in pairs]
    # generate_batch takes one GenerationConfig; requests of equal output length go together.
    by_len: dict[int, list[list[int]]] = {}
    for ids, (_, o) in zip(prompts, pairs):
        by_len.setdefault(o, []).append(ids)
    eos = vocab + 1  # unreachable: every request runs to its output length (ignore_eos)
    start = time.perf_counter()
    generated = 0
    manager_cfg = GenerationConfig(max_new_tokens=max(o for _, o in pairs), do_sample=False, eos_token_id=eos,
                                   pad_token_id=0)
    try:  # one manager, per-request max_new_tokens: true continuous batching across lengths
        manager = hf.init_continuous_batching(generation_config=manager_cfg)
        manager.start()
        for i, (ids, (_, o)) in enumerate(zip(prompts, pairs)):
            manager.add_request(ids, request_id=f"r{i}", max_new_tokens=o, eos_token_id=eos)
        for _ in pairs:
            result = manager.get_result(timeout=600)
            generated += len(result.generated_tokens)
        manager.stop(block=True)
        mode = "ContinuousBatchingManager, per-request max_new_tokens"
    except TypeError:
        for o, group in by_len.items():
            cfg = GenerationConfig(max_new_tokens=o, do_sample=False, eos_token_id=eos, pad_token_id=0)
            results = hf.generate_batch(inputs=group, generation_config=cfg, progress_bar=False)
            generated += sum(len(r.generated_tokens) for r in results.values())
        mode = "generate_batch per output length"
    seconds = time.perf_counter() - start
    del hf
    return {"requests": len(pairs), "output_tokens": generated, "seconds": seconds,
            "output_tokens_per_s": generated / seconds, "mode": mode}


# --precision: the engine arguments of each offline run
PRECISIONS = {"bf16": {}, "fp8": {"quantization": "fp8"}, "fp8-kv": {"quantization": "fp8", "kv_cache_dtype": "fp8"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--lengths", required=True)
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--hf-requests", type=int, default=200, help="subset run by both for the ratio")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128, 256])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--step-policy", default="mixed", help="engine step policy for the offline run")
    ap.add_argument("--max-num-seqs", type=int, nargs="+", default=[1024],
                    help="offline runs: one engine per value (vLLM's default on an H100 is 1024)")
    ap.add_argument("--async-scheduling", nargs="+", default=["on"], choices=["on", "off"],
                    help="offline runs: each engine runs once per value")
    ap.add_argument("--prefix-caching", nargs="+", default=["on"], choices=["on", "off"],
                    help="offline runs: one engine per value (random prompts: nothing hits, so on/off is the cost)")
    ap.add_argument("--precision", nargs="+", default=["bf16"], choices=list(PRECISIONS),
                    help="steps and offline run: bf16 weights, FP8 weights (W8A8), or FP8 weights with the FP8 KV cache")
    ap.add_argument("--skip", nargs="*", default=[], choices=["ceiling", "steps", "throughput", "hf"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    args.async_scheduling = [v == "on" for v in args.async_scheduling]
    args.prefix_caching = [v == "on" for v in args.prefix_caching]
    pairs = [tuple(p) for p in json.loads(Path(args.lengths).read_text())["pairs"]][: args.num_requests]
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
           "commit": os.environ.get("TETRIINFER_COMMIT", "unknown"), "context": args.context}

    def save() -> None:
        Path(args.out).write_text(json.dumps(res, indent=1))

    # transformers first: the ceiling and the engine's steps then run back to back, in one GPU state.
    if "hf" not in args.skip:
        try:
            res["hf"] = hf_throughput(args.model, pairs[: args.hf_requests])
        except Exception as e:  # record why, keep the rest of the run
            res["hf"] = {"error": f"{type(e).__name__}: {e}"}
        save()
        gc.collect(); torch.cuda.empty_cache()  # noqa: E702
    if "ceiling" not in args.skip:
        res["ceiling"] = ceiling(args.model, args.batches, args.context, args.chunk)
        save()
        gc.collect(); torch.cuda.empty_cache()  # noqa: E702
    if "steps" not in args.skip:
        # Step times in the paper's prefill-first policy: a decode step holds exactly the batch.
        # One engine per precision; each decode step also beside its bandwidth roofline: the bytes it
        # must read (weights + the batch's KV) over the copy bandwidth measured in this run.
        bandwidth = copy_bandwidth(torch.device("cuda"))
        res["copy_bandwidth_bytes_per_s"] = bandwidth
        res["engine_by_precision"] = {}
        for precision in args.precision:
            llm = LLM(args.model, device="cuda", dtype="bfloat16", chunk_size=args.chunk,
                      max_num_seqs=max(args.batches), async_scheduling=False, **PRECISIONS[precision])
            steps = engine_steps(llm, args.batches, args.context, args.chunk, steps=32)
            weight_bytes = sum(p.nbytes for p in llm.engine.runner.model.parameters())
            steps["roofline_ms"] = {b: 1e3 * (weight_bytes + b * (args.context + 1) * llm.engine.kv_bytes_per_token)
                                    / bandwidth for b in args.batches}
            res["engine_by_precision"][precision] = steps
            if precision == "bf16":
                res["engine"] = steps  # the ceiling's comparison is bf16
            save()
            del llm
            gc.collect(); torch.cuda.empty_cache()  # noqa: E702
    if "throughput" not in args.skip:
        # One engine per max_num_seqs (its CUDA graphs depend on it); each runs with and without
        # async scheduling, switched while the engine is idle.
        res["offline"] = []
        for max_num_seqs, prefix_caching, precision in [(m, c, p) for m in args.max_num_seqs
                                                         for c in args.prefix_caching for p in args.precision]:
            llm = LLM(args.model, device="cuda", dtype="bfloat16", chunk_size=args.chunk, max_num_seqs=max_num_seqs,
                      step_policy=args.step_policy, enable_prefix_caching=prefix_caching, **PRECISIONS[precision])
            for async_scheduling in args.async_scheduling:
                llm.engine.async_scheduling = async_scheduling  # switched while the engine is idle
                run = {"chunk_size": args.chunk, "max_num_seqs": max_num_seqs, "step_policy": args.step_policy,
                       "prefix_caching": prefix_caching, "precision": precision,
                       "async_scheduling": async_scheduling, "num_blocks": llm.engine.block_manager.num_blocks,
                       "block_size": llm.engine.block_manager.block_size,
                       "throughput": engine_throughput(llm, pairs)}
                if "hf" not in args.skip:
                    run["throughput_hf_subset"] = engine_throughput(llm, pairs[: args.hf_requests])
                res["offline"].append(run)
                save()
            del llm
            gc.collect(); torch.cuda.empty_cache()  # noqa: E702

    print(f"\n{args.model} bf16 on {res['device']}, commit {res['commit']}")
    if "engine" in res and "ceiling" in res:
        print(f"decode step @ {args.context} ctx   ceiling ms   engine ms   ratio   async ms   ratio")
        for b in args.batches:
            c, e, a = res["ceiling"]["decode_ms"][b], res["engine"]["decode_ms"][b], res["engine"]["decode_ms_async"][b]
            print(f"  batch {b:>4}            {c:9.2f}  {e:10.2f}  {e / c:6.2f}x  {a:8.2f}  {a / c:6.2f}x")
        c, e = res["ceiling"]["prefill"], res["engine"]["prefill"]
        a = res["engine"]["prefill_async"]
        print(f"prefill {args.chunk}-token chunk: ceiling {c['tokens_per_s']:.0f} tok/s, engine "
              f"{e['tokens_per_s']:.0f} tok/s ({e['tokens_per_s'] / c['tokens_per_s']:.3f}x), async "
              f"{a['tokens_per_s']:.0f} tok/s ({a['tokens_per_s'] / c['tokens_per_s']:.3f}x)")
    if res.get("engine_by_precision"):
        print(f"decode step @ {args.context} ctx, against the roofline (bytes read / "
              f"{res['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s copy bandwidth)")
        print("  precision  batch   roofline ms   plain ms   async ms   async/roofline")
        for precision, steps in res["engine_by_precision"].items():
            for b in args.batches:
                r, e, a = steps["roofline_ms"][b], steps["decode_ms"][b], steps["decode_ms_async"][b]
                print(f"  {precision:<9} {b:>5}   {r:11.2f}   {e:8.2f}   {a:8.2f}   {a / r:6.2f}x")
    hf = res.get("hf", {})
    for run in res.get("offline", []):
        t = run["throughput"]
        line = (f"offline {run.get('precision', 'bf16')}, {t['requests']} requests, max_num_seqs "
                f"{run['max_num_seqs']}, prefix caching "
                f"{'on ' if run.get('prefix_caching', True) else 'off'}, async "
                f"{'on ' if run['async_scheduling'] else 'off'}: {t['output_tokens_per_s']:.0f} output tok/s")
        if "output_tokens_per_s" in hf:
            sub = run["throughput_hf_subset"]["output_tokens_per_s"]
            line += f"; first {hf['requests']}: {sub:.0f} tok/s = {sub / hf['output_tokens_per_s']:.1f}x transformers"
        print(line)
    if "error" in hf:
        print(f"transformers: {hf['error']}")
    save()


if __name__ == "__main__":
    main()
