"""The OpenAI-compatible HTTP API over any `Backend` (the cluster client, or a fake in tests).

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics.
The server reads the body (limits.py: JSON only, bounded), then parses, validates and tokenizes it
in a worker thread (bad input: 4xx with an OpenAI error body, before anything reaches the backend),
then streams the backend's TokenDeltas out as one JSON body or as server-sent events. A request
whose client goes away is aborted on the backend. A request the cluster cannot take now (no prefill
instance, still starting, the controller restarting) is a 503 with Retry-After, one beyond the
backend's waiting limit a 429 with Retry-After; other backend failures are a 500. /health is a 503
while the backend is not healthy (starting, controller down or silent, a role missing).

Choices worth knowing (they differ from OpenAI in small ways):
- One prompt per request: batched prompts and n > 1 are refused with a 400.
- A stream always ends with a usage chunk (`choices: []`) before `data: [DONE]`, whether or not
  `stream_options.include_usage` asks for it.
- A chat stream's first chunk (delta role "assistant") is sent with the first output, not before,
  so a client timing its first chunk measures the real TTFT. A stream's status line waits for that
  first chunk too, so a request that fails before any output gets a plain error response (a 503 a
  client can retry) rather than a 200 and an error event.
- Chat without max_tokens / max_completion_tokens may fill the context (as vLLM does); completions
  default to 16 tokens (as OpenAI does).
- logprobs: only the chosen token's (completions: logprobs in [0, 20]; chat: logprobs=true with
  top_logprobs 0 or absent). Token texts come from decoding each token id alone.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tetriinfer.cluster.messages import TokenDelta
from tetriinfer.server import protocol
from tetriinfer.server.backend import Backend
from tetriinfer.server.limits import ServerLimits, check_prompt, parse_request, read_body
from tetriinfer.server.metrics import RequestTiming, ServerMetrics
from tetriinfer.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from tetriinfer.server.streaming import (
    BackendRun, EventStream, Job, Output, check_final, error_response, failure, sse, wait_for_disconnect,
)

logger = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class OpenAIServer:
    """Validation, the backend runs and the response shapes; create_app wires it to routes."""

    def __init__(self, backend: Backend, api_key: str | None, limits: ServerLimits):
        self.backend = backend
        self.api_key = api_key
        self.limits = limits
        self.requests_running = 0
        self.started = int(time.time())
        self.metrics = ServerMetrics(backend.cluster_stats, lambda: self.requests_running)

    # ---- checks ----------------------------------------------------------------------------------
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

    def parse(self, raw: bytes, model: type[CompletionRequest] | type[ChatCompletionRequest]):
        parsed = parse_request(raw, model, self.limits)
        if parsed.model is not None and parsed.model != self.backend.model_name:
            raise APIError(404, f"the model '{parsed.model}' does not exist; this server serves "
                                f"'{self.backend.model_name}'", param="model", code="model_not_found")
        parsed.check_supported()
        return parsed

    def _tokenizer(self):
        tokenizer = self.backend.tokenizer
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids to /v1/completions",
                           param="prompt")
        return tokenizer

    # ---- requests --------------------------------------------------------------------------------
    async def job(self, request: Request, chat: bool) -> Job:
        """Read the body here; parse, check and tokenize it in a worker thread, so a big body does
        not hold up the event loop (and the other requests' streams)."""
        timing = RequestTiming()  # arrival: before the body is read and checked
        raw = await read_body(request, self.limits)
        return await anyio.to_thread.run_sync(self.chat_job if chat else self.completion_job, raw, timing)

    def completion_job(self, raw: bytes, timing: RequestTiming) -> Job:
        req: CompletionRequest = self.parse(raw, CompletionRequest)
        max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
        sampling = req.sampling_params(max_tokens, logprobs=req.logprobs is not None)
        if isinstance(req.prompt, str):
            if req.prompt == "":
                raise APIError(400, "prompt is empty", param="prompt")
            prompt, token_ids = req.prompt, self._tokenizer().encode(req.prompt)
        else:
            prompt, token_ids = None, list(req.prompt)
        check_prompt(token_ids, sampling, "prompt", self.backend)
        return Job(f"cmpl-{uuid.uuid4().hex}", False, token_ids, prompt, sampling, req.stream,
                   self.backend.model_name, timing=timing)

    def chat_job(self, raw: bytes, timing: RequestTiming) -> Job:
        req: ChatCompletionRequest = self.parse(raw, ChatCompletionRequest)
        tokenizer = self._tokenizer()
        try:
            prompt = tokenizer.apply_chat_template(req.message_dicts(), add_generation_prompt=req.add_generation_prompt)
        except Exception as e:  # the model's own jinja template may refuse a conversation (e.g. roles)
            raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None
        token_ids = tokenizer.encode(prompt)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:  # as vLLM: the rest of the context (too little room is reported below)
            max_tokens = max(self.backend.max_model_len - len(token_ids), 1)
        sampling = req.sampling_params(max_tokens, logprobs=req.logprobs)
        check_prompt(token_ids, sampling, "messages", self.backend)
        return Job(f"chatcmpl-{uuid.uuid4().hex}", True, token_ids, prompt, sampling, req.stream,
                   self.backend.model_name, timing=timing)

    async def serve(self, request: Request, job: Job) -> Response:
        if job.stream:
            return EventStream(self._events(job))
        outcome: dict = {}

        async def work() -> None:
            try:
                async with BackendRun(self, job) as run:
                    out = Output()
                    while out.finish_reason is None:
                        delta = await run.next()
                        out.add(delta)
                    check_final(delta)
                outcome["output"] = out
            except Exception as e:  # a failed request, not a failed server: answer 5xx
                outcome["error"] = failure(job, e)
            tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(work)
            await wait_for_disconnect(request)
            tg.cancel_scope.cancel()  # client gone: cancelling `work` aborts the request

        if "output" in outcome:
            self.metrics.finished_ok(job.timing, len(job.prompt_token_ids))
            return JSONResponse(self._final_body(job, outcome["output"]))
        if "error" in outcome:
            self.metrics.count("rejected" if outcome["error"].status == 429 else "error")
            return error_response(outcome["error"])
        self.metrics.count("aborted")
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"

    # ---- response shapes -------------------------------------------------------------------------
    def _token_texts(self, token_ids: list[int]) -> list[str]:
        tokenizer = self.backend.tokenizer
        return [tokenizer.decode([t]) if tokenizer is not None else "" for t in token_ids]

    def _final_body(self, job: Job, out: Output) -> dict:
        logprobs = None
        if job.sampling.logprobs:
            texts = self._token_texts(out.token_ids)
            logprobs = (protocol.chat_logprobs(texts, out.logprobs) if job.chat
                        else protocol.completion_logprobs(texts, out.logprobs, 0))
        if job.chat:
            choice = protocol.chat_choice({"role": "assistant", "content": out.text}, out.finish_reason,
                                          logprobs, out.stop_reason)
        else:
            choice = protocol.completion_choice(out.text, out.finish_reason, logprobs, out.stop_reason)
        return protocol.response(job.request_id, "chat.completion" if job.chat else "text_completion",
                                 job.created, job.model, [choice],
                                 protocol.usage(len(job.prompt_token_ids), len(out.token_ids), out.num_cached_tokens))

    def _chunk(self, job: Job, choices: list[dict], usage: dict | None = None) -> str:
        return sse(protocol.response(job.request_id, "chat.completion.chunk" if job.chat else "text_completion",
                                      job.created, job.model, choices, usage))

    async def _events(self, job: Job):
        """The SSE body: content chunks, a finish chunk, the usage chunk, [DONE]; or an error event
        then [DONE], or only an APIError when nothing was sent yet (EventStream answers it as such).
        Leaving early (client gone) exits BackendRun, which aborts the request."""
        outcome = "aborted"
        try:
            out = Output()
            role_sent = not job.chat  # the chat role chunk goes out with the first output
            try:
                async with BackendRun(self, job) as run:
                    while out.finish_reason is None:
                        delta = await run.next()
                        text_offset = len(out.text)
                        out.add(delta)
                        if not delta.token_ids and not delta.text:
                            continue  # an ownership move only, or an empty final delta
                        if not role_sent:
                            yield self._chunk(job, [protocol.chat_choice({"role": "assistant", "content": ""},
                                                                         None, delta=True)])
                            role_sent = True
                        yield self._content_chunk(job, delta, text_offset)
                    check_final(delta)
            except Exception as e:
                error = failure(job, e)
                outcome = "rejected" if error.status == 429 else "error"
                if not (out.token_ids or out.text):  # nothing sent: a plain error response
                    yield error
                    return
                yield sse(error.body())
                yield sse("[DONE]")
                return
            if not role_sent:
                yield self._chunk(job, [protocol.chat_choice({"role": "assistant", "content": ""}, None, delta=True)])
            finish = (protocol.chat_choice({}, out.finish_reason, None, out.stop_reason, delta=True) if job.chat
                      else protocol.completion_choice("", out.finish_reason, None, out.stop_reason))
            yield self._chunk(job, [finish])
            yield self._chunk(job, [], protocol.usage(len(job.prompt_token_ids), len(out.token_ids), out.num_cached_tokens))
            yield sse("[DONE]")
            outcome = "ok"
        finally:
            if outcome == "ok":
                self.metrics.finished_ok(job.timing, len(job.prompt_token_ids))
            else:
                self.metrics.count(outcome)

    def _content_chunk(self, job: Job, delta: TokenDelta, text_offset: int) -> str:
        logprobs = None
        if job.sampling.logprobs:
            texts = self._token_texts(delta.token_ids)
            values = delta.logprobs if delta.logprobs is not None else [None] * len(delta.token_ids)
            logprobs = (protocol.chat_logprobs(texts, values) if job.chat
                        else protocol.completion_logprobs(texts, values, text_offset))
        if job.chat:
            choice = protocol.chat_choice({"content": delta.text}, None, logprobs, delta=True)
        else:
            choice = protocol.completion_choice(delta.text, None, logprobs)
        return self._chunk(job, [choice])

    # ---- other routes ----------------------------------------------------------------------------
    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.backend.model_name, "object": "model", "created": self.started, "owned_by": "tetriinfer",
                "max_model_len": self.backend.max_model_len}


def create_app(backend: Backend, *, api_key: str | None = None, limits: ServerLimits = ServerLimits()) -> FastAPI:
    """The HTTP app over `backend`. With `api_key`, every /v1 route wants 'Authorization: Bearer <key>'
    (/health and /metrics stay open). `limits`: body size, nesting and list caps (limits.py)."""
    server = OpenAIServer(backend, api_key, limits)
    app = FastAPI(title="TetriInfer", description="OpenAI-compatible API", docs_url=None, redoc_url=None)
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

    async def generation(request: Request, chat: bool) -> Response:
        try:
            server.check_auth(request)
            job = await server.job(request, chat)
        except APIError:
            server.metrics.count("rejected")
            raise
        return await server.serve(request, job)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generation(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generation(request, chat=True)

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

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            ok = backend.healthy()
        except Exception:
            logger.exception("backend.healthy() failed")
            ok = False
        return JSONResponse({"status": "ok" if ok else "unhealthy"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = server.metrics.exposition()
        return Response(body, media_type=content_type)

    return app
