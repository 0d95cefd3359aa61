"""The routes outside /v1: GET /health, and those vLLM users script against: POST /tokenize and
/detokenize, GET /version, GET|POST /ping (SageMaker's health check), GET /load, and, with
`--enable-tokenizer-info-endpoint` (off by default, as in vLLM), GET /tokenizer_info.

As in vLLM they sit outside /v1, so the API key does not guard them. /tokenize counts a prompt the
way a generation request would: a completion prompt encoded as /v1/completions encodes it, or chat
`messages` through the model's chat template as /v1/chat/completions does. /tokenizer_info is vLLM's
`TokenizerInfoResponse`: the tokenizer's configuration (the model's tokenizer_config.json, file paths
left out, added tokens as their text) with `tokenizer_class`, the special tokens' text and the chat
template the server applies; lm-eval's `tokenizer_backend=remote` (and `auto`) reads it. Bad input
is a 400 with an OpenAI-style error body; a model without a tokenizer gets the 400 /tokenize gets.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt

from tetriinfer import __version__
from tetriinfer.model.tokenizer import SIMPLE_CHAT_TEMPLATE, ByteTokenizer
from tetriinfer.server.jobs import chat_prompt, parse, require_tokenizer
from tetriinfer.server.limits import read_body
from tetriinfer.server.chat_request import ChatMessage, message_dicts
from tetriinfer.server.protocol import APIError
from tetriinfer.server.vllm_metrics import requests_running_and_waiting

logger = logging.getLogger(__name__)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict | None = None
    add_special_tokens: StrictBool = True  # completion prompts only: the chat template has its own
    return_token_strs: StrictBool = False

    def check_supported(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if self.messages is not None and not self.messages:
            raise APIError(400, "messages must be a non-empty list", param="messages")
        if self.add_generation_prompt and self.continue_final_message:
            raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true",
                           param="continue_final_message")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    tokens: list[StrictInt]

    def check_supported(self) -> None:
        pass


def tokenize(raw: bytes, backend, limits) -> dict:
    req: TokenizeRequest = parse(raw, TokenizeRequest, backend, limits)
    tokenizer = require_tokenizer(backend)
    if req.messages is not None:
        text = chat_prompt(tokenizer, message_dicts(req.messages), add_generation_prompt=req.add_generation_prompt,
                           continue_final_message=req.continue_final_message, template_kwargs=req.chat_template_kwargs)
        tokens = tokenizer.encode(text)
    else:
        tokens = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    out = {"count": len(tokens), "max_model_len": backend.max_model_len, "tokens": tokens}
    if req.return_token_strs:
        out["token_strs"] = [tokenizer.decode([t]) for t in tokens]
    return out


def detokenize(raw: bytes, backend, limits) -> dict:
    req: DetokenizeRequest = parse(raw, DetokenizeRequest, backend, limits)
    bad = next((t for t in req.tokens if not 0 <= t < backend.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {backend.vocab_size})", param="tokens")
    return {"prompt": require_tokenizer(backend).decode(req.tokens)}


# vLLM leaves these out of /tokenizer_info: paths on the server's disk
_TOKENIZER_FILE_KEYS = ("vocab_file", "merges_file")
# The byte tokenizer's special tokens (ids 256, 257, 258): names only, their text does not encode to them
_BYTE_SPECIAL_TOKENS = {256: "<bos>", 257: "<eos>", 258: "<pad>"}
# The keys of a Hugging Face AddedToken as tokenizer_config.json stores it
_ADDED_TOKEN_KEYS = {"content", "lstrip", "rstrip", "normalized", "single_word", "special", "__type"}


def _plain(value: Any) -> Any:
    """vLLM's JSON form of a tokenizer setting: an added token is its text."""
    if isinstance(value, dict):
        if "content" in value and set(value) <= _ADDED_TOKEN_KEYS:
            return value["content"]
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def tokenizer_info(backend) -> dict:
    """vLLM's TokenizerInfoResponse: the tokenizer's configuration (the model's tokenizer_config.json,
    as the tokenizer read it) and `tokenizer_class`, with the special tokens' text and the chat
    template filled in from the tokenizer the server uses where the file lacks them."""
    tokenizer = require_tokenizer(backend)
    info = {k: _plain(v) for k, v in tokenizer.config.items() if k not in _TOKENIZER_FILE_KEYS}
    if not isinstance(info.get("tokenizer_class"), str):
        info["tokenizer_class"] = type(tokenizer).__name__
    byte = isinstance(tokenizer, ByteTokenizer)
    specials = [("bos_token", tokenizer.bos_token_id), ("eos_token", tokenizer.eos_token_id)]
    if byte:
        specials.append(("pad_token", 258 if backend.vocab_size > 258 else None))
        info.setdefault("model_max_length", backend.max_model_len)
    for name, token_id in specials:
        if not isinstance(info.get(name), str) and token_id is not None:
            text = _BYTE_SPECIAL_TOKENS.get(token_id, "") if byte else tokenizer.special_token_text(token_id)
            if text:
                info[name] = text
    # the template /v1/chat/completions applies (a named-template list in the file: its default one)
    info["chat_template"] = tokenizer.chat_template or SIMPLE_CHAT_TEMPLATE
    return info


def add_utility_routes(app: FastAPI, server) -> None:
    """`server`: the app's `ApiServer` (its backend, limits and requests in flight)."""
    backend, limits = server.backend, server.limits

    async def _run(request: Request, handler) -> dict:
        raw = await read_body(request, limits)
        return await anyio.to_thread.run_sync(handler, raw, backend, limits)  # tokenizing is CPU work

    @app.post("/tokenize")
    async def _tokenize(request: Request) -> dict:
        return await _run(request, tokenize)

    @app.post("/detokenize")
    async def _detokenize(request: Request) -> dict:
        return await _run(request, detokenize)

    if server.tokenizer_info_endpoint:  # as vLLM: the route exists only when asked for
        @app.get("/tokenizer_info")
        async def _tokenizer_info() -> dict:
            return tokenizer_info(backend)

    @app.get("/version")
    async def _version() -> dict:
        return {"version": __version__}

    @app.get("/health")
    async def _health() -> JSONResponse:
        return health_response(backend)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def _ping() -> JSONResponse:  # SageMaker's name for /health
        return health_response(backend)

    @app.get("/load")
    async def _load() -> dict:
        """vLLM's `server_load` (requests in flight in this API process), and the cluster's queues."""
        running, waiting = requests_running_and_waiting(backend.cluster_stats())
        return {"server_load": server.requests_running, "num_requests_running": running,
                "num_requests_waiting": waiting}


def health_response(backend) -> JSONResponse:
    """200 while the backend is healthy, else 503; a broken health check reads as unhealthy."""
    try:
        ok = bool(backend.healthy())
    except Exception:
        logger.exception("backend.healthy() failed")
        ok = False
    return JSONResponse({"status": "ok" if ok else "unhealthy"}, status_code=200 if ok else 503)
