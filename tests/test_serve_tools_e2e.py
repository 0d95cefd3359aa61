"""Tool calling end to end through `tetriinfer serve` (tiny model, CPU) with the official openai
client: a named tool_choice constrains the output (xgrammar) to the function's parameters, so the
returned arguments are JSON valid against its schema, whole and streamed."""

from __future__ import annotations

import json

import pytest

from serve_utils import start_server

PARAMETERS = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                               "unit": {"enum": ["celsius", "fahrenheit"]}},
              "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                           "parameters": PARAMETERS}},
         {"type": "function", "function": {"name": "get_time"}}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    pytest.importorskip("xgrammar")
    openai = pytest.importorskip("openai")
    args = ["--num-blocks", "128", "--chunk-size", "32", "--max-model-len", "512", "--disable-log-stats",
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    with start_server(args, tmp_path_factory.mktemp("serve-tools")) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=120)


def test_named_tool_choice_returns_arguments_valid_against_the_schema_whole_and_streamed(client):
    jsonschema = pytest.importorskip("jsonschema")
    request = dict(model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
                   tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=200,
                   temperature=0.7, seed=2)  # a seed whose JSON ends well within max_tokens (random weights)
    whole = client.chat.completions.create(**request)
    with client.beta.chat.completions.stream(**request) as stream:  # the client's own chunk accumulation
        streamed = stream.get_final_completion()
    arguments = []
    for completion in (whole, streamed):
        [call] = completion.choices[0].message.tool_calls
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS)
        arguments.append(call.function.arguments)
    assert arguments[0] == arguments[1]  # same seed: the stream carries the same call


def test_auto_tool_choice_on_text_that_has_no_call_answers_content(client):
    completion = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                tools=TOOLS, max_tokens=8, temperature=0)
    choice = completion.choices[0]
    assert not choice.message.tool_calls and choice.finish_reason == "length"  # no parse: the text as generated
