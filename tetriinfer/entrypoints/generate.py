"""`tetriinfer generate`: offline generation from the command line."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text offline with one engine",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_engine_arguments(p)
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text (repeat for a batch); None: one built-in example")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt at most")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set of tokens with this mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0: all")
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--json", action="store_true", help="print one JSON object per request")
    p.set_defaults(func=run)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of EngineConfig; shared by every subcommand that starts an engine."""
    from tetriinfer.config import ATTENTION_BACKENDS, DTYPE_CHOICES, ENGINE_STEP_POLICIES, KV_CACHE_DTYPES, LOAD_FORMATS
    from tetriinfer.presets import preset_help

    # Grouped as vLLM's --help groups them (model, parallel, cache, scheduler)
    m = p.add_argument_group("model")
    t = p.add_argument_group("parallel")
    c = p.add_argument_group("cache")
    s = p.add_argument_group("scheduler")
    k = p.add_argument_group("kernels")
    m.add_argument("--model", default="tiny",
                   help=f"a preset with random weights ({preset_help()}), a Hugging Face style directory, or a "
                        "Hub id (ORG/NAME: the local HF cache, else downloaded; $HF_HUB_OFFLINE honoured)")
    m.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES,
                   help="weights and activations; auto: float32 on a CPU, the checkpoint's 16-bit type on a GPU "
                        "(bfloat16 for presets)")
    m.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    m.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="auto: random weights for presets, safetensors for directories; dummy: random weights")
    k.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="torch: the reference; triton: the kernels; auto: triton on GPUs")
    m.add_argument("--seed", type=int, default=0, help="seed of random weights and unseeded sampling")
    m.add_argument("--max-model-len", type=int, default=None,
                   help="context length (prompt + output) in tokens; None: the model's")
    k.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs on GPUs")
    t.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks (GPUs from --device on, or CPU processes) one engine spans")
    m.add_argument("--quantization", default=None, choices=["fp8"],
                   help="fp8: FP8 W8A8 weights, quantized at load (FP8 checkpoints are detected by themselves)")
    c.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="auto: the model's dtype; fp8: FP8 KV cache with per-tensor scales")
    s.add_argument("--chunk-size", type=int, default=512, help="prefill tokens per forward pass")
    s.add_argument("--max-num-seqs", type=int, default=256, help="requests running at once at most")
    s.add_argument("--step-policy", default="chunked", choices=ENGINE_STEP_POLICIES,
                   help="chunked: prefill-first fixed-size chunks (the paper's); whole: whole prompts first; "
                        "mixed: decodes plus prompt tokens up to --chunk-size per step")
    s.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="queue step t+1 before reading back step t's tokens, so CPU work overlaps the GPU; "
                        "None: on for CUDA devices, off on the CPU")
    c.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    c.add_argument("--num-blocks", "--num-gpu-blocks-override", type=int, default=None,
                   help="KV cache blocks; None: from memory")
    c.add_argument("--memory-fraction", "--gpu-memory-utilization", type=float, default=None,
                   help="share of GPU memory (RAM on the CPU) for weights + KV cache; None: 0.9 on GPUs, 0.05 on CPU")
    c.add_argument("--enable-prefix-caching", action="store_true", default=True,
                   help="keep full KV blocks cached after their request and reuse shared prompt prefixes")
    c.add_argument("--no-prefix-caching", "--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false", help="turn prefix caching off")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        dtype=args.dtype, device=args.device, load_format=args.load_format,
        attention_backend=args.attention_backend, seed=args.seed, max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size, quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        chunk_size=args.chunk_size, max_num_seqs=args.max_num_seqs, step_policy=args.step_policy,
        async_scheduling=args.async_scheduling,
        block_size=args.block_size, num_blocks=args.num_blocks, memory_fraction=args.memory_fraction,
        enable_prefix_caching=args.enable_prefix_caching,
    )


def run(args: argparse.Namespace) -> int:
    from tetriinfer import LLM, SamplingParams

    prompts = args.prompt or ["The three ideas of TetriInfer are"]
    llm = LLM(args.model, **engine_kwargs(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sampling_seed, ignore_eos=args.ignore_eos)
    for out in llm.generate(prompts, params):
        c = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt": out.prompt, "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason, "ttft_s": out.metrics.ttft,
                              "latency_s": out.metrics.latency}))
        else:
            print(f"prompt: {out.prompt!r}\noutput: {c.text!r}\n  tokens={len(c.token_ids)} "
                  f"finish={c.finish_reason} ttft={out.metrics.ttft * 1e3:.1f} ms "
                  f"latency={out.metrics.latency * 1e3:.1f} ms")
    return 0
