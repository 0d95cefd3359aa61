"""Turns the logits of a step into one token per request: allowed_token_ids and bad_words masks,
min_tokens, logit_bias, penalties, grammar masks (structured output), then greedy or temperature,
top-k, top-p. Log-probabilities (the chosen token's and the top-N) are read from the raw logits,
before any of that (vLLM's default).

Sampling draws Gumbel-style exponential noise (argmax of p / q with q ~ Exp(1) samples from p). A
request with a seed draws its noise from a generator seeded by (seed, output position), so its tokens
do not depend on what else shares the batch, nor on which engine runs it (KV export/import).

The sampled tokens stay on the device; their copy to the host is queued behind the step, and
`SampledTokens.result()` waits for it. Nothing here synchronises with the GPU, so the engine can
prepare its next step while this one runs (async scheduling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tetriinfer.engine.host_copy import to_device
from tetriinfer.engine.penalties import apply_logit_bias, apply_penalties
from tetriinfer.engine.request import Request, TopLogprobs
from tetriinfer.engine.token_masks import apply_allowed_token_ids, apply_bad_words

if TYPE_CHECKING:
    from tetriinfer.engine.model_runner import TokensOnDevice


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # of the chosen tokens, under the unscaled distribution
    top_logprobs: list[TopLogprobs] | None = None  # per row: its request's N best (id, logprob)


class SampledTokens:
    """One step's sampled tokens: on the device at once (`token_ids`, which the next step may read
    as its input), on the host once `result()` returns."""

    def __init__(self, token_ids: torch.Tensor, logprobs: torch.Tensor | None,
                 top: tuple[torch.Tensor, torch.Tensor] | None = None, top_counts: list[int] | None = None):
        self.token_ids = token_ids  # [num_sampled] int64, on the device
        self._event = None
        self._top_counts = top_counts  # per row: how many of the top (ids, logprobs) columns it wants
        if token_ids.is_cuda:  # queue the copy to pinned memory behind the step; do not wait
            self._host_ids = _to_host(token_ids)
            self._host_logprobs = None if logprobs is None else _to_host(logprobs)
            self._host_top = None if top is None else (_to_host(top[0]), _to_host(top[1]))
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host_ids, self._host_logprobs, self._host_top = token_ids, logprobs, top

    def result(self) -> SampleResult:
        if self._event is not None:
            self._event.synchronize()
        logprobs = None if self._host_logprobs is None else self._host_logprobs.tolist()
        top = None
        if self._host_top is not None:
            ids, values = self._host_top[0].tolist(), self._host_top[1].tolist()
            top = [list(zip(ids[i][:k], values[i][:k])) for i, k in enumerate(self._top_counts)]
        return SampleResult(self._host_ids.tolist(), logprobs, top)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class Sampler:
    def __init__(self, device: torch.device, seed: int, eos_token_ids: tuple[int, ...], tokenizer=None):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.eos_token_ids = eos_token_ids
        self.tokenizer = tokenizer  # structured output builds its grammar compiler over it
        self._grammar_compiler = None  # made at the first structured request

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: list[Request],
                 on_device: "TokensOnDevice | None" = None, first_decode_row: int = 0) -> SampledTokens:
        """`on_device`, `first_decode_row`: where decodes' newest tokens are still on the device
        (async scheduling), and the row of the first decode among `requests` (penalties and
        grammars need those tokens)."""
        logits = logits.float()
        top_counts = [r.sampling.logprobs or 0 for r in requests]
        want_logprobs = any(r.sampling.logprobs is not None for r in requests)
        logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None  # raw: before processing
        top = logprobs.topk(max(top_counts), dim=-1) if logprobs is not None and max(top_counts) else None

        pending = None
        if any(r.sampling.has_penalties or r.sampling.structured or r.sampling.bad_words for r in requests):
            pending = _pending_tokens(len(requests), on_device, first_decode_row, logits.device)
        # vLLM's order: the allowed-token and bad-word masks, min_tokens, logit_bias, penalties
        apply_allowed_token_ids(logits, requests)
        if any(r.sampling.bad_words for r in requests):
            pending_rows = set() if on_device is None else {first_decode_row + j for j in on_device.decodes}
            apply_bad_words(logits, requests, self.tokenizer, pending, pending_rows)
        self._ban_early_stops(logits, requests)
        apply_logit_bias(logits, requests)
        apply_penalties(logits, requests, pending)
        if any(r.sampling.structured for r in requests):
            from tetriinfer.engine.structured import apply_grammar_masks

            apply_grammar_masks(logits, requests, pending, self._grammar(logits.shape[1]))

        chosen = logits.argmax(dim=-1)
        if not all(r.sampling.greedy for r in requests):  # decided on the host: no device sync
            greedy = to_device(torch.tensor([r.sampling.greedy for r in requests]), logits.device)
            chosen = torch.where(greedy, chosen, self._sample(logits, requests))
        chosen_logprobs = None if logprobs is None else logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
        return SampledTokens(chosen, chosen_logprobs, None if top is None else (top.indices, top.values),
                             top_counts if top is not None else None)

    def _grammar(self, vocab_size: int):
        from tetriinfer.engine.structured import GrammarCompiler  # xgrammar: an optional library

        if self._grammar_compiler is None:
            if self.tokenizer is None:
                raise ValueError("structured output needs the model's tokenizer")
            self._grammar_compiler = GrammarCompiler(self.tokenizer, vocab_size, self.eos_token_ids)
        return self._grammar_compiler

    def _ban_early_stops(self, logits: torch.Tensor, requests: list[Request]) -> None:
        """min_tokens: no EOS or stop token before the request has that many tokens."""
        rows, banned = [], []
        for row, r in enumerate(requests):
            if r.num_sampled < r.sampling.min_tokens:
                ids = list(r.sampling.stop_token_ids) + ([] if r.sampling.ignore_eos else list(self.eos_token_ids))
                rows += [row] * len(ids)
                banned += ids
        if rows:
            logits[to_device(torch.tensor(rows), logits.device), to_device(torch.tensor(banned), logits.device)] = float("-inf")

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        temperature = to_device(torch.tensor([max(r.sampling.temperature, 1e-5) for r in requests]), logits.device)
        logits = logits / temperature.unsqueeze(1)
        if any(r.sampling.min_p > 0 for r in requests):  # before top-k/top-p, as vLLM applies it
            logits = _apply_min_p(logits, to_device(torch.tensor([r.sampling.min_p for r in requests]), logits.device))
        if any(r.sampling.top_k > 0 for r in requests):
            logits = _apply_top_k(logits, [r.sampling.top_k for r in requests])
        if any(r.sampling.top_p < 1.0 for r in requests):
            logits = _apply_top_p(logits, to_device(torch.tensor([r.sampling.top_p for r in requests]), logits.device))
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs)
        for row, r in enumerate(requests):
            if r.sampling.greedy:
                noise[row].fill_(1.0)
            elif r.sampling.seed is not None:
                gen = torch.Generator(device=logits.device).manual_seed(
                    hash((r.sampling.seed, r.num_sampled)) & 0x7FFF_FFFF_FFFF_FFFF
                )
                noise[row].exponential_(generator=gen)
            else:
                noise[row].exponential_(generator=self.generator)
        return (probs / noise).argmax(dim=-1)


def _pending_tokens(num_rows: int, on_device: "TokensOnDevice | None", first_decode_row: int,
                    device: torch.device) -> torch.Tensor | None:
    """[num_rows] int64 on the device: each row's token sampled by the step in flight, -1 if none."""
    if on_device is None or not on_device.decodes:
        return None
    pending = torch.full((num_rows,), -1, dtype=torch.int64, device=device)
    rows = to_device(torch.tensor([first_decode_row + j for j in on_device.decodes]), device)
    pending[rows] = on_device.tokens[to_device(torch.tensor(on_device.rows), device)]
    return pending


def _apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    vocab = logits.shape[-1]
    ks = to_device(torch.tensor([k if 0 < k < vocab else vocab for k in top_k]), logits.device)
    sorted_logits = logits.sort(dim=-1, descending=True).values
    kth = sorted_logits.gather(1, (ks - 1).unsqueeze(1))
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than min_p times the likeliest token (after temperature)."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.to(probs.dtype).unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p.unsqueeze(1)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
