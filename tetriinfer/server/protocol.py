"""The OpenAI wire format: request bodies (pydantic, strict types, unknown fields ignored like
OpenAI does) and the error body; the response and stream-chunk shapes are `server.responses`.

Types are strict (no "16" for 16, no true for 1) so a wrong type is reported, naming the field,
instead of being guessed at. Fields whose OpenAI type is a union (prompt, stop, message content)
are checked by hand (here, and in chat_request.py for chat messages) so their errors read as one sentence
rather than one per union branch.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from tetriinfer.sampling_params import MAX_TOP_LOGPROBS, SamplingParams


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

    include_usage: bool | None = None  # a last chunk (choices: []) carries the usage, as OpenAI's
    continuous_usage_stats: bool | None = None  # vLLM's: with include_usage, usage on every chunk too


# vLLM's request extensions that change what is generated and that this server does not implement:
# each is accepted at the value that changes nothing (null, empty, or the listed default) and
# refused otherwise, so a client relying on one gets a 400 naming it instead of an answer that
# silently ignored it. Other unknown fields (cosmetic ones such as spaces_between_special_tokens)
# are ignored, as OpenAI's API does.
UNSUPPORTED_VLLM_FIELDS: dict[str, tuple[Any, str]] = {  # name -> (no-op value, what to do instead)
    "use_beam_search": (False, "sample with n instead"),
}


def check_or_400(check, value: str, param: str, missing_prefix: str | None = None,
                  invalid_prefix: str | None = None) -> None:
    """Run a structured-output check; the grammar library missing (ImportError) or the value not
    compiling (ValueError) is a 400 naming `param` (each message prefixed, by default with `param: `)."""
    try:
        check(value)
    except ImportError as e:
        raise APIError(400, f"{f'{param}: ' if missing_prefix is None else missing_prefix}{e}", param=param) from None
    except ValueError as e:
        raise APIError(400, f"{f'{param}: ' if invalid_prefix is None else invalid_prefix}{e}", param=param) from None


class SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow", strict=True)  # extras kept for check_supported

    model: str | None = None  # absent: the served model
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM's); -1 means off, as in vLLM
    min_p: float | None = None  # extension (vLLM's)
    seed: int | None = None
    stop: Any = Field(default=None, validate_default=True)  # str or list[str]
    stop_token_ids: list[int] | None = None  # extension
    ignore_eos: bool = False  # extension
    include_stop_str_in_output: bool = False  # extension (vLLM's)
    skip_special_tokens: bool = True  # vLLM's: False keeps special tokens' texts in the output
    min_tokens: int = 0  # extension
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # extension (vLLM's)
    logit_bias: dict[str, float] | None = None
    response_format: dict | None = None
    guided_json: dict | str | None = None  # vLLM's extension: a JSON schema, as response_format json_schema
    guided_regex: str | None = None  # vLLM's: the output matches this regular expression
    guided_choice: list[str] | None = None  # vLLM's: the output is exactly one of these strings
    guided_grammar: str | None = None  # vLLM's: the output is a sentence of this EBNF grammar
    allowed_token_ids: list[int] | None = None  # vLLM's: only these token ids may be sampled ([]: any)
    bad_words: list[str] | None = None  # vLLM's: words the output never contains (engine.token_masks)
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob, rank and top-N (not streamed)
    truncate_prompt_tokens: int | None = None  # vLLM's: keep the prompt's last k tokens (-1: max_model_len)
    user: str | None = None

    @field_validator("stream", "ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "min_tokens", "echo", "logprobs", "add_generation_prompt",
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
        """Values the server refuses before anything runs (ranges SamplingParams checks itself)."""
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED_VLLM_FIELDS:
                no_op, instead = UNSUPPORTED_VLLM_FIELDS[name]
                same = value == no_op and isinstance(value, bool) == isinstance(no_op, bool)
                if value is not None and not same and value not in ([], {}, ""):
                    raise APIError(400, f"'{name}' is not supported by this server ({instead}); remove it or send "
                                        f"{json.dumps(no_op)}", param=name)
        if self.prompt_logprobs is not None:
            if not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
                raise APIError(400, f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}",
                               param="prompt_logprobs")
            if self.stream and self.prompt_logprobs > 0:  # as vLLM: stream chunks have no place for them
                raise APIError(400, "prompt_logprobs are not available when stream is true", param="prompt_logprobs")
        if self.truncate_prompt_tokens is not None and not (self.truncate_prompt_tokens == -1
                                                            or self.truncate_prompt_tokens >= 1):
            raise APIError(400, "truncate_prompt_tokens must be an integer >= 1 (keep the prompt's last k tokens) or "
                                f"-1 (keep the last max_model_len), got {self.truncate_prompt_tokens}",
                           param="truncate_prompt_tokens")
        if self.n is not None and not 1 <= self.n <= MAX_N:
            raise APIError(400, f"n must be in [1, {MAX_N}], got {self.n}", param="n")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options can only be set when stream is true", param="stream_options")
        for key in self.logit_bias or {}:
            if not key.lstrip("-").isdigit():
                raise APIError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")

    @property
    def answered_prompt_logprobs(self) -> int | None:
        """The prompt_logprobs the response carries: none unless asked, nor in a stream (where 0 is
        accepted and dropped, as vLLM does)."""
        return None if self.stream else self.prompt_logprobs

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    def _regex(self) -> dict:
        from tetriinfer.engine.structured import check_regex, choice_regex

        param = "guided_regex" if self.guided_regex is not None else "guided_choice"
        if self.guided_choice is not None and not (self.guided_choice and all(self.guided_choice)):
            raise APIError(400, "guided_choice must be a non-empty list of non-empty strings", param=param)
        regex = self.guided_regex if self.guided_regex is not None else choice_regex(self.guided_choice)
        check_or_400(check_regex, regex, param)
        return {"regex": regex}

    def _grammar(self) -> dict:
        from tetriinfer.engine.structured import check_grammar

        check_or_400(check_grammar, self.guided_grammar, "guided_grammar")
        return {"grammar": self.guided_grammar}

    def _guided_schema(self) -> dict:
        """vLLM's guided_json: a schema as an object or as a JSON string."""
        schema = self.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise APIError(400, f"guided_json is not valid JSON: {e}", param="guided_json") from None
        if not isinstance(schema, dict):
            raise APIError(400, "guided_json must be a JSON schema object", param="guided_json")
        return schema

    def structured(self) -> dict:
        """The output constraint as SamplingParams fields: {} (text), json_object, json_schema (a JSON
        string; from response_format or vLLM's guided_json) or regex (vLLM's guided_regex and
        guided_choice). The grammar library is needed for all but text: a 400 names how to install it."""
        fmt = self.response_format
        text = not fmt or fmt.get("type", "text") == "text"
        given = [name for name, value in (("response_format", None if text else fmt), ("guided_json", self.guided_json),
                                          ("guided_regex", self.guided_regex), ("guided_choice", self.guided_choice),
                                          ("guided_grammar", self.guided_grammar))
                 if value is not None]
        if len(given) > 1:
            raise APIError(400, f"give one output constraint, not {' and '.join(given)}", param=given[1])
        if self.guided_regex is not None or self.guided_choice is not None:
            return self._regex()
        if self.guided_grammar is not None:
            return self._grammar()
        if self.guided_json is not None:
            fmt = {"type": "json_schema", "json_schema": {"name": "guided_json", "schema": self._guided_schema()}}
        elif text:
            return {}
        kind = fmt.get("type")
        if kind == "json_object":
            fields = {"json_object": True}
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise APIError(400, "response_format json_schema needs 'json_schema': {'name': ..., 'schema': {...}}",
                               param="response_format")
            fields = {"json_schema": json.dumps(schema)}
        else:
            raise APIError(400, f"response_format type {kind!r} is not supported: use 'text', 'json_object' or "
                                "'json_schema'", param="response_format")
        from tetriinfer.engine.structured import check_json_schema

        check_or_400(check_json_schema, fields.get("json_schema", '{"type": "object"}'), "response_format",
                      missing_prefix=f"response_format {kind!r}: ", invalid_prefix="")
        return fields

    def prompt_tokens_kept(self, max_model_len: int) -> int | None:
        """How many of the prompt's last tokens truncate_prompt_tokens keeps (None: all of them); -1
        is the model's context, as vLLM's max_model_len. More than the context is a 400, as in vLLM."""
        keep = self.truncate_prompt_tokens
        if keep == -1:
            return max_model_len
        if keep is not None and keep > max_model_len:
            raise APIError(400, f"truncate_prompt_tokens ({keep}) cannot be greater than this model's maximum context "
                                f"length ({max_model_len}); give a smaller value, or -1 for the whole context",
                           param="truncate_prompt_tokens")
        return keep

    def sampling_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None,
                        seed_offset: int = 0, defaults: dict | None = None) -> SamplingParams:
        """SamplingParams checks the ranges; its ValueError names the field, and becomes a 400. The
        sampler holds temperature and top_p as float32: a top_p that is 0 there is refused (ask for
        temperature 0 to get greedy), and so is a temperature that is infinite there. `defaults`
        (the model's generation_config.json, model.loader.generation_defaults) fill the sampling
        fields the request leaves out, as vLLM does."""
        defaults = defaults or {}

        def given(name: str, builtin: float) -> float:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, builtin)

        if self.top_p is not None and self.top_p > 0 and _float32(self.top_p) == 0:
            raise APIError(400, f"top_p must be > 0: {self.top_p} is 0 in float32 (use temperature 0 for greedy)",
                           param="top_p")
        if self.temperature is not None and _float32(self.temperature) == math.inf:
            raise APIError(400, f"temperature {self.temperature} is too large for float32", param="temperature")
        top_k = given("top_k", 0)
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=given("temperature", 1.0),
                top_k=0 if top_k == -1 else top_k,
                top_p=given("top_p", 1.0),
                min_p=given("min_p", 0.0),
                stop=list(self.stop),
                stop_token_ids=list(self.stop_token_ids or []),
                include_stop_str_in_output=self.include_stop_str_in_output,
                skip_special_tokens=self.skip_special_tokens,
                ignore_eos=self.ignore_eos,
                min_tokens=self.min_tokens,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                # n > 1: each choice its own seed (seed + i), so the choices differ yet repeat (as vLLM)
                seed=None if self.seed is None else self.seed + seed_offset,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=given("repetition_penalty", 1.0),
                logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
                allowed_token_ids=list(self.allowed_token_ids) if self.allowed_token_ids else None,
                bad_words=list(self.bad_words or []),
                **self.structured(),
            )
        except ValueError as e:
            message = str(e)
            field = message.split(" ", 1)[0]  # SamplingParams' messages start with the field's name
            raise APIError(400, message, param=field if field in _SAMPLING_FIELDS else None) from e


_SAMPLING_FIELDS = set(SamplingParams.__dataclass_fields__) | {"stop"}
MAX_LOGPROBS = MAX_TOP_LOGPROBS  # completions' logprobs / chat's top_logprobs (vLLM's default cap)
MAX_N = 128  # choices per request (n), and prompts x n in one completions request


def _float32(value: float) -> float:
    """`value` as the sampler's float32 tensors hold it."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


class CompletionRequest(SamplingRequest):
    prompt: Any = Field(default=None, validate_default=True)  # str | list[int] | [str] | [list[int]]
    logprobs: int | None = None  # OpenAI's top-n: the chosen token's logprob and the n best
    echo: bool = False  # the prompt (and with logprobs, its logprobs) before the completion
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: Any) -> list[str | list[int]]:
        """The prompts: one as text or token ids, or a batch (a list of strings or of token-id lists)."""
        if value is None:
            raise ValueError("prompt is required")
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            if value and all(isinstance(p, str) for p in value):
                return value
            if value and all(isinstance(p, list) for p in value) and all(_token_ids(p) for p in value):
                return value
            if _token_ids(value):
                return [value]
        raise ValueError("prompt must be a string, a list of token ids (integers), or a batch: a list of strings "
                         f"or of token-id lists; got {type(value).__name__}: {str(value)[:80]}")

    def check_supported(self) -> None:
        super().check_supported()
        if len(self.prompt) * self.num_choices > MAX_N:
            raise APIError(400, f"{len(self.prompt)} prompts x n={self.num_choices} choices exceed {MAX_N} per request",
                           param="prompt")
        if self.best_of is not None and self.best_of > self.num_choices:
            raise APIError(400, f"best_of={self.best_of} is not supported", param="best_of")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens must be >= 1 (0 only with echo: the prompt's logprobs alone)",
                           param="max_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be >= 0 and at most {MAX_LOGPROBS}, got {self.logprobs}",
                           param="logprobs")


def _token_ids(value: list) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) for t in value)
