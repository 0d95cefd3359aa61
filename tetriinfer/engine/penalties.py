"""Logit processors applied before sampling: logit_bias and the repetition, frequency and presence
penalties, with vLLM's semantics (see SamplingParams). Only the rows of requests that ask are
touched, so a batch without them runs exactly as before.

With async scheduling a decode's newest token may still be on the device (not yet in
`output_token_ids`): `pending` holds it per row (-1 where none), and it is counted there, on the
device, without waiting for it.
"""

from __future__ import annotations

import torch

from tetriinfer.engine.host_copy import to_device
from tetriinfer.engine.request import Request


def apply_logit_bias(logits: torch.Tensor, requests: list[Request]) -> None:
    rows, ids, values = [], [], []
    for row, r in enumerate(requests):
        if r.sampling.logit_bias:
            for token, bias in r.sampling.logit_bias.items():
                rows.append(row)
                ids.append(int(token))
                values.append(float(bias))
    if rows:
        dev = logits.device
        logits.index_put_((to_device(torch.tensor(rows), dev), to_device(torch.tensor(ids), dev)),
                          to_device(torch.tensor(values, dtype=logits.dtype), dev), accumulate=True)


def apply_penalties(logits: torch.Tensor, requests: list[Request], pending: torch.Tensor | None = None) -> None:
    """Repetition over prompt + output tokens, then frequency and presence over output tokens."""
    rows = [row for row, r in enumerate(requests) if r.sampling.has_penalties]
    if not rows:
        return
    dev, vocab = logits.device, logits.shape[1]
    reqs = [requests[row] for row in rows]
    counts = _token_counts([r.output_token_ids for r in reqs], vocab, dev)
    if pending is not None:
        extra = pending[to_device(torch.tensor(rows), dev)].unsqueeze(1)
        has = (extra >= 0).to(counts.dtype)  # a scatter, not a boolean index: no wait for the device
        counts.scatter_add_(1, extra.clamp(min=0), has)
    prompt_seen = _token_counts([r.prompt_token_ids for r in reqs], vocab, dev) > 0
    rows_t = to_device(torch.tensor(rows), dev)
    sub = logits[rows_t]

    def column(values: list[float]) -> torch.Tensor:
        return to_device(torch.tensor(values, dtype=logits.dtype), dev).unsqueeze(1)

    rep = column([r.sampling.repetition_penalty for r in reqs])
    seen = prompt_seen | (counts > 0)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - column([r.sampling.frequency_penalty for r in reqs]) * counts
    sub = sub - column([r.sampling.presence_penalty for r in reqs]) * (counts > 0).to(sub.dtype)
    logits[rows_t] = sub


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab] float counts of each token id per list, built on the device (only
    the ids travel there, not a vocab-wide table)."""
    counts = torch.zeros(len(token_lists), vocab, dtype=torch.float32, device=device)
    lengths = [len(t) for t in token_lists]
    if sum(lengths):
        row_ids = torch.repeat_interleave(torch.arange(len(token_lists)), torch.tensor(lengths))
        flat = torch.tensor([t for tokens in token_lists for t in tokens], dtype=torch.int64)
        counts.index_put_((to_device(row_ids, device), to_device(flat, device)),
                          torch.ones((), device=device).expand(len(flat)), accumulate=True)
    return counts
