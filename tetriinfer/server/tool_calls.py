"""Tool calling on /v1/chat/completions, as vLLM does it: the request's `tools` and `tool_choice`
checked (a 400 naming the field), the output constraint a named or "required" choice puts on the
output (the structured-output path, as a json_schema), and each choice's output read back as
`tool_calls`.

- "none": plain text (the tools still reach the chat template, as in vLLM).
- a named function: the output is that function's arguments (its parameters schema).
- "required": the output is a JSON array of {"name", "parameters"}, one item per call.
- "auto" (the default with tools): needs the server's --enable-auto-tool-choice and
  --tool-call-parser; the parser (tool_parsers.py) finds the calls in free text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from tetriinfer.server.protocol import APIError, check_or_400
from tetriinfer.server.tool_parsers import PARSERS

AUTO_NEEDS_FLAGS = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def check_tools(tools: Any) -> None:
    """Each tool is {"type": "function", "function": {"name", "description"?, "parameters"?}}."""
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list of {'type': 'function', 'function': {...}}", param="tools")
    names = set()
    for i, tool in enumerate(tools):
        param = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise APIError(400, f"{param} must be {{'type': 'function', 'function': {{...}}}}", param=param)
        function = tool.get("function")
        if not isinstance(function, dict):
            raise APIError(400, f"{param}.function must be an object with a name", param=f"{param}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, f"{param}.function.name must be a non-empty string", param=f"{param}.function.name")
        if name in names:
            raise APIError(400, f"{param}.function.name {name!r} is given twice", param=f"{param}.function.name")
        names.add(name)
        if not isinstance(function.get("description", ""), (str, type(None))):
            raise APIError(400, f"{param}.function.description must be a string",
                           param=f"{param}.function.description")
        if not isinstance(function.get("parameters", {}), (dict, type(None))):
            raise APIError(400, f"{param}.function.parameters must be a JSON schema object",
                           param=f"{param}.function.parameters")


def choice_mode(tools: Any, tool_choice: Any) -> str | None:
    """The checked tools and tool_choice: None (no tools), "none", "auto", "required", or the named
    function as "function:NAME"."""
    if tools is not None:
        check_tools(tools)
    if tool_choice is None:
        return "auto" if tools else None
    if tools is None and tool_choice != "none":
        raise APIError(400, "tool_choice needs tools: give the functions the model may call", param="tool_choice")
    if tool_choice in ("none", "auto", "required"):
        return tool_choice if tools or tool_choice == "none" else "none"  # no tools to require: as OpenAI
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not (isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function"
            and isinstance(name, str)):
        raise APIError(400, 'tool_choice must be "none", "auto", "required" or '
                            '{"type": "function", "function": {"name": "..."}}', param="tool_choice")
    if name not in {t["function"]["name"] for t in tools}:
        raise APIError(400, f"tool_choice names the function {name!r}, which is not in tools", param="tool_choice")
    return f"function:{name}"


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or EMPTY_PARAMETERS


DEFINITION_KEYS = ("$defs", "definitions")  # where a schema keeps what its "#/$defs/..." refs name


def _hoisted_parameters(tools: list) -> tuple[list[dict], dict]:
    """Each tool's parameters without its definitions, and all definitions merged for the root.
    Under "required" the parameters sit inside an array's items, where a ref like "#/$defs/Unit"
    (pydantic writes them) would no longer resolve: its definitions must live at the new root."""
    parameters, definitions = [], {}
    for tool in tools:
        schema = dict(_parameters(tool))
        for key in DEFINITION_KEYS:
            for def_name, body in (schema.pop(key, None) or {}).items():
                known = definitions.setdefault(key, {})
                if def_name in known and known[def_name] != body:
                    raise APIError(400, f"tools define {key} {def_name!r} twice, differently: a \"required\" "
                                        "tool_choice needs one definition per name", param="tools")
                known[def_name] = body
        parameters.append(schema)
    return parameters, definitions


def output_schema(tools: list | None, mode: str | None) -> dict | None:
    """The JSON schema a named or "required" choice constrains the output to (vLLM's)."""
    if mode == "required":
        parameters, definitions = _hoisted_parameters(tools)
        return {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
            {"properties": {"name": {"type": "string", "enum": [t["function"]["name"]]}, "parameters": p},
             "required": ["name", "parameters"]} for t, p in zip(tools, parameters)]}, **definitions}
    if mode is not None and mode.startswith("function:"):
        name = mode.removeprefix("function:")
        return _parameters(next(t for t in tools if t["function"]["name"] == name))
    return None


def structured(request, plain) -> dict:
    """The request's output constraint (SamplingParams fields): a named or "required" tool_choice's
    schema, else `plain()` (response_format, guided_*), which may not be given beside it."""
    schema = output_schema(request.tools, choice_mode(request.tools, request.tool_choice))
    if schema is None:
        return plain()
    if plain():
        raise APIError(400, f"tool_choice {request.tool_choice!r} constrains the output already: drop "
                            "response_format / guided_*", param="tool_choice")
    from tetriinfer.engine.structured import check_json_schema

    text = json.dumps(schema)
    check_or_400(check_json_schema, text, "tool_choice", invalid_prefix="tools: ")
    return {"json_schema": text}


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class ToolCalling:
    """How a job's choices are read back: `mode` as choice_mode gives it (never "none"), with the
    auto parser's name."""

    mode: str
    parser: str | None = None

    def __post_init__(self):
        self._parser = PARSERS[self.parser]() if self.mode == "auto" else None

    def streamable(self, text: str) -> int:
        """How much of a partial output a stream may send as content now."""
        return self._parser.streamable(text) if self._parser is not None else 0

    def read(self, text: str, finish_reason: str | None) -> tuple[str | None, list[dict], str | None]:
        """(content, tool_calls, finish_reason) of a whole output. Output that does not parse is plain
        content with its own finish reason (a length cut, for one)."""
        if self.mode.startswith("function:"):  # the grammar made it the arguments (vLLM: content "")
            return "", [_tool_call(self.mode.removeprefix("function:"), text)], finish_reason
        if self.mode == "required":
            try:
                items = json.loads(text)
                calls = [(item["name"], json.dumps(item["parameters"], ensure_ascii=False)) for item in items]
            except (ValueError, TypeError, KeyError):
                return text, [], finish_reason
            return "", [_tool_call(name, arguments) for name, arguments in calls], "tool_calls"
        content, calls = self._parser.parse(text)
        if not calls:
            return text, [], finish_reason
        new_id = getattr(self._parser, "call_id", call_id)  # a parser may need its model's id format
        return content, [_tool_call(name, arguments, new_id()) for name, arguments in calls], "tool_calls"

    @property
    def keeps_special_tokens(self) -> bool:
        """The auto parser reads a special token (Mistral's `[TOOL_CALLS]`): the text must keep them."""
        return getattr(self._parser, "keeps_special_tokens", False)


def _tool_call(name: str, arguments: str, id_: str | None = None) -> dict:
    return {"id": id_ or call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_calling(tools: list | None, mode: str | None, auto_parser: str | None) -> ToolCalling | None:
    """The job's ToolCalling (None: plain text); "auto" without the server's parser is a 400."""
    if mode in (None, "none"):
        return None
    if mode == "auto" and auto_parser is None:
        raise APIError(400, AUTO_NEEDS_FLAGS, param="tool_choice")
    return ToolCalling(mode, auto_parser if mode == "auto" else None)
