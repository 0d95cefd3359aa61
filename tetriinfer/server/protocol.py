"""The OpenAI wire format: request bodies (pydantic, strict types, unknown fields ignored like
OpenAI does), the error body, and the response and stream-chunk shapes (plain dicts).

Types are strict (no "16" for 16, no true for 1) so a wrong type is reported, naming the field,
instead of being guessed at. Fields whose OpenAI type is a union (prompt, stop, message content)
are checked by hand below so their errors read as one sentence rather than one per union branch.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from tetriinfer.sampling_params import SamplingParams


class APIError(Exception):
    """A request the server answers with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers  # e.g. Retry-After on a 503

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(err: ValidationError) -> APIError:
    """pydantic's first complaint as a 400 naming the field (e.g. `max_tokens`, `messages.0.role`)."""
    first = err.errors(include_url=False)[0]
    path = ".".join(str(part) for part in first["loc"])
    if first["type"] == "value_error":  # our own validators: their message is the whole story
        message = str(first["ctx"]["error"])
    elif path:
        message = f"invalid value for '{path}': {first['msg']} (got {repr(first.get('input'))[:100]})"
    else:
        message = f"request body: {first['msg']}"
    return APIError(400, message, param=path or None)


# ---- requests ----------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool | None = None  # the usage chunk is sent whatever this says (see app.py)


class _SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None  # absent: the served model
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM's); -1 means off, as in vLLM
    seed: int | None = None
    stop: Any = Field(default=None, validate_default=True)  # str or list[str]
    stop_token_ids: list[int] | None = None  # extension
    ignore_eos: bool = False  # extension
    min_tokens: int = 0  # extension
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stream", "ignore_eos", "min_tokens", "echo", "logprobs", "add_generation_prompt",
                     mode="before", check_fields=False)
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """Some clients send null for a field they leave unset."""
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return value
        raise ValueError(f"stop must be a string or a list of strings, got {value!r}")

    def check_supported(self) -> None:
        """OpenAI fields we accept only at their neutral value: anything else is a 400, not a silent no."""
        if self.n is not None and self.n != 1:
            raise APIError(400, f"n={self.n} is not supported: one choice per request", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")

    def sampling_params(self, max_tokens: int, logprobs: bool) -> SamplingParams:
        """SamplingParams checks the ranges; its ValueError names the field, and becomes a 400. The
        sampler holds temperature and top_p as float32: a top_p that is 0 there is refused (ask for
        temperature 0 to get greedy), and so is a temperature that is infinite there."""
        if self.top_p is not None and self.top_p > 0 and _float32(self.top_p) == 0:
            raise APIError(400, f"top_p must be > 0: {self.top_p} is 0 in float32 (use temperature 0 for greedy)",
                           param="top_p")
        if self.temperature is not None and _float32(self.temperature) == math.inf:
            raise APIError(400, f"temperature {self.temperature} is too large for float32", param="temperature")
        top_k = self.top_k if self.top_k is not None else 0
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_k=0 if top_k == -1 else top_k,
                top_p=1.0 if self.top_p is None else self.top_p,
                seed=self.seed,
                stop=list(self.stop),
                stop_token_ids=list(self.stop_token_ids or []),
                ignore_eos=self.ignore_eos,
                min_tokens=self.min_tokens,
                logprobs=logprobs,
            )
        except ValueError as e:
            message = str(e)
            field = message.split(" ", 1)[0]  # SamplingParams' messages start with the field's name
            raise APIError(400, message, param=field if field in _SAMPLING_FIELDS else None) from e


_SAMPLING_FIELDS = set(SamplingParams.__dataclass_fields__) | {"stop"}
MAX_LOGPROBS = 20  # completions' top-n (as vLLM's default cap); only the chosen token's is returned


def _float32(value: float) -> float:
    """`value` as the sampler's float32 tensors hold it."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


class CompletionRequest(_SamplingRequest):
    prompt: Any = Field(default=None, validate_default=True)  # str | list[int] | [str] | [list[int]]
    logprobs: int | None = None  # OpenAI's top-n; we return the chosen token's logprob for any n >= 0
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> str | list[int]:
        """One prompt, as text or token ids. Several prompts in one request are refused: send one
        request per prompt (they run concurrently anyway)."""
        if value is None:
            raise ValueError("prompt is required")
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            if value and all(isinstance(p, (str, list)) for p in value):
                raise ValueError("batched prompts are not supported: send one prompt per request")
            if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
                return value
        raise ValueError("prompt must be a string or a list of token ids (integers), "
                         f"got {type(value).__name__}: {str(value)[:80]}")

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if self.best_of is not None and self.best_of > 1:
            raise APIError(400, f"best_of={self.best_of} is not supported", param="best_of")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be >= 0 and at most {MAX_LOGPROBS}, got {self.logprobs}",
                           param="logprobs")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: str
    content: Any = None  # str, a list of {"type": "text", "text": ...} parts, or null

    @field_validator("content")
    @classmethod
    def _content_text(cls, value: Any) -> str:
        """Text parts are joined with newlines (as vLLM does); other part types are refused."""
        if value is None:  # e.g. an assistant turn that only called tools
            return ""
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(p, dict) for p in value):
            for part in value:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"content part {str(part)[:80]} is not supported: only "
                                     '{"type": "text", "text": "..."} parts')
            return "\n".join(part["text"] for part in value)
        raise ValueError("message content must be a string or a list of text parts, "
                         f"got {type(value).__name__}: {str(value)[:80]}")


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True  # extension
    tools: list | None = None
    response_format: dict | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise APIError(400, "messages must be a non-empty list", param="messages")
        if self.top_logprobs:
            raise APIError(400, "top_logprobs is not supported: only the chosen token's logprob is returned",
                           param="top_logprobs")
        if self.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, f"response_format {self.response_format.get('type')!r} is not supported",
                           param="response_format")

    def message_dicts(self) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


# ---- responses ---------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: prompt tokens the prefix cache served."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _finite(logprob: float | None) -> float | None:
    """JSON has no -inf: a chosen token the model gave ~zero probability reads -9999 (as in vLLM)."""
    return logprob if logprob is None or math.isfinite(logprob) else -9999.0


def completion_logprobs(token_texts: list[str], logprobs: list[float | None], text_offset: int) -> dict:
    """Completions' logprobs object; `top_logprobs` is absent since we return only the chosen tokens."""
    offsets = []
    for text in token_texts:
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": token_texts, "token_logprobs": [_finite(lp) for lp in logprobs], "top_logprobs": None,
            "text_offset": offsets}


def chat_logprobs(token_texts: list[str], logprobs: list[float | None]) -> dict:
    return {"content": [
        {"token": text, "logprob": _finite(lp), "bytes": list(text.encode("utf-8")), "top_logprobs": []}
        for text, lp in zip(token_texts, logprobs)
    ]}


def completion_choice(text: str, finish_reason: str | None, logprobs: dict | None = None,
                      stop_reason: str | int | None = None) -> dict:
    return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def chat_choice(message: dict, finish_reason: str | None, logprobs: dict | None = None,
                stop_reason: str | int | None = None, *, delta: bool = False) -> dict:
    return {"index": 0, "delta" if delta else "message": message, "logprobs": logprobs,
            "finish_reason": finish_reason, "stop_reason": stop_reason}


def response(request_id: str, object: str, created: int, model: str, choices: list[dict],
             usage: dict | None = None) -> dict:
    body = {"id": request_id, "object": object, "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body
