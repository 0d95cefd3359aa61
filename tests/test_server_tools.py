"""Tool calling on /v1/chat/completions over the fake backend (its `script` plays the model's
output): request checks (400s naming the field), the constraint a named or "required" tool_choice
puts on SamplingParams, the response's tool_calls, auto parsing with --tool-call-parser, streams
(the official openai client's accumulation too) and n > 1."""

from __future__ import annotations

import json

import pytest

from api_utils import CHAT, call, hide_xgrammar, live, server, sse_events  # noqa: F401
from fake_backend import FakeBackend
from tetriinfer.server.app import create_app

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, TIME]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(max_model_len=512)


def chat(app, **body):
    return call(app, "POST", "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 100, **body})


def auto_app(backend, parser="hermes"):
    return create_app(backend, enable_auto_tool_choice=True, tool_call_parser=parser)


@pytest.mark.parametrize("body, param", [
    ({"tools": {"get_weather": {}}}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools.0.function.parameters"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": NAMED, "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tools_or_tool_choice_is_a_400_naming_the_field(backend, body, param):
    r = chat(auto_app(backend), **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert not backend.started


def test_auto_tool_choice_without_the_server_flags_is_vllms_400(backend):
    for body in ({"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "auto"}):
        r = chat(create_app(backend), **body)
        assert r.status_code == 400
        assert r.json()["error"]["message"] == ('"auto" tool choice requires --enable-auto-tool-choice and '
                                                "--tool-call-parser to be set")


def test_create_app_refuses_auto_tool_choice_without_a_known_parser(backend):
    with pytest.raises(ValueError, match="--tool-call-parser"):
        create_app(backend, enable_auto_tool_choice=True)
    with pytest.raises(ValueError, match="hermes"):
        create_app(backend, enable_auto_tool_choice=True, tool_call_parser="nope")


def test_tool_choice_none_passes_the_tools_to_the_chat_template_and_answers_text(backend):
    backend.tokenizer.chat_template = "{{ tools | map(attribute='function.name') | join(',') }}:{{ messages[0].content }}"
    backend.script = HERMES_CALL
    r = chat(create_app(backend), tools=TOOLS, tool_choice="none", parallel_tool_calls=False)
    assert r.status_code == 200, r.text
    assert backend.started[0].prompt == "get_weather,get_time:hi"
    assert backend.started[0].sampling.json_schema is None
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": HERMES_CALL} and choice["finish_reason"] == "stop"


def test_named_tool_choice_constrains_to_the_parameters_and_answers_one_call(backend):
    pytest.importorskip("xgrammar")
    backend.script = '{"city": "Paris"}'
    r = chat(create_app(backend), tools=TOOLS, tool_choice=NAMED)
    assert r.status_code == 200, r.text
    assert json.loads(backend.started[0].sampling.json_schema) == WEATHER["function"]["parameters"]
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"  # as vLLM: a named call keeps the generated reason
    message = choice["message"]
    assert message["content"] == ""
    [tool_call] = message["tool_calls"]
    assert tool_call["id"].startswith("chatcmpl-tool-") and tool_call["type"] == "function"
    assert tool_call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_named_tool_choice_without_xgrammar_is_the_structured_output_400(backend, monkeypatch):
    hide_xgrammar(monkeypatch)
    r = chat(create_app(backend), tools=TOOLS, tool_choice=NAMED)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "pip install 'tetriinfer[structured]'" in r.json()["error"]["message"]


def test_required_tool_choice_constrains_to_an_array_of_calls_and_answers_each(backend):
    pytest.importorskip("xgrammar")
    backend.script = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]'
    r = chat(create_app(backend), tools=TOOLS, tool_choice="required")
    assert r.status_code == 200, r.text
    schema = json.loads(backend.started[0].sampling.json_schema)
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert [item["properties"]["name"]["enum"] for item in schema["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert [c["function"] for c in choice["message"]["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city": "Oslo"}'}, {"name": "get_time", "arguments": "{}"}]
    assert len({c["id"] for c in choice["message"]["tool_calls"]}) == 2


def pydantic_style_tool(name: str, unit_enum: list[str]) -> dict:
    """Parameters as pydantic's model_json_schema writes them: nested models behind "#/$defs/..." refs."""
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {"unit": {"$ref": "#/$defs/Unit"}, "place": {"$ref": "#/$defs/Place"}},
        "required": ["unit", "place"],
        "$defs": {"Unit": {"type": "string", "enum": unit_enum},
                  "Place": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}}}


def test_required_tool_choice_keeps_the_tools_defs_resolvable_at_the_schemas_root(backend):
    pytest.importorskip("xgrammar")
    tools = [pydantic_style_tool("get_weather", ["c", "f"]), pydantic_style_tool("get_forecast", ["c", "f"])]
    backend.script = '[{"name": "get_forecast", "parameters": {"unit": "c", "place": {"city": "Oslo"}}}]'
    r = chat(create_app(backend), tools=tools, tool_choice="required")
    assert r.status_code == 200, r.text
    schema = json.loads(backend.started[0].sampling.json_schema)
    assert set(schema["$defs"]) == {"Unit", "Place"}  # one copy of the definitions both tools share
    assert all("$defs" not in item["properties"]["parameters"] for item in schema["items"]["anyOf"])
    assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_forecast"


def test_required_tool_choice_over_tools_defining_one_name_differently_is_a_400(backend):
    tools = [pydantic_style_tool("get_weather", ["c", "f"]), pydantic_style_tool("get_forecast", ["k"])]
    r = chat(create_app(backend), tools=tools, tool_choice="required")
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert "'Unit'" in r.json()["error"]["message"]


def test_auto_mistral_keeps_special_tokens_and_answers_nine_character_call_ids(backend):
    backend.script = 'Checking. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    r = chat(auto_app(backend, "mistral"), tools=TOOLS)
    assert r.status_code == 200, r.text
    assert backend.started[0].sampling.skip_special_tokens is False  # [TOOL_CALLS] is a special token
    message = r.json()["choices"][0]["message"]
    assert message["content"] == "Checking. " and r.json()["choices"][0]["finish_reason"] == "tool_calls"
    call = message["tool_calls"][0]
    assert len(call["id"]) == 9 and call["id"].isalnum()
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}


def test_skip_special_tokens_is_passed_to_the_sampling_params_and_defaults_to_true(backend):
    app = create_app(backend)
    assert chat(app).status_code == 200 and chat(app, skip_special_tokens=False).status_code == 200
    assert chat(app, skip_special_tokens=None).status_code == 200
    assert [s.sampling.skip_special_tokens for s in backend.started] == [True, False, True]
    assert chat(app, skip_special_tokens="maybe").status_code == 400


def test_auto_hermes_keeps_the_text_before_the_call_as_content(backend):
    backend.script = "Checking.\n" + HERMES_CALL
    r = chat(auto_app(backend), tools=TOOLS)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking.\n"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert backend.started[0].sampling.json_schema is None  # auto: free text, read afterwards


def test_auto_llama3_json_reads_calls_and_leaves_plain_text_alone(backend):
    backend.script = '{"name": "get_time", "parameters": {}}'
    choice = chat(auto_app(backend, "llama3_json"), tools=TOOLS).json()["choices"][0]
    assert choice["message"]["content"] is None and choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    backend.script = "It is noon."
    choice = chat(auto_app(backend, "llama3_json"), tools=TOOLS).json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "It is noon.", "tool_calls": []}
    assert choice["finish_reason"] == "stop"


def test_unparseable_auto_output_is_content_with_its_own_finish_reason(backend):
    backend.script = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    choice = chat(auto_app(backend), tools=TOOLS, max_tokens=30).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == backend.script[:30] and choice["message"]["tool_calls"] == []


def test_each_of_n_choices_is_parsed_on_its_own(backend):
    backend.script = HERMES_CALL
    choices = chat(auto_app(backend), tools=TOOLS, n=2).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["finish_reason"] == "tool_calls" for c in choices)
    assert choices[0]["message"]["tool_calls"][0]["id"] != choices[1]["message"]["tool_calls"][0]["id"]


def stream(app, **body) -> list:
    r = chat(app, stream=True, **body)
    assert r.status_code == 200, r.text
    return [e for e in sse_events(r.text) if e != "[DONE]"]


def test_auto_stream_sends_the_content_then_the_calls_whole_then_the_finish(backend):
    backend.script = "Let me see <tool_calls are next>\n" + HERMES_CALL
    events = stream(auto_app(backend), tools=TOOLS)
    deltas = [e["choices"][0]["delta"] for e in events]
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == "Let me see <tool_calls are next>\n"  # a "<tool" that turned out not to be a call is sent
    [with_calls] = [d for d in deltas if "tool_calls" in d]
    [entry] = with_calls["tool_calls"]
    assert entry["index"] == 0 and entry["id"].startswith("chatcmpl-tool-") and entry["type"] == "function"
    assert entry["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert deltas.index(with_calls) == len(deltas) - 2
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_stream_without_calls_sends_the_held_text_at_the_finish(backend):
    backend.script = "plain {answer}"
    events = stream(auto_app(backend, "llama3_json"), tools=TOOLS)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == "plain {answer}"
    assert not any("tool_calls" in e["choices"][0]["delta"] for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_named_stream_holds_everything_and_sends_one_call(backend):
    pytest.importorskip("xgrammar")
    backend.script = '{"city": "Paris"}'
    events = stream(create_app(backend), tools=TOOLS, tool_choice=NAMED, n=2)
    for index in (0, 1):
        deltas = [e["choices"][0]["delta"] for e in events if e["choices"][0]["index"] == index]
        assert not "".join(d.get("content") or "" for d in deltas)
        [with_calls] = [d for d in deltas if "tool_calls" in d]
        assert with_calls["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_openai_client_reads_required_tool_calls_whole_and_streamed(server):
    openai = pytest.importorskip("openai")
    pytest.importorskip("xgrammar")
    backend, base_url = server
    backend.script = '[{"name": "get_weather", "parameters": {"city": "Paris"}}]'
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none")
    args = dict(model="fake-model", messages=CHAT, tools=TOOLS, tool_choice="required", max_tokens=100)
    whole = client.chat.completions.create(**args)
    with client.beta.chat.completions.stream(**args) as s:  # the client's own chunk accumulation
        streamed = s.get_final_completion()
    for completion in (whole, streamed):
        [tool_call] = completion.choices[0].message.tool_calls
        assert tool_call.function.name == "get_weather" and json.loads(tool_call.function.arguments) == {"city": "Paris"}
        assert completion.choices[0].finish_reason == "tool_calls"
