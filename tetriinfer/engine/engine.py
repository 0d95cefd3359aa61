"""One engine instance: validates requests, asks the scheduler for a step, has the runner execute it,
samples, and updates request state. A serving instance's view of it, and the per-request KV
export/import (the disaggregation seam), are `engine.serving`."""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import torch

from tetriinfer.config import EngineConfig
from tetriinfer.engine.block_manager import BlockManager
from tetriinfer.engine.detokenizer import IncrementalDetokenizer
from tetriinfer.engine.model_runner import ModelRunner, TokensOnDevice
from tetriinfer.engine.load import StepLoad
from tetriinfer.engine.mask_checks import check_token_masks
from tetriinfer.engine.prefix_cache import PrefixCache
from tetriinfer.engine.request import (
    CompletionOutput,
    Request,
    RequestMetrics,
    RequestOutput,
    RequestStatus,
)
from tetriinfer.engine.sampler import SampledTokens, Sampler
from tetriinfer.engine.scheduler import EngineScheduler, StepPlan
from tetriinfer.engine.serving import ServingFacade
from tetriinfer.engine.tp_worker import RunnerSpec, TPWorkers
from tetriinfer.model.loader import TORCH_DTYPES, load_model
from tetriinfer.model.parallel import SINGLE
from tetriinfer.model.quant import kv_cache_torch_dtype
from tetriinfer.sampling_params import SamplingParams

CPU_DEFAULT_MEMORY_FRACTION = 0.05
GPU_DEFAULT_MEMORY_FRACTION = 0.9


class NoProgress(RuntimeError):
    """Nothing can run: every free KV block is held by prefilled requests waiting to be exported."""


@dataclass
class LaunchedStep:
    """A step queued on the device: the requests it samples a token for, and those tokens."""

    sampled: list[Request]
    tokens: SampledTokens | None  # None: the step completes no prompt and holds no decode
    prompt_hidden: torch.Tensor | None = None  # capture on: final hidden rows of the prompts it completes

    @functools.cached_property
    def rows(self) -> dict[int, int]:
        """id(request) -> its row in `tokens` (only the next step's inputs need it)."""
        return {id(r): i for i, r in enumerate(self.sampled)}


class LLMEngine(ServingFacade):
    def __init__(self, config: EngineConfig, stream_text: bool = False):
        """`stream_text`: keep every request's text up to date token by token (a server streams it);
        otherwise text is decoded once when a request finishes, unless it has stop strings."""
        self.config = config
        self.stream_text = stream_text
        self.device = torch.device(config.device)
        # Tensor parallelism: this process is rank 0 and owns one worker process per other rank.
        self.workers = TPWorkers(config) if config.tensor_parallel_size > 1 else None
        tp = self.workers.tp if self.workers is not None else SINGLE
        loaded = load_model(config.model, config.dtype, config.device, config.load_format, config.seed, tp=tp,
                            quantization=config.quantization)
        self.arch = loaded.arch
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = loaded.arch.eos_token_ids
        self.max_model_len = self._max_model_len()
        num_blocks = self._num_blocks(loaded.model)
        backend = config.attention_backend
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        self.block_manager = BlockManager(num_blocks, config.cache.block_size)
        # CUDA graphs need kernels that never synchronise with the host: the Triton backend's.
        # (Not yet under tensor parallelism: its NCCL all-reduces are not captured.)
        use_graphs = (self.device.type == "cuda" and backend == "triton" and not config.enforce_eager
                      and self.workers is None)
        self.runner = ModelRunner(loaded.model, loaded.arch, num_blocks, config.cache.block_size, backend,
                                  self.device, self.kv_dtype, self.max_model_len,
                                  config.scheduler.max_num_seqs, config.scheduler.chunk_size, use_graphs,
                                  mixed_steps=config.scheduler.step_policy == "mixed", tp=tp,
                                  capture_prompt_hidden=config.capture_prompt_hidden)
        if self.workers is not None:
            self.workers.start_runners(RunnerSpec(num_blocks, self.max_model_len, backend))
            self.runner.workers = self.workers
        self.prefix_cache = PrefixCache.for_engine(config, self.block_manager)  # None when off
        self.scheduler = EngineScheduler(config.scheduler, self.block_manager, self.prefix_cache)
        self.sampler = Sampler(self.device, config.seed, self.eos_token_ids, self.tokenizer)
        self.requests: dict[str, Request] = {}
        self.async_scheduling = config.scheduler.async_scheduling
        if self.async_scheduling is None:
            self.async_scheduling = self.device.type == "cuda"
        self._in_flight: LaunchedStep | None = None  # async scheduling: the step queued, not read back
        self.last_step_load = StepLoad(0, 0, 0, 0)

    # ---- setup ---------------------------------------------------------------------------------
    def _max_model_len(self) -> int:
        self.arch.check_fits(self.config.max_model_len)
        return self.config.max_model_len or self.arch.context_limit

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes of one token (all layers)."""
        return self.arch.kv_bytes_per_token * self.kv_dtype.itemsize

    @property
    def kv_dtype(self) -> torch.dtype:
        """The KV cache's element type (FP8 with kv_cache_dtype='fp8': half a 16-bit cache's bytes)."""
        return kv_cache_torch_dtype(self.config.kv_cache_dtype, TORCH_DTYPES[self.config.dtype])

    def _num_blocks(self, model: torch.nn.Module) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        dtype_size = self.kv_dtype.itemsize
        # Per rank: each holds its KV heads' share of a block.
        block_bytes = self.arch.kv_bytes_per_token * dtype_size * cache.block_size // self.config.tensor_parallel_size
        if self.device.type == "cuda":
            # Memory freed while loading (the bf16 weights FP8 quantization replaced) stays in torch's
            # allocator cache, invisible to mem_get_info: hand it back first (else FP8 weights left
            # 3% fewer KV blocks than bf16 on an H100, not ~12% more).
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            fraction = cache.memory_fraction or GPU_DEFAULT_MEMORY_FRACTION
            budget = free - (1 - fraction) * total
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            budget = (cache.memory_fraction or CPU_DEFAULT_MEMORY_FRACTION) * total
        num_blocks = int(budget // block_bytes)
        if num_blocks < 1:
            raise ValueError("no memory left for the KV cache; lower the model size or raise memory_fraction")
        return num_blocks

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                    sampling: SamplingParams | None = None, prefill_only: bool = False,
                    arrival_time: float | None = None) -> Request:
        """Validate and queue a request. Raises ValueError naming the problem; nothing is allocated then."""
        sampling = sampling or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("give a prompt or prompt_token_ids")
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
            if prompt == "":
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("this model directory has no tokenizer.json; pass prompt_token_ids instead of text")
            prompt_token_ids = self.tokenizer.encode(prompt)
        prompt_token_ids = list(prompt_token_ids)
        self._validate(prompt_token_ids, sampling)
        req = Request(request_id, prompt_token_ids, sampling, arrival_time or time.monotonic(), prompt=prompt,
                      prefill_only=prefill_only)
        req.detokenizer = self.new_detokenizer(req)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    def _validate(self, token_ids: list[int], sampling: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("prompt is empty")
        vocab = self.arch.vocab_size
        bad = next((t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad!r} is outside the vocabulary [0, {vocab})")
        bad = next((t for t in sampling.logit_bias or () if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias token id {bad} is outside the vocabulary [0, {vocab})")
        if len(token_ids) > self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens, more than the model's context of {self.max_model_len}")
        total = len(token_ids) + sampling.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({sampling.max_tokens}) = {total} exceeds "
                f"the model's context of {self.max_model_len} tokens"
            )
        need = self.block_manager.blocks_for_tokens(total)
        if need > self.block_manager.num_blocks:
            raise ValueError(f"request needs {need} KV blocks but the cache has only {self.block_manager.num_blocks}")
        check_token_masks(sampling, vocab, self.tokenizer)
        if sampling.structured:  # here, not mid-step in the sampler
            from tetriinfer.engine.structured import check_sampling

            check_sampling(sampling)

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.remove(req)
        req.status = RequestStatus.FINISHED_ABORTED
        req.finish_time = time.monotonic()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    def close(self) -> None:
        """Stop the tensor-parallel workers (also done when the engine is collected, and at exit)."""
        if self.workers is not None:
            self.workers.stop()

    # ---- stepping ------------------------------------------------------------------------------
    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """Run one forward pass; return the outputs of requests that got a token (finished or not),
        or with `final_only` of those that finished (no per-step copies: offline batch runs)."""
        return [self._output(r) for r in self.step_requests() if not final_only or r.status.finished]

    def step_requests(self) -> list[Request]:
        """Run one forward pass; return the requests that got a token, their state updated (a
        server reads the new tokens from them without copying whole outputs). With async
        scheduling, the tokens returned are those of the step before the one just queued."""
        if not self.async_scheduling and self._in_flight is not None:
            # Switched off with a step in flight: read that one back before running another.
            launched, self._in_flight = self._in_flight, None
            return self._complete_step(launched)
        launched = self._launch_step()
        if self.async_scheduling:
            # Step t+1 is queued on the device before step t's tokens are read back, so the CPU
            # plans and prepares it while the GPU still runs step t.
            launched, self._in_flight = self._in_flight, launched
        return self._complete_step(launched) if launched is not None else []

    def _launch_step(self) -> LaunchedStep | None:
        """Plan a step and queue its forward pass and sampling on the device, without waiting."""
        plan = self.scheduler.schedule()
        if plan.empty:
            if self.scheduler.has_work() and self._in_flight is None:
                raise NoProgress("scheduler made no progress: the KV cache is held by requests awaiting export")
            return None
        self.last_step_load = StepLoad(sum(p.length for p in plan.prefill) + plan.num_padding,
                                       sum(p.start for p in plan.prefill), len(plan.decode),
                                       sum(r.num_computed_tokens for r in plan.decode))
        on_device = self._tokens_on_device(plan)
        logits = self.runner.execute(plan, on_device)
        sampled = [p.request for p in plan.prefill if p.completes_prompt] + plan.decode
        tokens = self.sampler(logits, sampled, on_device, len(sampled) - len(plan.decode)) if sampled else None
        for piece in plan.prefill:
            piece.request.num_computed_tokens = piece.start + piece.length
            self.scheduler.on_prefilled(piece.request)
        for req in plan.decode:
            req.num_computed_tokens += 1
        for req in sampled:
            last = self._takes_last_token(req)
            req.num_pending += 1
            self.scheduler.on_sampled(req, last)
        return LaunchedStep(sampled, tokens, self.runner.prompt_hidden)

    def _tokens_on_device(self, plan: StepPlan) -> TokensOnDevice | None:
        """Where decodes' input tokens were sampled by the step in flight and are not read back yet."""
        if self._in_flight is None or self._in_flight.tokens is None:
            return None
        rows = self._in_flight.rows
        decodes = [j for j, r in enumerate(plan.decode) if r.num_pending]
        return TokensOnDevice(self._in_flight.tokens.token_ids, decodes, [rows[id(plan.decode[j])] for j in decodes])

    def _takes_last_token(self, req: Request) -> bool:
        """Whether the token being sampled for `req` ends it whatever its value."""
        return (req.prefill_only or 0 < req.park_at <= req.num_sampled + 1
                or self._reaches_length_limit(req, req.num_sampled + 1))

    def _complete_step(self, step: LaunchedStep) -> list[Request]:
        """Read back a launched step's tokens (waiting for the device) and update its requests."""
        if step.tokens is None:
            return []
        result = step.tokens.result()
        now = time.monotonic()
        stepped = []
        hidden = step.prompt_hidden.cpu().numpy() if step.prompt_hidden is not None else None
        for i, req in enumerate(step.sampled):
            req.num_pending -= 1
            if self.requests.get(req.request_id) is not req:
                continue  # aborted, or stopped by the step before (its row here was spent for nothing)
            if hidden is not None and i < len(hidden) and not req.output_token_ids:
                # Its first token: the row is its prompt's (a recompute after preemption, or an
                # imported request, ends at an output token). A copy: the batch is not kept.
                req.prompt_hidden = hidden[i].copy()
            if req.prefill_only and req.status == RequestStatus.WAITING:
                req.status = RequestStatus.PREFILLED
            if result.top_logprobs is not None and req.sampling.logprobs:
                req.output_top_logprobs.append(result.top_logprobs[i])
            self._append_token(req, result.token_ids[i], None if result.logprobs is None else result.logprobs[i], now)
            if 0 < req.park_at <= len(req.output_token_ids) and req.status == RequestStatus.RUNNING:
                req.status, req.park_at = RequestStatus.PREFILLED, 0  # unscheduled since on_sampled(last)
            stepped.append(req)
        return stepped

    def _append_token(self, req: Request, token: int, logprob: float | None, now: float) -> None:
        req.output_token_ids.append(token)
        if req.sampling.logprobs is not None:
            req.output_logprobs.append(logprob)
        if req.first_token_time is None:
            req.first_token_time = now
        status, reason = self._check_stop(req, token)
        if status is not None:
            req.status, req.stop_reason, req.finish_time = status, reason, now
            if req.detokenizer is not None:
                req.detokenizer.settle()  # the last delta stays for a streaming caller to take
                req.output_text = req.detokenizer.text
            elif self.tokenizer is not None:
                # A stop token's text is not part of the output (as in vLLM).
                stopped_by_id = isinstance(req.stop_reason, int) and not isinstance(req.stop_reason, bool)
                req.output_text = self.tokenizer.decode(req.output_token_ids[:-1] if stopped_by_id
                                                        else req.output_token_ids,
                                                        skip_special_tokens=req.sampling.skip_special_tokens)
            self.requests.pop(req.request_id, None)
            # Its blocks are free at once even if a step in flight still writes this request's
            # KV: every later write into them is queued on the same stream, after that step.
            self.scheduler.remove(req)

    def new_detokenizer(self, req: Request, already_streamed: bool = False) -> IncrementalDetokenizer | None:
        """Turns the request's tokens into text as they come, where someone needs it before the end
        (streaming, stop strings); else None. `already_streamed`: a request moving in from another
        engine, whose output so far was streamed there."""
        if self.tokenizer is None or not (self.stream_text or req.sampling.stop):
            return None
        if already_streamed:
            return IncrementalDetokenizer.replay(self.tokenizer, req.sampling.stop, req.output_token_ids,
                                                 include_stop=req.sampling.include_stop_str_in_output,
                                                 skip_special_tokens=req.sampling.skip_special_tokens)
        return IncrementalDetokenizer(self.tokenizer, req.sampling.stop,
                                      include_stop=req.sampling.include_stop_str_in_output,
                                      skip_special_tokens=req.sampling.skip_special_tokens)

    def _check_stop(self, req: Request, token: int) -> tuple[RequestStatus | None, str | int | None]:
        sp = req.sampling
        n_out = len(req.output_token_ids)
        if n_out >= sp.min_tokens and token in sp.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token  # checked first: its text is not output (vLLM)
        if req.detokenizer is not None:  # also advances the text, so it runs for every token
            stop = req.detokenizer.append(token)
            if stop is not None:
                return RequestStatus.FINISHED_STOPPED, stop
        if n_out >= sp.min_tokens:
            if not sp.ignore_eos and token in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED, None
            if token in sp.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token
        if self._reaches_length_limit(req, n_out):
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

    def _reaches_length_limit(self, req: Request, num_outputs: int) -> bool:
        """Whether `num_outputs` output tokens end the request by length (max_tokens or the context)."""
        return (num_outputs >= req.sampling.max_tokens
                or len(req.prompt_token_ids) + num_outputs >= self.max_model_len)

    def _output(self, req: Request) -> RequestOutput:
        finished = req.status.finished
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=[CompletionOutput(
                text=req.output_text,
                token_ids=list(req.output_token_ids),
                logprobs=list(req.output_logprobs) if req.sampling.logprobs is not None else None,
                top_logprobs=list(req.output_top_logprobs) if req.sampling.logprobs else None,
                finish_reason=req.status.value if finished else None,
                stop_reason=req.stop_reason,
            )],
            finished=finished,
            metrics=RequestMetrics(req.arrival_time, req.first_token_time, req.finish_time),
            num_cached_tokens=req.num_cached_tokens,
            **({} if req.sampling.prompt_logprobs is None else  # the first prompt token has none
               {"prompt_logprobs": [None, *req.prompt_logprobs], "prompt_top_logprobs": [[], *req.prompt_top_logprobs],
                "prompt_ranks": [None, *req.prompt_ranks]}),
        )
