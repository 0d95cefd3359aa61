"""The chat completions request body (/v1/chat/completions): its messages, as the chat template reads
them, and the checks beyond the sampling fields every generation request shares (protocol.py)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from tetriinfer.server.protocol import MAX_LOGPROBS, APIError, SamplingRequest


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: str
    content: Any = None  # str, a list of {"type": "text", "text": ...} parts, or null
    name: str | None = None
    tool_call_id: str | None = None  # a "tool" message answers this call
    tool_calls: list[dict] | None = None  # an assistant turn's calls, as the API returned them

    @field_validator("content")
    @classmethod
    def _content_text(cls, value: Any) -> str:
        """Text parts are joined with newlines (as vLLM does); other part types are refused."""
        if value is None:  # e.g. an assistant turn that only called tools
            return ""
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(p, dict) for p in value):
            for part in value:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"content part {str(part)[:80]} is not supported: only "
                                     '{"type": "text", "text": "..."} parts')
            return "\n".join(part["text"] for part in value)
        raise ValueError("message content must be a string or a list of text parts, "
                         f"got {type(value).__name__}: {str(value)[:80]}")


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True  # extension
    continue_final_message: bool = False  # vLLM's: the reply continues the last (assistant) message
    chat_template_kwargs: dict | None = None  # vLLM's: template variables, e.g. Qwen3's enable_thinking
    tools: Any = None  # checked with tool_choice in server.tool_calls
    tool_choice: Any = None  # "none", "auto", "required" or {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool | None = None  # accepted: every call the model writes is returned

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise APIError(400, "messages must be a non-empty list", param="messages")
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                               param="top_logprobs")
            if self.top_logprobs and not self.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        from tetriinfer.server.tool_calls import choice_mode  # here: that module imports this one

        choice_mode(self.tools, self.tool_choice)
        if self.add_generation_prompt and self.continue_final_message:
            raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true: "
                                "send add_generation_prompt: false to continue the last message",
                           param="continue_final_message")
        if self.continue_final_message and not self.messages[-1].content:
            raise APIError(400, "continue_final_message needs a last message with content", param="messages")
        if getattr(self, "chat_template", None) is not None:  # vLLM refuses these too, unless trusted
            raise APIError(400, "a chat_template in the request is not accepted: start the server with "
                                "--chat-template FILE", param="chat_template")

    def structured(self) -> dict:
        from tetriinfer.server.tool_calls import structured  # here: that module imports this one

        return structured(self, super().structured)

    def message_dicts(self) -> list[dict]:
        return message_dicts(self.messages)


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """The messages as a chat template reads them. A tool call's `arguments` (a JSON string on the
    wire) becomes a dict, as transformers' templates expect (vLLM does the same)."""
    out = []
    for m in messages:
        message = {"role": m.role, "content": m.content}
        message.update({k: v for k, v in (("name", m.name), ("tool_call_id", m.tool_call_id)) if v is not None})
        if m.tool_calls is not None:
            message["tool_calls"] = [_call_with_dict_arguments(call) for call in m.tool_calls]
        out.append(message)
    return out


def _call_with_dict_arguments(call: dict) -> dict:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        raise APIError(400, f"tool call arguments must be a JSON object, got {function['arguments'][:80]!r}",
                       param="messages") from None
    return {**call, "function": {**function, "arguments": arguments}}
