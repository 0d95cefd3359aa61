"""The OpenAI-compatible HTTP API over any `Backend` (the cluster client, or a fake in tests).

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /metrics, and those outside
/v1 in utility_routes.py (/health, /ping, /tokenize, /detokenize, /version, /load, and /tokenizer_info when
enabled).
The server reads the body (limits.py: JSON only, bounded), then parses, validates and tokenizes it
in a worker thread (jobs.py; bad input: 4xx with an OpenAI error body, before anything reaches the
backend), then runs every choice on the backend and answers one JSON body or server-sent events
(serving.py, render.py). A request whose client goes away is aborted on the backend. A request the
cluster cannot take now (no prefill instance, still starting, the controller restarting) is a 503
with Retry-After, one beyond the backend's waiting limit a 429 with Retry-After; other backend
failures are a 500. /health is a 503 while the backend is not healthy.

Choices worth knowing (they differ from OpenAI in small ways):
- `n` choices and batched prompts fan out into one backend request each (choice index =
  prompt_index * n + i, as vLLM); with a seed, choice i samples with seed + i.
- A stream ends with a usage chunk (`choices: []`) only when `stream_options.include_usage` asks.
- A chat stream's first chunk (delta role "assistant") is sent with the first output, not before,
  so a client timing its first chunk measures the real TTFT. A stream's status line waits for that
  first chunk too, so a request that fails before any output gets a plain error response (a 503 a
  client can retry) rather than a 200 and an error event.
- Chat without max_tokens / max_completion_tokens may fill the context (as vLLM does); completions
  default to 16 tokens (as OpenAI does).
- logprobs: completions `logprobs: N` and chat `logprobs: true, top_logprobs: N` (N <= 20) give
  each token's logprob and its N best alternatives, of the model's raw distribution.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tetriinfer.server import protocol
from tetriinfer.server.backend import Backend
from tetriinfer.server.jobs import Job, chat_job, completion_job
from tetriinfer.server.limits import ServerLimits, read_body
from tetriinfer.server.logs import LogConfig, StatsLogger, log_request
from tetriinfer.server.metrics import RequestTiming, ServerMetrics
from tetriinfer.server.protocol import APIError
from tetriinfer.server.serving import serve
from tetriinfer.server.streaming import error_response
from tetriinfer.server.reasoning import REASONING_PARSERS
from tetriinfer.server.responses_api import ResponsesRequest, to_chat_body
from tetriinfer.server.tool_parsers import PARSERS
from tetriinfer.server.utility_routes import add_utility_routes

logger = logging.getLogger(__name__)


class OpenAIServer:
    """Auth, the job intake, the request bookkeeping (metrics, logs); create_app wires it to routes."""

    def __init__(self, backend: Backend, api_key: str | None, limits: ServerLimits, logs: LogConfig = LogConfig(),
                 tokenizer_info_endpoint: bool = False, auto_tool_parser: str | None = None,
                 reasoning_parser: str | None = None):
        self.backend = backend
        self.auto_tool_parser = auto_tool_parser  # tool_choice "auto" reads calls with it (None: a 400)
        self.reasoning_parser = reasoning_parser  # chat replies' <think> part goes to `reasoning` (reasoning.py)
        self.tokenizer_info_endpoint = tokenizer_info_endpoint  # GET /tokenizer_info exists
        self.api_key = api_key
        self.limits = limits
        self.logs = logs
        self.requests_running = 0  # backend requests (choices) in flight
        self.started = int(time.time())
        self.metrics = ServerMetrics(backend.cluster_stats, lambda: self.requests_running, backend.model_name)
        self.stats = StatsLogger(backend.cluster_stats, lambda: self.requests_running, logs.stats_interval_s)

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    async def job(self, request: Request, chat: bool) -> Job:
        """Read the body here; parse, check and tokenize it in a worker thread, so a big body does
        not hold up the event loop (and the other requests' streams)."""
        timing = RequestTiming()  # arrival: before the body is read and checked
        raw = await read_body(request, self.limits)
        if chat:
            return await anyio.to_thread.run_sync(chat_job, raw, timing, self.backend, self.limits,
                                                  self.auto_tool_parser, self.reasoning_parser)
        return await anyio.to_thread.run_sync(completion_job, raw, timing, self.backend, self.limits)

    async def responses_job(self, request: Request) -> tuple[ResponsesRequest, Job]:
        """A /v1/responses request, and the chat job that serves it (responses_api.py)."""
        timing = RequestTiming()
        raw = await read_body(request, self.limits)

        def make() -> tuple[ResponsesRequest, Job]:
            req, chat_raw = to_chat_body(raw, self.limits)
            job = chat_job(chat_raw, timing, self.backend, self.limits, self.auto_tool_parser, self.reasoning_parser)
            job.path = "/v1/responses"
            return req, job

        return await anyio.to_thread.run_sync(make)

    def finished(self, job: Job, outcome: str, status: int, completion_tokens: int) -> None:
        """A generation request is over: its metrics, the stats counters and its access line."""
        if outcome == "ok":
            self.metrics.finished_ok(job.timing, job.prompt_tokens)
        else:
            self.metrics.count(outcome)
        self.stats.on_finished(job.prompt_tokens if outcome == "ok" else 0, completion_tokens)
        if self.logs.log_requests:
            log_request(job, outcome, status, completion_tokens)

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.backend.model_name, "object": "model", "created": self.started, "owned_by": "tetriinfer",
                "max_model_len": self.backend.max_model_len}


def create_app(backend: Backend, *, api_key: str | None = None, limits: ServerLimits = ServerLimits(),
               logs: LogConfig = LogConfig(), enable_tokenizer_info_endpoint: bool = False,
               enable_auto_tool_choice: bool = False, tool_call_parser: str | None = None,
               reasoning_parser: str | None = None) -> FastAPI:
    """The HTTP app over `backend`. With `api_key`, every /v1 route wants 'Authorization: Bearer <key>'
    (/health and /metrics stay open). `limits`: body size, nesting and list caps (limits.py). `logs`:
    the access line per request and the periodic stats line (logs.py). `enable_tokenizer_info_endpoint`:
    serve GET /tokenizer_info (vLLM's, off by default as there), from the backend's tokenizer.
    `enable_auto_tool_choice` with `tool_call_parser` (tool_parsers.PARSERS): tool_choice "auto" works
    (vLLM's flags; without them it is a 400). `reasoning_parser` (reasoning.REASONING_PARSERS): a chat
    reply's thinking goes to the message's `reasoning` field (vLLM's --reasoning-parser)."""
    if enable_auto_tool_choice and tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    if tool_call_parser is not None and tool_call_parser not in PARSERS:
        raise ValueError(f"unknown --tool-call-parser {tool_call_parser!r}: one of {', '.join(PARSERS)}")
    if reasoning_parser is not None and reasoning_parser not in REASONING_PARSERS:
        raise ValueError(f"unknown --reasoning-parser {reasoning_parser!r}: one of {', '.join(REASONING_PARSERS)}")
    server = OpenAIServer(backend, api_key, limits, logs, enable_tokenizer_info_endpoint,
                          tool_call_parser if enable_auto_tool_choice else None, reasoning_parser)
    server_logger = logging.getLogger("tetriinfer.server")
    if (logs.log_requests or logs.log_stats) and server_logger.level == logging.NOTSET:
        server_logger.setLevel(logging.INFO)  # printed by default (as vLLM's), whatever the root level

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.ensure_future(server.stats.run()) if logs.log_stats else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()

    app = FastAPI(title="TetriInfer", description="OpenAI-compatible API", docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{}])[0]
        path = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(protocol.error_body(f"invalid value for '{path}': {first.get('msg')}", param=path or None),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(protocol.error_body(str(exc.detail), "invalid_request_error" if exc.status_code < 500
                                                else "server_error"),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def generation(request: Request, chat: bool, responses: bool = False) -> Response:
        try:
            server.check_auth(request)
            if responses:
                req, job = await server.responses_job(request)
            else:
                req, job = None, await server.job(request, chat)
        except APIError as e:
            server.metrics.count("rejected")
            if logs.log_requests:
                logger.info("POST %s %d rejected: %s", request.url.path, e.status, e.message[:200])
            raise
        return await serve(server, request, job, responses=req)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generation(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generation(request, chat=True)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await generation(request, chat=True, responses=True)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        server.check_auth(request)
        return server.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> dict:
        server.check_auth(request)
        if model_id != backend.model_name:
            raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
        return server.model_card()

    add_utility_routes(app, server)  # /health, /ping, /tokenize, /detokenize, /version, /load, /tokenizer_info

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = server.metrics.exposition()
        return Response(body, media_type=content_type)

    return app
