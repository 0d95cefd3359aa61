"""Serving one validated job: every choice on the backend (streaming.run_choices), answered as one
JSON body or as server-sent events.

The stream: per choice, (chat: a role chunk with its first output,) (completions with echo: the
prompt,) content chunks, a finish chunk; then, only when `stream_options.include_usage` asks (as
OpenAI and vLLM do), a usage chunk whose `choices` is empty; then `data: [DONE]`. With
`continuous_usage_stats` every chunk also carries the usage so far. A failure after the first chunk
is an error event then [DONE]; before it, a plain error response (EventStream).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tetriinfer.server.chat_deltas import ChatDeltas
from tetriinfer.server.jobs import Job
from tetriinfer.server.render import Renderer
from tetriinfer.server.responses_api import ResponsesRequest, from_chat_body
from tetriinfer.server.responses_stream import response_events
from tetriinfer.server.streaming import EventStream, Output, error_response, failure, run_choices, sse, wait_for_disconnect

if TYPE_CHECKING:
    from tetriinfer.server.app import OpenAIServer


async def serve(server: "OpenAIServer", request: Request, job: Job, responses: ResponsesRequest | None = None) -> Response:
    """`responses`: a /v1/responses request served as this chat job, answered in its own shape."""
    if job.stream:
        stream = events(server, job)
        return EventStream(stream if responses is None else response_events(responses, stream, job.model))
    outcome: dict = {}

    async def work() -> None:
        outputs = {sub.index: Output() for sub in job.subs}
        try:
            async with contextlib.aclosing(run_choices(server, job)) as deltas:
                async for index, delta in deltas:
                    outputs[index].add(delta)
            outcome["outputs"] = outputs
        except Exception as e:  # a failed request, not a failed server: answer 5xx
            outcome["error"] = failure(job, e)
        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(work)
        await wait_for_disconnect(request)
        tg.cancel_scope.cancel()  # client gone: cancelling `work` aborts every choice

    if "outputs" in outcome:
        renderer = Renderer(job, server.backend.tokenizer)
        body = renderer.body(outcome["outputs"])
        server.finished(job, "ok", 200, body["usage"]["completion_tokens"])
        return JSONResponse(body if responses is None else from_chat_body(responses, body))
    if "error" in outcome:
        error = outcome["error"]
        server.finished(job, "rejected" if error.status == 429 else "error", error.status, 0)
        return error_response(error)
    server.finished(job, "aborted", 499, 0)
    return Response(status_code=499)  # nobody is listening; nginx's "client closed request"


async def events(server: "OpenAIServer", job: Job):
    """The SSE body (see the module's docstring). Leaving early (client gone) closes run_choices,
    which aborts every choice still running."""
    outcome, status = "aborted", 499
    render = Renderer(job, server.backend.tokenizer)
    outputs = {sub.index: Output() for sub in job.subs}
    subs = {sub.index: sub for sub in job.subs}
    started: set[int] = set()  # choices whose first chunk went out
    # Chat with a reasoning parser or tool calling: each choice's text is parsed as it streams.
    parsed = ({i: ChatDeltas(job.reasoning_parser, job.tool_calling) for i in subs}
              if job.chat and (job.reasoning_parser or job.tool_calling) else None)
    sent_any = False

    def usage() -> dict:
        return render.usage(render.completion_tokens(outputs), render.cached_tokens(outputs))

    def chunk(choice: dict) -> str:
        return render.chunk([choice], usage() if job.continuous_usage else None)

    try:
        try:
            async with contextlib.aclosing(run_choices(server, job)) as deltas:
                async for index, delta in deltas:
                    out, sub = outputs[index], subs[index]
                    text_offset = len(out.text)
                    out.add(delta)
                    has_output = bool(delta.token_ids or delta.text)
                    if index not in started and (has_output or delta.finish_reason is not None):
                        started.add(index)
                        sent_any = True
                        if job.chat:
                            yield chunk(render.role_choice(index))
                        elif job.echo:
                            yield chunk(render.echo_choice(sub, out))
                    if has_output and not job.prompt_only:
                        for choice in ([render.content_choice(sub, delta, text_offset)] if parsed is None
                                       else render.parsed_delta_choices(sub, delta, parsed[index])):
                            yield chunk(choice)
                    if delta.finish_reason is not None:
                        for choice in ([render.finish_choice(sub, out)] if parsed is None
                                       else render.parsed_finish_choices(sub, out, parsed[index])):
                            yield chunk(choice)
        except Exception as e:
            error = failure(job, e)
            outcome, status = ("rejected" if error.status == 429 else "error"), error.status
            if not sent_any:  # nothing sent: a plain error response
                yield error
                return
            yield sse(error.body())
            yield sse("[DONE]")
            return
        if job.include_usage:
            yield render.chunk([], usage())
        yield sse("[DONE]")
        outcome, status = "ok", 200
    finally:
        server.finished(job, outcome, status, render.completion_tokens(outputs))

