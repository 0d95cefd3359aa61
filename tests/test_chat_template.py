"""Chat templates render as transformers renders them (its Jinja globals, filters and tags), the
template can come from chat_template.jinja or --chat-template, and the API passes vLLM's
chat_template_kwargs, continue_final_message and tool-call history through to the template."""

from __future__ import annotations

import json

import pytest

from api_utils import app, backend, call  # noqa: F401 (fixtures)
from tetriinfer.llm import LLM
from tetriinfer.model.chat_template import ChatTemplateError, render_chat, resolve_chat_template
from tetriinfer.model.tokenizer import load_tokenizer

# A template using what transformers' environment adds to plain Jinja: tojson (non-ASCII kept,
# indent), raise_exception, strftime_now, {% break %}, {% generation %}, `tools is not none`, and
# a template kwarg (Qwen3's enable_thinking).
TEMPLATE = (
    "{%- if tools is not none %}<tools>{{ tools | tojson(indent=2) }}</tools>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' and not loop.first %}{{ raise_exception('the system message must come first') }}{% endif %}"
    "{%- if m['role'] == 'end' %}{% break %}{% endif %}"
    "<|{{ m['role'] }}|>{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c.function.name }} {{ c.function.arguments | tojson }}</call>{% endfor %}{% endif %}"
    "{{ eos_token }}\n"
    "{% endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and not enable_thinking %}"
    "<think></think>{% endif %}{% endif %}"
    "{{- ' year:' ~ strftime_now('%Y') }}"
)
TOOLS = [{"type": "function", "function": {"name": "météo", "description": "la météo",
                                            "parameters": {"type": "object", "properties": {"ville": {"type": "string"}}}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "bonjour ✓"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                                                          "function": {"name": "météo", "arguments": {"ville": "Zürich"}}}]},
     {"role": "tool", "content": "12 °C", "tool_call_id": "c1"}, {"role": "end", "content": "x"}, {"role": "user", "content": "z"}],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": TEMPLATE}))
    return path


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}])
def test_rendering_equals_transformers_apply_chat_template(model_dir, messages, tools, kwargs):
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    ours = load_tokenizer(model_dir, None, None)
    expected = reference.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)
    assert ours.apply_chat_template(messages, True, tools=tools, template_kwargs=kwargs) == expected
    assert "Zürich" in expected or "bonjour ✓" in expected  # non-ASCII kept, not \\u-escaped


def test_continue_final_message_ends_the_prompt_inside_the_last_message_as_transformers_does(model_dir):
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once upon"}]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                             continue_final_message=True)
    got = load_tokenizer(model_dir, None, None).apply_chat_template(messages, False, continue_final_message=True)
    assert got == expected and got.endswith("<|assistant|>Once upon")


def test_a_template_refusing_the_conversation_raises_its_own_message():
    with pytest.raises(ChatTemplateError, match="the system message must come first"):
        render_chat(TEMPLATE, [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
                    add_generation_prompt=True)
    with pytest.raises(ChatTemplateError, match="may not set messages"):
        render_chat(TEMPLATE, [{"role": "user", "content": "a"}], add_generation_prompt=True,
                    template_kwargs={"messages": []})
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat("{% for %}", [], add_generation_prompt=True)


def test_chat_template_jinja_beside_the_config_wins_as_in_transformers(tmp_path, model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((model_dir / name).read_text())
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert load_tokenizer(tmp_path, None, None).apply_chat_template([{"role": "user", "content": "q"}]) == "[q]"


def test_chat_template_flag_takes_a_file_or_the_template_and_names_a_missing_file(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}!")
    assert resolve_chat_template(str(path)) == "{{ messages[0]['content'] }}!"
    assert resolve_chat_template("{{ messages | length }}") == "{{ messages | length }}"
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_chat_template(str(tmp_path / "absent.jinja"))
    with pytest.raises(ChatTemplateError, match="does not parse"):
        resolve_chat_template("{% if %}")


def test_offline_chat_takes_vllms_template_keywords():
    llm = LLM("tiny", num_blocks=32)
    tok = llm.get_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hel"}]
    out = llm.chat(messages, chat_template="{% for m in messages %}{{ m['content'] }}|{% endfor %}",
                   add_generation_prompt=False, continue_final_message=True)[0]
    assert out.prompt_token_ids == tok.encode("hi|hel")
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(messages, continue_final_message=True)


def test_the_api_passes_template_kwargs_tool_history_and_continuation_to_the_template(app, backend):  # noqa: F811
    backend.tokenizer.chat_template = TEMPLATE
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "content": "cold", "tool_call_id": "c1"}]

    def tokens(**body) -> list[int]:
        response = call(app, "POST", "/tokenize", json={"messages": messages, **body})
        assert response.status_code == 200, response.text
        return response.json()["tokens"]

    plain = backend.tokenizer.decode(tokens())
    assert '<call>w {"city": "Oslo"}</call>' in plain  # the wire's JSON string arrives as a dict
    assert backend.tokenizer.decode(tokens(chat_template_kwargs={"enable_thinking": False})) == plain.replace(
        "<|assistant|> year", "<|assistant|><think></think> year")
    chat = call(app, "POST", "/v1/chat/completions", json={
        "messages": messages, "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": False}}).json()
    assert chat["usage"]["prompt_tokens"] == len(tokens(chat_template_kwargs={"enable_thinking": False}))
    continued = backend.tokenizer.decode(tokens(add_generation_prompt=False, continue_final_message=True))
    assert continued.endswith("<|tool|>cold")

    for body, message in [
        ({"continue_final_message": True}, "cannot both be true"),
        ({"chat_template": "{{ 1 }}"}, "--chat-template"),
        ({"chat_template_kwargs": {"add_generation_prompt": False}}, "may not set add_generation_prompt"),
    ]:
        response = call(app, "POST", "/v1/chat/completions", json={"messages": messages, "max_tokens": 1, **body})
        assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
    refused = call(app, "POST", "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "max_tokens": 1})
    assert refused.status_code == 400 and "the system message must come first" in refused.json()["error"]["message"]
