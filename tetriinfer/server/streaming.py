"""A job's runs on the backend, and how their outcome goes out: the summed Output per choice, the
BackendRun context manager that aborts a request left early, `run_choices` that runs every choice of
a job at once and merges their deltas (a failure or an early exit aborts them all), the
server-sent-event response, and the error a failed run answers (503 + Retry-After when the cluster
cannot take it now, else 500).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tetriinfer.cluster.messages import TokenDelta
from tetriinfer.server.backend import Overloaded, is_unavailable
from tetriinfer.server.jobs import Job, SubRequest
from tetriinfer.server.protocol import APIError

if TYPE_CHECKING:
    from tetriinfer.server.app import OpenAIServer

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # on a 503 (the cluster is starting or has no prefill instance right now) or a 429


@dataclass
class Output:
    """What a request produced so far, summed over its deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # logprobs=N > 0
    prompt_logprobs: list[float | None] | None = None  # echo + logprobs, or vLLM's prompt_logprobs
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_ranks: list[int | None] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served

    def add(self, delta: TokenDelta) -> None:
        if delta.num_cached_tokens is not None:
            self.num_cached_tokens = delta.num_cached_tokens
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_top_logprobs = delta.prompt_logprobs, delta.prompt_top_logprobs
            self.prompt_ranks = delta.prompt_ranks
        if delta.top_logprobs is not None:
            self.top_logprobs.extend(delta.top_logprobs)
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs if delta.logprobs is not None else [None] * len(delta.token_ids))
        self.finish_reason = delta.finish_reason
        self.stop_reason = delta.stop_reason


class BackendFailure(Exception):
    """The backend ended a request with an error (or an abort we did not ask for)."""


def check_final(delta: TokenDelta) -> None:
    if delta.finish_reason == "error":
        raise BackendFailure(delta.error or "the backend failed the request")
    if delta.finish_reason == "abort":
        raise BackendFailure("request aborted")


def failure(job: Job, e: BaseException) -> APIError:
    """A failed request's answer: 429 + Retry-After when too many wait, 503 + Retry-After when the
    cluster cannot take it now, else 500."""
    if isinstance(e, Overloaded):
        return APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if not isinstance(e, BackendFailure):
        logger.exception("request %s failed", job.request_id)
    message = str(e) or type(e).__name__
    if isinstance(e, BackendFailure) and is_unavailable(message):
        return APIError(503, message, code="service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
    return APIError(500, message)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class BackendRun:
    """One request on the backend, as an async context manager. Leaving it before the final delta
    (client gone, cancellation, a failure) closes the backend's iterator and aborts the request."""

    def __init__(self, server: "OpenAIServer", job: Job, sub: SubRequest):
        self.server = server
        self.job = job
        self.sub = sub
        self.finished = False
        self._iter = None

    async def __aenter__(self) -> "BackendRun":
        sub = self.sub
        self._iter = self.server.backend.generate(sub.request_id, sub.prompt_token_ids, sub.sampling, sub.prompt)
        self.server.requests_running += 1
        return self

    async def next(self) -> TokenDelta:
        try:
            delta = await anext(self._iter)
        except StopAsyncIteration:
            raise BackendFailure("the backend ended the request without a finish_reason") from None
        self.job.timing.on_delta(len(delta.token_ids))
        if delta.finish_reason is not None:
            self.finished = True
        return delta

    async def __aexit__(self, *exc) -> None:
        self.server.requests_running -= 1
        # The cleanup runs in its own task and is awaited to its end: the anyio shield keeps a
        # cancelled scope (client gone) from cancelling each await again, and the loop outlasts a
        # plain task.cancel(), which run_choices sends every choice when one fails, possibly while
        # this one is already aborting (a lost abort leaves the request running on the backend).
        cleanup = asyncio.ensure_future(self._close_and_abort())
        cancelled = False
        with anyio.CancelScope(shield=True):
            while not cleanup.done():
                try:
                    await asyncio.shield(cleanup)
                except asyncio.CancelledError:
                    cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    async def _close_and_abort(self) -> None:
        aclose = getattr(self._iter, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:
                logger.exception("closing the backend stream of %s failed", self.sub.request_id)
        if not self.finished:
            try:
                await self.server.backend.abort(self.sub.request_id)
            except Exception:
                logger.exception("aborting %s on the backend failed", self.sub.request_id)


async def run_choices(server: "OpenAIServer", job: Job) -> AsyncIterator[tuple[int, TokenDelta]]:
    """Every choice of `job` on the backend at once: yields (choice index, delta) as they come, until
    each has its final delta. A choice that fails raises here (BackendFailure or the backend's
    exception); then, or when the caller leaves early, the choices still running are aborted. Each
    choice runs in its own task (which owns its BackendRun), so their cleanup never runs inside
    this generator's frame."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(sub: SubRequest) -> None:
        try:
            async with BackendRun(server, job, sub) as run:
                while True:
                    delta = await run.next()
                    queue.put_nowait((sub.index, delta, None))
                    if delta.finish_reason is not None:
                        return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which answers it
            queue.put_nowait((sub.index, None, e))

    tasks = [asyncio.ensure_future(pump(sub)) for sub in job.subs]
    try:
        remaining = len(tasks)
        while remaining:
            index, delta, error = await queue.get()
            if error is not None:
                raise error
            if delta.finish_reason is not None:
                check_final(delta)
                remaining -= 1
            yield index, delta
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):  # the aborts must go out even if we are being cancelled
            await asyncio.gather(*tasks, return_exceptions=True)


class EventStream(StreamingResponse):
    """Server-sent events whose body generator is cancelled as soon as the client disconnects,
    whatever ASGI spec version the server speaks (Starlette listens for disconnects only below
    2.4), and is always closed, so the request's cleanup (the abort) runs. The status line goes out
    with the first event; a generator whose first item is an APIError gets that error's plain JSON
    response instead of a stream."""

    def __init__(self, content):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_response(self, send) -> None:
        chunk = await anext(self.body_iterator, None)
        if isinstance(chunk, APIError):
            error = error_response(chunk)
            await send({"type": "http.response.start", "status": error.status_code, "headers": error.raw_headers})
            await send({"type": "http.response.body", "body": error.body})
            return
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        while chunk is not None:
            await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            chunk = await anext(self.body_iterator, None)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client left while we wrote
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
