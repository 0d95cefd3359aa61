"""Measures one engine's step times over grids of shapes: prefill chunk time against chunk tokens and
cached context, decode step time against batch size and context. The forward pass runs exactly as
in serving (same runner, CUDA graphs where they apply, sampling included), on synthetic requests
whose blocks are taken from the engine's own cache and given back afterwards."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from tetriinfer.engine.engine import LLMEngine
from tetriinfer.engine.request import Request
from tetriinfer.engine.scheduler import PrefillPiece, StepPlan
from tetriinfer.sampling_params import SamplingParams


@dataclass
class StepTimes:
    prefill: list[list[float]]  # [chunk_tokens][context_tokens] seconds
    decode: list[list[float]]  # [batch_size][context_per_seq] seconds


def profile_steps(engine: LLMEngine, chunk_tokens: list[int], context_tokens: list[int], batch_sizes: list[int],
                  context_per_seq: list[int], repeats: int = 5,
                  progress: Callable[[str], None] | None = None) -> StepTimes:
    """Median seconds per step over `repeats` timed runs, after one untimed run of each shape."""
    prefill, decode = [], []
    for n in chunk_tokens:
        engine.runner.capture_prefill_graph(n)
        prefill.append([_median_step(engine, _prefill_plan(engine, n, ctx), repeats) for ctx in context_tokens])
        if progress:
            progress(f"prefill chunk {n}")
    for b in batch_sizes:
        decode.append([_median_step(engine, _decode_plan(engine, b, ctx), repeats) for ctx in context_per_seq])
        if progress:
            progress(f"decode batch {b}")
    return StepTimes(prefill, decode)


def knee(chunk_tokens: list[int], seconds: list[float], gain: float = 0.10) -> int:
    """The paper's saturation point: the first chunk size past which doubling the chunk raises
    prefill throughput by less than `gain` (the largest size if throughput never flattens)."""
    throughput = [n / s for n, s in zip(chunk_tokens, seconds)]
    for i in range(len(chunk_tokens) - 1):
        if throughput[i + 1] < throughput[i] * (1 + gain):
            return chunk_tokens[i]
    return chunk_tokens[-1]


def _synthetic_request(engine: LLMEngine, name: str, num_tokens: int, cached: int) -> Request:
    vocab = engine.arch.vocab_size
    prompt = [(7 * i + 3) % vocab for i in range(num_tokens)]
    req = Request(name, prompt, SamplingParams(max_tokens=1, temperature=0), arrival_time=0.0)
    req.block_ids = engine.block_manager.allocate(engine.block_manager.blocks_for_tokens(num_tokens))
    req.num_computed_tokens = cached
    return req


def _prefill_plan(engine: LLMEngine, chunk: int, context: int) -> StepPlan:
    req = _synthetic_request(engine, "profile-prefill", context + chunk, context)
    return StepPlan(prefill=[PrefillPiece(req, context, chunk)])


def _decode_plan(engine: LLMEngine, batch: int, context: int) -> StepPlan:
    # Each sequence has `context` tokens before this step's one (its KV is whatever the cache holds).
    reqs = [_synthetic_request(engine, f"profile-decode-{i}", context + 1, context) for i in range(batch)]
    for r in reqs:  # the last token is an output token, as in a real decode
        r.output_token_ids.append(r.prompt_token_ids.pop())
    return StepPlan(decode=reqs)


def _median_step(engine: LLMEngine, plan: StepPlan, repeats: int) -> float:
    requests = [p.request for p in plan.prefill] + plan.decode
    sampled = [p.request for p in plan.prefill if p.completes_prompt] + plan.decode
    try:
        times = []
        for i in range(repeats + 1):
            _sync(engine)
            start = time.perf_counter()
            logits = engine.runner.execute(plan)
            if sampled:
                engine.sampler(logits, sampled).result()
            _sync(engine)
            if i:  # the first run compiles, allocates and fills caches
                times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        for r in requests:
            engine.block_manager.free(r.block_ids)


def _sync(engine: LLMEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
