"""Turns the logits of a step into one token per request: greedy, temperature, top-k, top-p.

Sampling draws Gumbel-style exponential noise (argmax of p / q with q ~ Exp(1) samples from p). A
request with a seed draws its noise from a generator seeded by (seed, output position), so its tokens
do not depend on what else shares the batch, nor on which engine runs it (KV export/import).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tetriinfer.engine.request import Request


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # of the chosen tokens, under the unscaled distribution


class Sampler:
    def __init__(self, device: torch.device, seed: int, eos_token_ids: tuple[int, ...]):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.eos_token_ids = eos_token_ids

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SampleResult:
        logits = logits.float()
        self._ban_early_stops(logits, requests)
        want_logprobs = any(r.sampling.logprobs for r in requests)
        logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None

        chosen = logits.argmax(dim=-1)
        if not all(r.sampling.greedy for r in requests):  # decided on the host: no device sync
            greedy = torch.tensor([r.sampling.greedy for r in requests], device=logits.device)
            chosen = torch.where(greedy, chosen, self._sample(logits, requests))
        token_ids = chosen.tolist()
        chosen_logprobs = None
        if logprobs is not None:
            chosen_logprobs = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
        return SampleResult(token_ids, chosen_logprobs)

    def _ban_early_stops(self, logits: torch.Tensor, requests: list[Request]) -> None:
        """min_tokens: no EOS or stop token before the request has that many tokens."""
        for row, r in enumerate(requests):
            if len(r.output_token_ids) < r.sampling.min_tokens:
                banned = list(r.sampling.stop_token_ids) + ([] if r.sampling.ignore_eos else list(self.eos_token_ids))
                if banned:
                    logits[row, banned] = float("-inf")

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        temperature = torch.tensor([max(r.sampling.temperature, 1e-5) for r in requests], device=logits.device)
        logits = logits / temperature.unsqueeze(1)
        if any(r.sampling.top_k > 0 for r in requests):
            logits = _apply_top_k(logits, [r.sampling.top_k for r in requests])
        if any(r.sampling.top_p < 1.0 for r in requests):
            logits = _apply_top_p(logits, torch.tensor([r.sampling.top_p for r in requests], device=logits.device))
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs)
        for row, r in enumerate(requests):
            if r.sampling.greedy:
                noise[row].fill_(1.0)
            elif r.sampling.seed is not None:
                gen = torch.Generator(device=logits.device).manual_seed(
                    hash((r.sampling.seed, len(r.output_token_ids))) & 0x7FFF_FFFF_FFFF_FFFF
                )
                noise[row].exponential_(generator=gen)
            else:
                noise[row].exponential_(generator=self.generator)
        return (probs / noise).argmax(dim=-1)


def _apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    vocab = logits.shape[-1]
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=logits.device)
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
