"""The OpenAI response and stream-chunk shapes (plain dicts), and vLLM's `prompt_logprobs` entries."""

from __future__ import annotations

import math


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: prompt tokens the prefix cache served."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _finite(logprob: float | None) -> float | None:
    """JSON has no -inf: a chosen token the model gave ~zero probability reads -9999 (as in vLLM)."""
    return logprob if logprob is None or math.isfinite(logprob) else -9999.0


TopTexts = list[tuple[str, float]]  # one position's best alternatives as (token text, logprob)


def completion_logprobs(token_texts: list[str], logprobs: list[float | None], text_offset: int,
                        tops: list[TopTexts | None] | None = None) -> dict:
    """Completions' logprobs object. `tops` (logprobs=N): per token its N best as {text: logprob}
    with the chosen token's own entry added (as vLLM does); None for a position without any (the
    echoed prompt's first token)."""
    offsets = []
    for text in token_texts:
        offsets.append(text_offset)
        text_offset += len(text)
    top_dicts = None
    if tops is not None:
        top_dicts = []
        for text, lp, top in zip(token_texts, logprobs, tops):
            if top is None or lp is None:
                top_dicts.append(None)
                continue
            entry = {t: _finite(v) for t, v in top}
            entry.setdefault(text, _finite(lp))
            top_dicts.append(entry)
    return {"tokens": token_texts, "token_logprobs": [_finite(lp) for lp in logprobs], "top_logprobs": top_dicts,
            "text_offset": offsets}


def chat_logprobs(token_texts: list[str], logprobs: list[float | None], tops: list[TopTexts] | None = None) -> dict:
    tops = tops if tops is not None else [[] for _ in token_texts]
    return {"content": [
        {"token": text, "logprob": _finite(lp), "bytes": list(text.encode("utf-8")),
         "top_logprobs": [{"token": t, "logprob": _finite(v), "bytes": list(t.encode("utf-8"))} for t, v in top]}
        for text, lp, top in zip(token_texts, logprobs, tops)
    ]}


def completion_choice(text: str, finish_reason: str | None, logprobs: dict | None = None,
                      stop_reason: str | int | None = None, index: int = 0) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def chat_choice(message: dict, finish_reason: str | None, logprobs: dict | None = None,
                stop_reason: str | int | None = None, *, delta: bool = False, index: int = 0) -> dict:
    return {"index": index, "delta" if delta else "message": message, "logprobs": logprobs,
            "finish_reason": finish_reason, "stop_reason": stop_reason}


def response(request_id: str, object: str, created: int, model: str, choices: list[dict],
             usage: dict | None = None) -> dict:
    body = {"id": request_id, "object": object, "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def prompt_logprobs(token_ids: list[int], token_texts: list[str], logprobs: list[float | None],
                    ranks: list[int | None], tops: list[list[tuple[int, str, float]]]) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token, null for the first (nothing predicts it), else a
    dict token id (a string: JSON keys are) -> {logprob, rank, decoded_token} holding the prompt's
    own token first, then the top-N (`tops`: (id, text, logprob), ranks 1..N)."""
    entries: list[dict | None] = []
    for token, text, lp, rank, top in zip(token_ids, token_texts, logprobs, ranks, tops):
        if lp is None:
            entries.append(None)
            continue
        entry = {str(token): {"logprob": _finite(lp), "rank": rank, "decoded_token": text}}
        for r, (t, t_text, v) in enumerate(top, 1):
            entry.setdefault(str(t), {"logprob": _finite(v), "rank": r, "decoded_token": t_text})
        entries.append(entry)
    return entries
