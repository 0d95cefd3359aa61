"""One chat choice's text, parsed as it streams: its thinking split off by the reasoning parser
(reasoning.py), and what may be a tool call held back for the tool parser (tool_calls.py).

`add` says what may go out now, `finish` what is left at the end (and the calls, read whole), so a
stream and the whole body (`read_message`) show the same reasoning, content and calls.
"""

from __future__ import annotations

from tetriinfer.server.reasoning import ReasoningSplitter, split_reasoning
from tetriinfer.server.tool_calls import ToolCalling


def reasoning_fields(reasoning: str) -> dict:
    """vLLM's field, and its older name (`reasoning_content`), which clients still read."""
    return {"reasoning": reasoning, "reasoning_content": reasoning}


def read_message(text: str, finish_reason: str | None, reasoning_parser: str | None,
                 tools: ToolCalling | None) -> tuple[dict, str | None]:
    """A whole chat reply as the message's fields (content, reasoning, tool_calls) and its finish reason."""
    message: dict = {}
    if reasoning_parser is not None:
        reasoning, text = split_reasoning(reasoning_parser, text)
        if reasoning is not None:
            message.update(reasoning_fields(reasoning))
    if tools is None:
        message["content"] = text if text or "reasoning" not in message else None
        return message, finish_reason
    message["content"], message["tool_calls"], finish_reason = tools.read(text, finish_reason)
    return message, finish_reason


class ChatDeltas:
    def __init__(self, reasoning_parser: str | None, tools: ToolCalling | None) -> None:
        self.splitter = ReasoningSplitter(reasoning_parser) if reasoning_parser is not None else None
        self.tools = tools
        self.content = ""  # the reply's content so far (its text less the reasoning)
        self.sent = 0  # how much of `content` went out

    def add(self, text: str) -> dict:
        """The delta's fields that may go out now that `text` has come ({}: nothing yet)."""
        reasoning, content = self.splitter.feed(text) if self.splitter is not None else ("", text)
        self.content += content
        upto = len(self.content) if self.tools is None else max(self.sent, self.tools.streamable(self.content))
        fields = reasoning_fields(reasoning) if reasoning else {}
        if upto > self.sent:
            fields["content"] = self.content[self.sent:upto]
        self.sent = upto
        return fields

    def finish(self, finish_reason: str | None) -> tuple[dict, str | None]:
        """The last delta's fields (what was held back, or the calls whole) and the finish reason."""
        reasoning, content = self.splitter.finish() if self.splitter is not None else ("", "")
        self.content += content
        fields = reasoning_fields(reasoning) if reasoning else {}
        calls = []
        if self.tools is not None:
            _, calls, finish_reason = self.tools.read(self.content, finish_reason)
        if calls:
            fields["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
        elif self.content[self.sent:]:
            fields["content"] = self.content[self.sent:]
        self.sent = len(self.content)
        return fields, finish_reason
