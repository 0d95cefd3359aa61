"""Prompt logprobs (`SamplingParams.prompt_logprobs`): the log-probability of every prompt token
given the ones before it, its rank, and the top-N alternatives, as lm-eval's loglikelihood tasks
(echo + logprobs) and vLLM's `prompt_logprobs` field need.

They need the logits of every prompt position, which a normal step never computes (it takes the
logits of a prompt's last token only). The model runner calls `record_prompt_logprobs` after the
forward pass of a step whose prefill pieces belong to a request that asks, chunk by chunk, on that
piece's hidden rows only; other requests and steps never reach this code.
"""

from __future__ import annotations

from typing import Callable

import torch

from tetriinfer.engine.scheduler import StepPlan


def record_prompt_logprobs(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                           plan: StepPlan) -> None:
    """Append to each asking request the prompt logprobs its piece of this step yields: position p
    predicts token p + 1, so a piece over positions [start, end) gives tokens start+1 .. end (those
    inside the prompt, not yet recorded; a recompute after preemption records nothing twice)."""
    offset = 0
    for piece in plan.prefill:
        req = piece.request
        if req.wants_prompt_logprobs:
            done = len(req.prompt_logprobs)  # tokens 1..done recorded: position `done` predicts the next
            first = max(piece.start, done)
            last = min(piece.start + piece.length, len(req.prompt_token_ids) - 1)
            if piece.start <= done and first < last:
                rows = hidden[offset + first - piece.start: offset + last - piece.start]
                logprobs = torch.log_softmax(compute_logits(rows).float(), dim=-1)
                targets = torch.tensor(req.prompt_token_ids[first + 1: last + 1], device=logprobs.device)
                chosen = logprobs.gather(1, targets.unsqueeze(1))
                req.prompt_logprobs.extend(chosen.squeeze(1).tolist())
                # rank 1 is the likeliest token; ties rank as the best of them (as vLLM counts)
                req.prompt_ranks.extend(((logprobs > chosen).sum(dim=1) + 1).tolist())
                n = req.sampling.prompt_logprobs
                if n:
                    top = logprobs.topk(n, dim=-1)
                    req.prompt_top_logprobs.extend(
                        list(zip(ids, values)) for ids, values in zip(top.indices.tolist(), top.values.tolist()))
                else:
                    req.prompt_top_logprobs.extend([] for _ in range(last - first))
        offset += piece.length
