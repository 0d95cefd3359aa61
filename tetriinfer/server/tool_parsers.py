"""Tool-call parsers for `tool_choice: "auto"` (vLLM's `--tool-call-parser NAME`): each reads a
model's whole output and splits it into content and calls, and says how much of a partial output a
stream may send as content before a call could be starting.

A parser returns (content, calls) where calls are (name, arguments as a JSON string); output it
cannot read is all content with no calls, as in vLLM.
"""

from __future__ import annotations

import json
import re

from tetriinfer.server.reasoning import partial_suffix

ParsedCall = tuple[str, str]  # (function name, arguments: a JSON object's text)


def _call(obj) -> ParsedCall:
    """One {"name": ..., "arguments"|"parameters": {...}} object; anything else raises ValueError."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError(f"not a tool call: {obj!r}")
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments already encoded
        arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call arguments are not an object: {arguments!r}")
    return obj["name"], json.dumps(arguments, ensure_ascii=False)


class HermesParser:
    """Hermes 2 Pro / Qwen2.5: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, maybe
    several; the text before the first one is the content. A last call cut short of its closing tag
    is still read (vLLM's parser does the same)."""

    START, END = "<tool_call>", "</tool_call>"
    _CALLS = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        if self.START not in text:
            return text, []
        try:
            calls = [_call(json.loads(closed or open_)) for closed, open_ in self._CALLS.findall(text)]
        except ValueError:  # json's errors are ValueErrors too
            return text, []
        return text[:text.index(self.START)] or None, calls

    def streamable(self, text: str) -> int:
        """Up to where `text` is surely content: before a `<tool_call>`, or before a tail that may
        still become one."""
        if self.START in text:
            return text.index(self.START)
        return len(text) - partial_suffix(text, self.START)


class Llama3JsonParser:
    """Llama 3.1/3.2 JSON tool calls: the whole output is `{"name": ..., "parameters": {...}}` (or
    "arguments"), several separated by `;`, maybe after `<|python_tag|>`. A stream holds it all: it
    is one call or plain text only once it ends."""

    PYTHON_TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        rest = text.strip()
        rest = rest[len(self.PYTHON_TAG):].lstrip() if rest.startswith(self.PYTHON_TAG) else rest
        if not rest.startswith("{"):
            return text, []
        decoder, calls, at = json.JSONDecoder(), [], 0
        try:
            while at < len(rest):
                obj, end = decoder.raw_decode(rest, at)
                calls.append(_call(obj))
                at = end
                while at < len(rest) and rest[at] in "; \t\r\n":  # the separator between calls
                    at += 1
        except ValueError:
            return text, []
        return None, calls

    def streamable(self, text: str) -> int:
        return 0


PARSERS = {"hermes": HermesParser, "llama3_json": Llama3JsonParser}
