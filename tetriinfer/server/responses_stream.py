"""A streamed `/v1/responses` request: the chat stream's chunks (serving.events) as the Responses
API's events, in its order: `response.created`, `response.in_progress`; a reasoning item's
`response.reasoning_text.delta`s (with --reasoning-parser); the message item's
`response.output_item.added`, `response.content_part.added`, `response.output_text.delta`s and their
`.done` events; one `function_call` item per tool call (its arguments in one delta); then
`response.completed` (or `response.incomplete` at max_output_tokens) carrying the whole response.
A failure after the start is an `error` event.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator

from tetriinfer.server.responses_api import (
    ResponsesRequest, call_item, message_item, new_id, reasoning_item, response_object,
)


class _Events:
    """Builds the SSE events of one response, numbering them."""

    def __init__(self) -> None:
        self._seq = itertools.count()

    def __call__(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": next(self._seq), **fields}
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def response_events(req: ResponsesRequest, chat_events: AsyncIterator, model: str) -> AsyncIterator:
    event = _Events()
    response_id, created = new_id("resp"), int(time.time())
    output: list[dict] = []  # the finished items
    reasoning = text = None  # the open item's text so far (None: not open)
    reasoning_id, message_id = new_id("rs"), new_id("msg")
    calls: list[dict] = []
    finish = usage = None
    started = False

    def snapshot(status: str) -> dict:
        return response_object(req, response_id, created, model, list(output), None, None, status=status)

    def close_reasoning():
        output.append(reasoning_item(reasoning, reasoning_id))
        index = len(output) - 1
        return [event("response.reasoning_text.done", item_id=reasoning_id, output_index=index, content_index=0,
                      text=reasoning),
                event("response.output_item.done", output_index=index, item=output[-1])]

    async for chunk in chat_events:
        if not isinstance(chunk, str):  # refused before the stream began: the plain error response
            yield chunk
            return
        if not started:
            started = True
            yield event("response.created", response=snapshot("in_progress"))
            yield event("response.in_progress", response=snapshot("in_progress"))
        data = chunk.removeprefix("data: ").strip()
        if data == "[DONE]":
            break
        payload = json.loads(data)
        if "error" in payload:
            yield event("error", code=payload["error"].get("code"), message=payload["error"]["message"],
                        param=payload["error"].get("param"))
            return
        usage = payload.get("usage") or usage
        for choice in payload.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning"):
                if reasoning is None:
                    reasoning = ""
                    yield event("response.output_item.added", output_index=len(output),
                                item={**reasoning_item("", reasoning_id), "content": []})
                reasoning += delta["reasoning"]
                yield event("response.reasoning_text.delta", item_id=reasoning_id, output_index=len(output),
                            content_index=0, delta=delta["reasoning"])
            if delta.get("content"):
                if reasoning is not None and text is None:
                    for e in close_reasoning():
                        yield e
                if text is None:
                    text = ""
                    yield event("response.output_item.added", output_index=len(output),
                                item=message_item("", "in_progress", message_id))
                    yield event("response.content_part.added", item_id=message_id, output_index=len(output),
                                content_index=0, part={"type": "output_text", "text": "", "annotations": []})
                text += delta["content"]
                yield event("response.output_text.delta", item_id=message_id, output_index=len(output),
                            content_index=0, delta=delta["content"], logprobs=[])
            calls += delta.get("tool_calls") or []
            finish = choice.get("finish_reason") or finish
    if reasoning is not None and text is None:
        for e in close_reasoning():
            yield e
    if text is None and not calls:  # an empty reply is still a message, as the whole body shows it
        text = ""
        yield event("response.output_item.added", output_index=len(output), item=message_item("", "in_progress", message_id))
    if text is not None:
        index, item = len(output), message_item(text, "completed", message_id)
        yield event("response.output_text.done", item_id=message_id, output_index=index, content_index=0, text=text,
                    logprobs=[])
        yield event("response.content_part.done", item_id=message_id, output_index=index, content_index=0,
                    part=item["content"][0])
        output.append(item)
        yield event("response.output_item.done", output_index=index, item=item)
    for call in calls:
        item, index = call_item(call), len(output)
        yield event("response.output_item.added", output_index=index, item={**item, "arguments": "", "status": "in_progress"})
        yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                    delta=item["arguments"])
        yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                    arguments=item["arguments"])
        output.append(item)
        yield event("response.output_item.done", output_index=index, item=item)
    final = response_object(req, response_id, created, model, output, finish, usage)
    yield event("response.completed" if final["status"] == "completed" else "response.incomplete", response=final)
