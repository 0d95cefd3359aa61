"""Request state inside one engine (plain data), and what the engine hands back to callers."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tetriinfer.engine.detokenizer import IncrementalDetokenizer
from tetriinfer.sampling_params import SamplingParams

if TYPE_CHECKING:
    import numpy as np


TopLogprobs = list[tuple[int, float]]  # one position's N most likely (token id, logprob), best first


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # needs (re)prefill
    RUNNING = "running"  # decoding
    PREFILLED = "prefilled"  # prefill-only request done: KV parked for export
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset((RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED))


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    prompt: str | None = None
    prefill_only: bool = False  # stop after the first token and keep the KV for export
    park_at: int = 0  # a running request parks again (PREFILLED, KV kept for export) at this many outputs; 0: never
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V sit in the cache (or are queued to be written there)
    num_pending: int = 0  # sampled tokens still on the device (async scheduling): not yet in output_token_ids
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: str | int | None = None
    output_text: str = ""
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    detokenizer: IncrementalDetokenizer | None = None  # None when the model has no tokenizer
    # Prefix caching (engine.prefix_cache): keys of the full blocks so far, how many of the blocks
    # held are cached, and the prompt tokens found cached when its prefill started (not counting
    # those found again after a preemption).
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    num_cached_tokens: int = 0
    # logprobs=N > 0: each output token's top-N (aligned with output_token_ids; tokens made on
    # another engine before a KV import have [] here: they were streamed from there).
    output_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    # prompt_logprobs: one entry per prompt token from the second on, filled chunk by chunk.
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    prompt_ranks: list[int] = field(default_factory=list)  # each prompt token's rank (1: the likeliest)
    grammar: Any = None  # structured output: engine.structured.GrammarState, made on first use
    bad_words_ids: list[list[int]] | None = None  # sampling.bad_words tokenized, made on first use
    # EngineConfig.capture_prompt_hidden: the final hidden state at the last prompt token (the row
    # the LM head read for the first token), float32 [hidden_size]; it goes with the request.
    prompt_hidden: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.sampling.logprobs and len(self.output_top_logprobs) < len(self.output_token_ids):
            self.output_top_logprobs += [[] for _ in range(len(self.output_token_ids) - len(self.output_top_logprobs))]

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all computed yet (the model runner's cue)."""
        return (self.sampling.prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt_token_ids) - 1)

    def delta_logprobs(self, sent: int, first: bool) -> tuple:
        """TokenDelta's (top_logprobs, prompt_logprobs, prompt_top_logprobs, prompt_ranks) for the
        output tokens from `sent` on; the prompt's go with the `first` delta (that of the prefilling
        engine)."""
        top = self.output_top_logprobs[sent:] if self.sampling.logprobs else None
        if not first or self.sampling.prompt_logprobs is None:
            return top, None, None, None
        return (top, [None, *self.prompt_logprobs], [[], *self.prompt_top_logprobs],
                [None, *self.prompt_ranks])

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_sampled(self) -> int:
        """Output tokens sampled so far, those still on the device (async scheduling) included."""
        return len(self.output_token_ids) + self.num_pending

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    # The chunker's view (sched.chunker.PendingPrefill): after a recompute preemption the tokens to
    # prefill are the prompt plus what was already generated.
    @property
    def prompt_len(self) -> int:
        return self.num_tokens

    @property
    def num_prefilled(self) -> int:
        return self.num_computed_tokens


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None  # "stop", "length", "abort", or None while running
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    top_logprobs: list[TopLogprobs] | None = None  # with logprobs=N > 0: per token, the N best


@dataclass
class RequestMetrics:
    """Wall-clock seconds (time.monotonic) of the request's life in this engine."""

    arrival_time: float
    first_token_time: float | None
    finish_time: float | None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # With prompt_logprobs: per prompt token, its logprob (None for the first) and the top-N.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs] | None = None
    prompt_ranks: list[int | None] | None = None  # each prompt token's rank in its distribution (1: the likeliest)
