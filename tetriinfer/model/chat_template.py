"""Chat templates rendered the way Hugging Face `transformers` renders them.

A model's template is written against transformers' Jinja environment, not plain Jinja: a sandbox
with `trim_blocks`/`lstrip_blocks`, `{% break %}`/`{% continue %}`, a `tojson` that keeps non-ASCII
text and takes `indent`, and the globals `raise_exception` (a template refusing a conversation,
e.g. roles that do not alternate) and `strftime_now` (Llama 3.2's date line). `{% generation %}`
blocks (templates written for assistant-token masks) render their body. Without these a template
that uses them fails, or renders a different prompt than the model was trained on.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

import jinja2  # a dependency of torch
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Names the caller fills; request-side template kwargs may not replace them.
RESERVED_NAMES = frozenset({"messages", "tools", "documents", "add_generation_prompt", "continue_final_message"})


class ChatTemplateError(ValueError):
    """The template refused the conversation (`raise_exception`) or could not render it."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (the mask it marks is not needed)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def resolve_chat_template(value: str) -> str:
    """`--chat-template`, as vLLM reads it: a file's path, or the template itself (it must parse)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{" not in value:  # no Jinja in it: a path that is not there
        raise FileNotFoundError(f"--chat-template {value!r}: no such file (give a file's path, or the template itself)")
    compile_template(value)
    return value


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e}") from None


def render_chat(source: str, messages: list[dict], *, add_generation_prompt: bool, continue_final_message: bool = False,
                tools: list[dict] | None = None, special_tokens: dict[str, str] | None = None,
                template_kwargs: dict | None = None) -> str:
    """The prompt text of `messages` under the template `source`. `template_kwargs` (a request's
    `chat_template_kwargs`, e.g. Qwen3's `enable_thinking`) become template variables.
    `continue_final_message`: the text ends where the last message's content does (what the template
    puts after it, e.g. an end-of-turn token, is cut), so the reply continues that message."""
    extra = dict(template_kwargs or {})
    clash = RESERVED_NAMES.intersection(extra)
    if clash:
        raise ChatTemplateError(f"chat_template_kwargs may not set {', '.join(sorted(clash))}")
    # `tools` and `documents` are always defined (None when absent), as transformers passes them:
    # templates test `tools is not none`, which an undefined name would pass.
    variables = {**(special_tokens or {}), **extra, "messages": messages, "tools": tools, "documents": None,
                 "add_generation_prompt": add_generation_prompt}
    try:
        text = compile_template(source).render(**variables)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(str(e)) from None
    if continue_final_message:
        final = str(messages[-1].get("content") or "").strip()
        end = text.rfind(final) if final else -1
        if end < 0:
            raise ChatTemplateError("continue_final_message: the template does not show the last message's content")
        text = text[: end + len(final)]
    return text
