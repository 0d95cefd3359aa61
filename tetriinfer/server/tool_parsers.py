"""Tool-call parsers for `tool_choice: "auto"` (vLLM's `--tool-call-parser NAME`): each reads a
model's whole output and splits it into content and calls, and says how much of a partial output a
stream may send as content before a call could be starting.

A parser returns (content, calls) where calls are (name, arguments as a JSON string); output it
cannot read is all content with no calls, as in vLLM.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
import string

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


class MistralParser:
    """Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (tokenizers before v11) or
    `[TOOL_CALLS]name[ARGS]{...}`, once per call (v11 on); the text before the first marker is the
    content. `[TOOL_CALLS]` is a special token, so its requests keep special tokens in their text (as
    vLLM's parser asks), and call ids are 9 letters and digits: Mistral's chat template refuses
    others when the calls come back in the next turn."""

    START, ARGS = "[TOOL_CALLS]", "[ARGS]"
    keeps_special_tokens = True

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        if self.START not in text:
            return text, []
        decoder, calls = json.JSONDecoder(), []
        try:
            for piece in text.split(self.START)[1:]:
                piece = piece.strip()
                if self.ARGS in piece:
                    name, arguments = piece.split(self.ARGS, 1)
                    calls.append(_call({"name": name.strip(), "arguments": decoder.raw_decode(arguments.strip())[0]}))
                else:
                    obj = decoder.raw_decode(piece)[0]
                    calls.extend(_call(item) for item in (obj if isinstance(obj, list) else [obj]))
        except ValueError:
            return text, []
        return (text[:text.index(self.START)] or None, calls) if calls else (text, [])

    def streamable(self, text: str) -> int:
        if self.START in text:
            return text.index(self.START)
        return len(text) - partial_suffix(text, self.START)

    @staticmethod
    def call_id() -> str:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


class PythonicParser:
    """Llama 3.2 / Llama 4 "pythonic" calls: the output is a Python list of calls with literal
    keyword arguments, `[get_weather(city="Paris"), get_time()]`, maybe between Llama 4's
    `<|python_start|>` and `<|python_end|>`. Read with `ast` (never evaluated). A stream holds an
    output that starts like a list until it ends."""

    START, END = "<|python_start|>", "<|python_end|>"

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip().removeprefix(self.START).removesuffix(self.END).strip()
        if not body.startswith("["):
            return text, []
        try:
            tree = ast.parse(body, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return text, []
            calls = []
            for call in tree.elts:
                if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and not call.args
                        and all(k.arg is not None for k in call.keywords)):
                    return text, []
                arguments = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
                calls.append(_call({"name": call.func.id, "arguments": arguments}))
        except (SyntaxError, ValueError, TypeError, RecursionError):
            return text, []
        return None, calls

    def streamable(self, text: str) -> int:
        body = text.lstrip()
        if not body or body.startswith("[") or self.START.startswith(body[:len(self.START)]):
            return 0
        return len(text)


PARSERS = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser,
           "pythonic": PythonicParser}
