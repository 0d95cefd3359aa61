"""A validated API request, ready for the backend: a `Job`, fanned out into one `SubRequest` per
choice (prompts x n, as vLLM numbers them: choice index = prompt_index * n + i). Each sub-request is
its own backend (cluster) request; the server gathers them and sums their usage.

Parsing, checking and tokenizing run here, in a worker thread (app.py), before anything reaches the
backend: bad input is an APIError (4xx). vLLM's `truncate_prompt_tokens` is applied here too, once
per prompt right after it becomes token ids (for chat, after the chat template), so every choice,
the usage, echo and the prompt logprobs all see the same kept tokens.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from tetriinfer.engine.mask_checks import check_token_masks
from tetriinfer.sampling_params import SamplingParams
from tetriinfer.server.backend import Backend
from tetriinfer.server.limits import ServerLimits, check_prompt, parse_request
from tetriinfer.server.metrics import RequestTiming
from tetriinfer.server.chat_request import ChatCompletionRequest
from tetriinfer.server.protocol import APIError, CompletionRequest
from tetriinfer.server.reasoning import structured_start_token
from tetriinfer.server.tool_calls import ToolCalling, choice_mode, tool_calling

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class SubRequest:
    """One choice: one backend request."""

    index: int  # the choice's index in the response
    request_id: str  # the backend's id (the job's own id when it is the only one)
    prompt_index: int
    prompt_token_ids: list[int]
    prompt: str | None
    sampling: SamplingParams


@dataclass
class Job:
    request_id: str
    chat: bool
    subs: list[SubRequest]
    stream: bool
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    timing: RequestTiming = field(default_factory=RequestTiming)
    echo: bool = False  # completions: the prompt goes before the text (and its logprobs before the output's)
    prompt_only: bool = False  # echo with max_tokens 0: the prompt (and its logprobs) alone
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs field: the body carries the prompt's top-N
    include_usage: bool = False  # stream: a last chunk with the usage (stream_options.include_usage)
    continuous_usage: bool = False  # stream: usage on every chunk too (continuous_usage_stats)
    tool_calling: ToolCalling | None = None  # chat with tools: each choice's output read as tool calls
    reasoning_parser: str | None = None  # chat: each choice's <think> part read into `reasoning` (reasoning.py)
    path: str = ""  # for the access log

    @property
    def sampling(self) -> SamplingParams:
        return self.subs[0].sampling

    @property
    def prompt_tokens(self) -> int:
        """Usage counts each prompt once, however many choices it has (as vLLM)."""
        seen = {}
        for sub in self.subs:
            seen.setdefault(sub.prompt_index, len(sub.prompt_token_ids))
        return sum(seen.values())


def parse(raw: bytes, model: type, backend: Backend, limits: ServerLimits):
    parsed = parse_request(raw, model, limits)
    if parsed.model is not None and parsed.model != backend.model_name:
        raise APIError(404, f"the model '{parsed.model}' does not exist; this server serves "
                            f"'{backend.model_name}'", param="model", code="model_not_found")
    parsed.check_supported()
    return parsed


def require_tokenizer(backend: Backend):
    if backend.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: send the prompt as token ids to /v1/completions",
                       param="prompt")
    return backend.tokenizer


def _check_sampling(sampling: SamplingParams, param: str, backend: Backend) -> None:
    bad = next((t for t in sampling.logit_bias or () if not 0 <= t < backend.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"logit_bias token id {bad} is outside the vocabulary [0, {backend.vocab_size})",
                       param="logit_bias")
    try:
        check_token_masks(sampling, backend.vocab_size, backend.tokenizer)
    except ValueError as e:  # its message starts with the field's name
        raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None


def _truncated(token_ids: list[int], text: str | None, keep: int | None,
               backend: Backend) -> tuple[list[int], str | None]:
    """The prompt's last `keep` tokens, and its text: the kept tokens decoded when some were cut (so
    echo shows what the model saw), else unchanged."""
    if keep is None or len(token_ids) <= keep:
        return token_ids, text
    kept = token_ids[-keep:]
    return kept, (backend.tokenizer.decode(kept) if backend.tokenizer is not None else None)


def _fan_out(request_id: str, prompts: list[tuple[list[int], str | None]], n: int,
             make_sampling) -> list[SubRequest]:
    single = len(prompts) * n == 1
    subs = []
    for p, (ids, text) in enumerate(prompts):
        for i in range(n):
            index = p * n + i
            subs.append(SubRequest(index, request_id if single else f"{request_id}-{index}", p, ids, text,
                                   make_sampling(i)))
    return subs


def completion_job(raw: bytes, timing: RequestTiming, backend: Backend, limits: ServerLimits) -> Job:
    req: CompletionRequest = parse(raw, CompletionRequest, backend, limits)
    max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
    prompt_only = req.echo and max_tokens == 0
    logprobs = req.logprobs
    # echo + logprobs: the prompt's logprobs too (lm-eval's loglikelihood requests); vLLM's
    # prompt_logprobs field asks for them as well: the engine computes the larger top-N once
    asked = [n for n in (logprobs if req.echo else None, req.answered_prompt_logprobs) if n is not None]
    prompt_logprobs = max(asked) if asked else None

    def make_sampling(i: int) -> SamplingParams:
        # max_tokens 0 (echo): one token is still computed, then dropped
        return req.sampling_params(max(max_tokens, 1), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                   seed_offset=i, defaults=backend.sampling_defaults)

    keep = req.prompt_tokens_kept(backend.max_model_len)
    prompts = []
    for prompt in req.prompt:
        if isinstance(prompt, str):
            if prompt == "":
                raise APIError(400, "prompt is empty", param="prompt")
            prompts.append(_truncated(require_tokenizer(backend).encode(prompt), prompt, keep, backend))
        else:
            prompts.append(_truncated(list(prompt), None, keep, backend))
    job_id = f"cmpl-{uuid.uuid4().hex}"
    subs = _fan_out(job_id, prompts, req.num_choices, make_sampling)
    for sub in subs[:: req.num_choices]:
        check_prompt(sub.prompt_token_ids, sub.sampling, "prompt", backend)
    _check_sampling(subs[0].sampling, "prompt", backend)
    return Job(job_id, False, subs, req.stream, backend.model_name, timing=timing, echo=req.echo, prompt_only=prompt_only,
               prompt_logprobs=req.answered_prompt_logprobs, include_usage=req.include_usage,
               continuous_usage=req.continuous_usage, path="/v1/completions")


def chat_prompt(tokenizer, messages: list[dict], *, add_generation_prompt: bool, continue_final_message: bool = False,
                template_kwargs: dict | None = None, tools: list[dict] | None = None) -> str:
    """The chat template's prompt text; a template refusing the conversation is a 400."""
    from tetriinfer.model.chat_template import ChatTemplateError

    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt, continue_final_message=continue_final_message,
                                             tools=tools, template_kwargs=template_kwargs)
    except ChatTemplateError as e:  # the model's own template may refuse a conversation (e.g. roles)
        raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None


def chat_job(raw: bytes, timing: RequestTiming, backend: Backend, limits: ServerLimits,
             auto_tool_parser: str | None = None, reasoning_parser: str | None = None) -> Job:
    """`auto_tool_parser`: the server's --tool-call-parser when --enable-auto-tool-choice is on;
    `reasoning_parser`: its --reasoning-parser."""
    req: ChatCompletionRequest = parse(raw, ChatCompletionRequest, backend, limits)
    tools = tool_calling(req.tools, choice_mode(req.tools, req.tool_choice), auto_tool_parser)
    if tools is not None and tools.keeps_special_tokens:
        req.skip_special_tokens = False  # as vLLM's Mistral parser adjusts its requests
    tokenizer = require_tokenizer(backend)
    keep = req.prompt_tokens_kept(backend.max_model_len)
    # the template sees the tools whatever tool_choice says (vLLM's "none" too)
    prompt = chat_prompt(tokenizer, req.message_dicts(), add_generation_prompt=req.add_generation_prompt,
                         continue_final_message=req.continue_final_message, template_kwargs=req.chat_template_kwargs,
                         tools=req.tools)
    token_ids, prompt = _truncated(tokenizer.encode(prompt), prompt, keep, backend)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:  # as vLLM: the rest of the context (too little room is reported below),
        max_tokens = max(backend.max_model_len - len(token_ids), 1)  # or the model's max_new_tokens
        max_tokens = min(max_tokens, backend.sampling_defaults.get("max_new_tokens", max_tokens))
    logprobs = (req.top_logprobs or 0) if req.logprobs else None

    job_id = f"chatcmpl-{uuid.uuid4().hex}"
    subs = _fan_out(job_id, [(token_ids, prompt)], req.num_choices,
                    lambda i: req.sampling_params(max_tokens, logprobs=logprobs, defaults=backend.sampling_defaults,
                                                  prompt_logprobs=req.answered_prompt_logprobs, seed_offset=i))
    if reasoning_parser is not None and subs[0].sampling.structured:
        after = structured_start_token(tokenizer, token_ids)
        for sub in subs:
            sub.sampling.structured_after_token_id = after
    check_prompt(token_ids, subs[0].sampling, "messages", backend)
    _check_sampling(subs[0].sampling, "messages", backend)
    return Job(job_id, True, subs, req.stream, backend.model_name, timing=timing,
               prompt_logprobs=req.answered_prompt_logprobs, include_usage=req.include_usage, continuous_usage=req.continuous_usage,
               tool_calling=tools, reasoning_parser=reasoning_parser, path="/v1/chat/completions")

