"""The routes outside /v1: GET /health, and those vLLM users script against: POST /tokenize and
/detokenize, GET /version, GET|POST /ping (SageMaker's health check) and GET /load.

As in vLLM they sit outside /v1, so the API key does not guard them. /tokenize counts a prompt the
way a generation request would: a completion prompt encoded as /v1/completions encodes it, or chat
`messages` through the model's chat template as /v1/chat/completions does. Bad input is a 400 with
an OpenAI-style error body.
"""

from __future__ import annotations

import logging

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt

from tetriinfer import __version__
from tetriinfer.server.jobs import parse, require_tokenizer
from tetriinfer.server.limits import read_body
from tetriinfer.server.protocol import APIError, ChatMessage
from tetriinfer.server.vllm_metrics import requests_running_and_waiting

logger = logging.getLogger(__name__)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = True  # completion prompts only: the chat template has its own
    return_token_strs: StrictBool = False

    def check_supported(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if self.messages is not None and not self.messages:
            raise APIError(400, "messages must be a non-empty list", param="messages")


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
        try:
            text = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in req.messages],
                                                 add_generation_prompt=req.add_generation_prompt)
        except Exception as e:  # the model's own template may refuse a conversation
            raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None
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
