"""What the HTTP server accepts: reading a request body, parsing it, and checking it before anything
reaches the backend. A hostile or broken body is a 4xx with an OpenAI error body, never a 500,
garbage output, or a stalled event loop.

- POST bodies must be sent as `Content-Type: application/json` (parameters such as `; charset=utf-8`
  are fine); anything else, or no Content-Type, is a 415. That keeps cross-site "simple" requests
  (text/plain, forms) from a browser out.
- A body over `max_body_bytes` is a 413, decided from Content-Length before any of it is read, or by
  counting a chunked body's bytes as they arrive.
- The app parses, checks and tokenizes in a worker thread, off the event loop (see app.py).
- In any field, even an ignored one, these are a 400 naming the field: nesting deeper than
  `max_json_depth`; a lone surrogate such as "\\ud800" (not Unicode, so no tokenizer can encode it);
  NaN, Infinity or 1e999 (Python's json accepts them); an integer outside int64.
- Lists have caps: stop strings (how many, how long), stop_token_ids, chat messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.requests import Request

from tetriinfer.sampling_params import SamplingParams
from tetriinfer.server import protocol
from tetriinfer.server.protocol import APIError

JSON_MEDIA_TYPE = "application/json"
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 8 * 2**20  # a 128k-token prompt is about 1 MB, as text or as token ids
    max_json_depth: int = 32  # a chat request with content parts needs 5
    max_stop: int = 16  # stop strings per request
    max_stop_chars: int = 1024  # per stop string: the detokenizer searches for each after every token
    max_stop_token_ids: int = 1024
    max_messages: int = 4096


async def read_body(request: Request, limits: ServerLimits) -> bytes:
    """The body of a JSON POST, or a 415 (not JSON) or a 413 (too big) before reading all of it."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != JSON_MEDIA_TYPE:
        raise APIError(415, f"the body must be JSON sent with 'Content-Type: {JSON_MEDIA_TYPE}', got "
                            f"{repr(media_type) if media_type else 'no Content-Type'}", code="unsupported_media_type")
    limit = limits.max_body_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server accepts ({limit} bytes)",
                    code="request_too_large")


def parse_request(raw: bytes, model: type, limits: ServerLimits):
    """The body as `model` (a protocol request class), or a 400 naming what is wrong."""
    too_deep = f"the JSON body is nested too deeply (at most {limits.max_json_depth} levels)"
    try:
        body = json.loads(raw)
    except RecursionError:  # json gives up near 1000 levels
        raise APIError(400, too_deep) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    check_values(body, limits.max_json_depth, too_deep)
    try:
        parsed = model.model_validate(body)
    except ValidationError as e:
        raise protocol.validation_error(e) from None
    check_lists(parsed, limits)
    return parsed


def check_values(body: dict, max_depth: int, too_deep: str) -> None:
    """Depth, lone surrogates, non-finite floats and integers beyond int64, anywhere in `body`."""
    stack: list[tuple[dict | list, tuple]] = [(body, ())]
    while stack:
        node, path = stack.pop()
        if len(path) >= max_depth:
            raise APIError(400, too_deep, param=_name(path[:1]) or None)
        if type(node) is list and _int64s(node):
            continue
        for key, value in node.items() if type(node) is dict else enumerate(node):
            kind, problem = type(value), None
            if type(key) is str and _lone_surrogate(key):
                problem = _NOT_UNICODE
            elif kind is dict or kind is list:
                stack.append((value, (*path, key)))
            elif kind is str:
                problem = _lone_surrogate(value) and _NOT_UNICODE
            elif kind is float:
                problem = value - value != 0.0 and f"must be a finite number, got {value}"  # inf - inf is nan
            elif kind is int:
                problem = not _INT64_MIN <= value <= _INT64_MAX and f"must fit in 64 bits (signed), got {value}"
            if problem:
                name = _name((*path, key))
                raise APIError(400, f"'{name}' {problem}", param=name)


def _int64s(items: list) -> bool:
    """Only int64s (token ids: the one long list a request has reason to send), checked at C speed."""
    return bool(items) and set(map(type, items)) == {int} and _INT64_MIN <= min(items) and max(items) <= _INT64_MAX


_NOT_UNICODE = "is not valid Unicode: it holds a lone surrogate (an unpaired \\ud800-\\udfff escape)"


def _lone_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _name(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def check_lists(req, limits: ServerLimits) -> None:
    """Caps on the lists whose length costs the server work per token or per request (a request
    without such a field, e.g. /tokenize's, has nothing to cap)."""
    stop = getattr(req, "stop", ())
    long = next((s for s in stop if len(s) > limits.max_stop_chars), None)
    if long is not None:
        raise APIError(400, f"stop strings may be at most {limits.max_stop_chars} characters long, got one of "
                            f"{len(long)}", param="stop")
    for param, items, cap in (("stop", stop, limits.max_stop),
                              ("stop_token_ids", getattr(req, "stop_token_ids", None) or (), limits.max_stop_token_ids),
                              ("messages", getattr(req, "messages", None) or (), limits.max_messages)):
        if len(items) > cap:
            raise APIError(400, f"{param} may hold at most {cap} items, got {len(items)}", param=param)


def check_prompt(token_ids: list[int], sampling: SamplingParams, param: str, backend) -> None:
    """The prompt and max_tokens fit the backend's context; every token id is in its vocabulary. The
    length is checked before the ids are scanned, so an absurdly long prompt is refused at once."""
    max_model_len, vocab_size = backend.max_model_len, backend.vocab_size
    if not token_ids:
        raise APIError(400, "prompt is empty", param=param)
    if len(token_ids) > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, your "
                            f"prompt has {len(token_ids)} tokens. Please shorten the prompt.", param=param)
    total = len(token_ids) + sampling.max_tokens
    if total > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                            f"requested {total} tokens ({len(token_ids)} in the prompt, {sampling.max_tokens} "
                            f"for the completion). Please reduce the prompt or max_tokens.", param="max_tokens")
    for ids, name, what in ((token_ids, param, "token id"), (sampling.stop_token_ids, "stop_token_ids", "stop token id")):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise APIError(400, f"{what} {bad} is outside the vocabulary [0, {vocab_size})", param=name)
