"""Token masks applied before sampling, with vLLM's semantics: `allowed_token_ids` (every other
token's logit becomes -inf) and `bad_words` (their token sequences: `mask_checks.bad_words_token_ids`).
Only the rows of requests that ask are touched, so a batch without them runs exactly as before.

Bad words are matched against the output tokens only (not the prompt), as in vLLM. With async
scheduling a decode's newest token may still be on the device: a multi-token bad word whose match
hinges on that token is banned on the device, conditionally (`pending[row] == the token`), so the
step never waits for the device.
"""

from __future__ import annotations

import torch

from tetriinfer.engine.host_copy import to_device
from tetriinfer.engine.mask_checks import bad_words_token_ids
from tetriinfer.engine.request import Request
from tetriinfer.model.tokenizer import Tokenizer


def apply_allowed_token_ids(logits: torch.Tensor, requests: list[Request]) -> None:
    masked = [row for row, r in enumerate(requests) if r.sampling.allowed_token_ids]
    if not masked:
        return
    dev = logits.device
    rows, ids = [], []
    for k, row in enumerate(masked):
        allowed = requests[row].sampling.allowed_token_ids
        rows += [k] * len(allowed)
        ids += allowed
    keep = torch.zeros(len(masked), logits.shape[1], dtype=torch.bool, device=dev)
    keep[to_device(torch.tensor(rows), dev), to_device(torch.tensor(ids), dev)] = True
    sel = to_device(torch.tensor(masked), dev)
    logits[sel] = logits[sel].masked_fill(~keep, float("-inf"))


def apply_bad_words(logits: torch.Tensor, requests: list[Request], tokenizer: Tokenizer | None,
                    pending: torch.Tensor | None, pending_rows: set[int]) -> None:
    """Ban each bad word's last token where the output ends with the word's other tokens. `pending`:
    per row the token sampled by the step in flight (-1 if none); `pending_rows`: the rows that have
    one (known on the host)."""
    rows, tokens, needs = [], [], []  # ban tokens[i] in rows[i] if needs[i] < 0 or pending[row] == needs[i]
    for row, r in enumerate(requests):
        if not r.sampling.bad_words:
            continue
        if r.bad_words_ids is None:  # made here, not carried: a KV hand-off needs nothing more
            r.bad_words_ids = bad_words_token_ids(r.sampling.bad_words, tokenizer)
        out = r.output_token_ids
        for word in r.bad_words_ids:
            prefix = word[:-1]
            if row in pending_rows and prefix:
                # the output is out + [p]: its tail is `prefix` if out ends with prefix[:-1] and p == prefix[-1]
                head = prefix[:-1]
                if len(out) >= len(head) and out[len(out) - len(head):] == head:
                    rows.append(row), tokens.append(word[-1]), needs.append(prefix[-1])
            elif len(out) >= len(prefix) and out[len(out) - len(prefix):] == prefix:
                rows.append(row), tokens.append(word[-1]), needs.append(-1)
    if not rows:
        return
    dev = logits.device
    rows_t, tokens_t = to_device(torch.tensor(rows), dev), to_device(torch.tensor(tokens), dev)
    hit = to_device(torch.tensor(needs), dev)
    hit = hit < 0 if pending is None else (hit < 0) | (pending[rows_t] == hit)
    # Added, not assigned: a (row, token) listed twice (two words ending alike) must not race.
    ban = torch.zeros(len(rows), dtype=logits.dtype, device=dev).masked_fill(hit, float("-inf"))
    logits.index_put_((rows_t, tokens_t), ban, accumulate=True)
