"""OpenAI's Responses API (`POST /v1/responses`), served through the chat completions path.

A request becomes a chat request (`to_chat_body`): `instructions` and `input` (a string, or message,
`function_call` and `function_call_output` items) become messages; `max_output_tokens`,
`temperature`, `top_p`, function `tools`, `tool_choice` and `text.format` map to their chat fields.
The chat reply becomes a `response` object (`response_object`): a `reasoning` item (with
--reasoning-parser), a `message` item with its `output_text`, and a `function_call` item per tool
call. A stream's chat chunks become the Responses events (`ResponseEvents`). Nothing is stored:
`previous_response_id` and `background` are refused with a 400, as a server without a store must.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict

from tetriinfer.server.limits import ServerLimits, parse_request
from tetriinfer.server.protocol import APIError

ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    input: Any  # a string, or a list of input items (checked in _messages, for one clear 400)
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    text: dict | None = None
    previous_response_id: str | None = None
    background: bool = False
    store: bool | None = None  # accepted; nothing is stored (the response says store: false)


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = []
        for part in content:
            if part.get("type") not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}: content part of type {part.get('type')!r} is not supported: only "
                                    "input_text / output_text parts", param=where)
            parts.append(part["text"])
        return "\n".join(parts)
    raise APIError(400, f"{where}: content must be a string or a list of input_text parts", param=where)


def _messages(req: ResponsesRequest) -> list[dict]:
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    if isinstance(req.input, str):
        return messages + [{"role": "user", "content": req.input}]
    if not isinstance(req.input, list) or not all(isinstance(item, dict) for item in req.input):
        raise APIError(400, f"input must be a string or a list of input items, got {str(req.input)[:80]}", param="input")
    for i, item in enumerate(req.input):
        where, kind = f"input.{i}", item.get("type", "message")
        if kind == "message":
            if item.get("role") not in ROLES:
                raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}", param=f"{where}.role")
            messages.append({"role": ROLES[item["role"]], "content": _text_of(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls") is not None:
                messages[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind != "reasoning":  # earlier reasoning items are context the chat template does not take
            raise APIError(400, f"{where}: input items of type {kind!r} are not supported", param=where)
    if not messages:
        raise APIError(400, "input must hold at least one message", param="input")
    return messages


def _chat_tool(tool: dict, where: str) -> dict:
    if tool.get("type") != "function":
        raise APIError(400, f"{where}: only function tools are supported, got {tool.get('type')!r}", param=where)
    return {"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters") if k in tool}}


def _chat_tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: dict | None) -> dict | None:
    fmt = (text or {}).get("format")
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "output"), "schema": fmt.get("schema"),
                                                        "strict": fmt.get("strict")}}
    return {"type": fmt.get("type")}


def to_chat_body(raw: bytes, limits: ServerLimits) -> tuple[ResponsesRequest, bytes]:
    """The request, and the chat completions body that serves it."""
    req = parse_request(raw, ResponsesRequest, limits)
    if req.previous_response_id is not None:
        raise APIError(400, "previous_response_id needs stored responses, which this server does not keep: send the "
                            "conversation as input items", param="previous_response_id")
    if req.background:
        raise APIError(400, "background responses are not supported", param="background")
    body: dict = {"messages": _messages(req), "stream": req.stream}
    if req.stream:
        body["stream_options"] = {"include_usage": True}  # the last event carries the usage
    for ours, theirs in (("model", req.model), ("max_tokens", req.max_output_tokens), ("temperature", req.temperature),
                         ("top_p", req.top_p), ("parallel_tool_calls", req.parallel_tool_calls),
                         ("response_format", _response_format(req.text))):
        if theirs is not None:
            body[ours] = theirs
    if req.tools:
        body["tools"] = [_chat_tool(t, f"tools.{i}") for i, t in enumerate(req.tools)]
    if req.tool_choice is not None:
        body["tool_choice"] = _chat_tool_choice(req.tool_choice)
    return req, json.dumps(body).encode()


def new_id(prefix: str) -> str:
    """An OpenAI-style object id: `resp_...`, `msg_...`, `rs_...`, `fc_...`."""
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict:
    return {"type": "message", "id": item_id or new_id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}


def reasoning_item(text: str, item_id: str | None = None) -> dict:
    return {"type": "reasoning", "id": item_id or new_id("rs"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def call_item(call: dict, item_id: str | None = None) -> dict:
    return {"type": "function_call", "id": item_id or new_id("fc"), "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}


def response_object(req: ResponsesRequest, response_id: str, created: int, model: str, output: list[dict],
                    finish_reason: str | None, usage: dict | None, status: str | None = None) -> dict:
    incomplete = finish_reason == "length"
    usage = usage or {}
    return {
        "id": response_id, "object": "response", "created_at": created,
        "status": status or ("incomplete" if incomplete else "completed"),
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete and status is None else None,
        "error": None, "model": model, "output": output, "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens, "temperature": req.temperature, "top_p": req.top_p,
        "tools": req.tools or [], "tool_choice": req.tool_choice or "auto",
        "parallel_tool_calls": req.parallel_tool_calls is not False, "text": req.text or {"format": {"type": "text"}},
        "store": False, "metadata": {}, "previous_response_id": None,
        "usage": None if not usage else {
            "input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"],
            "input_tokens_details": {"cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)},
            "output_tokens_details": {"reasoning_tokens": 0}},
    }


def from_chat_body(req: ResponsesRequest, chat: dict) -> dict:
    """A chat completions body (one choice) as a `response` object."""
    choice = chat["choices"][0]
    message = choice["message"]
    output = [reasoning_item(message["reasoning"])] if message.get("reasoning") is not None else []
    calls = message.get("tool_calls") or []
    if message.get("content") or not calls:
        output.append(message_item(message.get("content") or ""))
    output += [call_item(call) for call in calls]
    return response_object(req, new_id("resp"), int(time.time()), chat["model"], output, choice["finish_reason"],
                           chat.get("usage"))
