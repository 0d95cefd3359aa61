"""Turns the logits of a step into one token per request: greedy, temperature, top-k, top-p.

Sampling draws Gumbel-style exponential noise (argmax of p / q with q ~ Exp(1) samples from p). A
request with a seed draws its noise from a generator seeded by (seed, output position), so its tokens
do not depend on what else shares the batch, nor on which engine runs it (KV export/import).

The sampled tokens stay on the device; their copy to the host is queued behind the step, and
`SampledTokens.result()` waits for it. Nothing here synchronises with the GPU, so the engine can
prepare its next step while this one runs (async scheduling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tetriinfer.engine.host_copy import to_device
from tetriinfer.engine.request import Request


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # of the chosen tokens, under the unscaled distribution


class SampledTokens:
    """One step's sampled tokens: on the device at once (`token_ids`, which the next step may read
    as its input), on the host once `result()` returns."""

    def __init__(self, token_ids: torch.Tensor, logprobs: torch.Tensor | None):
        self.token_ids = token_ids  # [num_sampled] int64, on the device
        self._event = None
        if token_ids.is_cuda:  # queue the copy to pinned memory behind the step; do not wait
            self._host_ids = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            self._host_ids.copy_(token_ids, non_blocking=True)
            self._host_logprobs = None
            if logprobs is not None:
                self._host_logprobs = torch.empty(logprobs.shape, dtype=logprobs.dtype, pin_memory=True)
                self._host_logprobs.copy_(logprobs, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host_ids, self._host_logprobs = token_ids, logprobs

    def result(self) -> SampleResult:
        if self._event is not None:
            self._event.synchronize()
        logprobs = None if self._host_logprobs is None else self._host_logprobs.tolist()
        return SampleResult(self._host_ids.tolist(), logprobs)


class Sampler:
    def __init__(self, device: torch.device, seed: int, eos_token_ids: tuple[int, ...]):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.eos_token_ids = eos_token_ids

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SampledTokens:
        logits = logits.float()
        self._ban_early_stops(logits, requests)
        want_logprobs = any(r.sampling.logprobs for r in requests)
        logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None

        chosen = logits.argmax(dim=-1)
        if not all(r.sampling.greedy for r in requests):  # decided on the host: no device sync
            greedy = to_device(torch.tensor([r.sampling.greedy for r in requests]), logits.device)
            chosen = torch.where(greedy, chosen, self._sample(logits, requests))
        chosen_logprobs = None if logprobs is None else logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
        return SampledTokens(chosen, chosen_logprobs)

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


def _apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    vocab = logits.shape[-1]
    ks = to_device(torch.tensor([k if 0 < k < vocab else vocab for k in top_k]), logits.device)
    sorted_logits = logits.sort(dim=-1, descending=True).values
    kth = sorted_logits.gather(1, (ks - 1).unsqueeze(1))
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p.unsqueeze(1)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
