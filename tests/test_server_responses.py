"""OpenAI's Responses API (/v1/responses) over the fake backend: input items to messages, the
response object, its stream of events, tool calls and reasoning items, and the official openai
client reading both."""

from __future__ import annotations

import json

import pytest

from api_utils import call, sse_events
from fake_backend import FakeBackend, serve_in_thread
from tetriinfer.server.app import create_app

WEATHER = {"type": "function", "name": "get_weather", "description": "the weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


def playing(reply: str | None = None, **flags):
    backend = FakeBackend(max_model_len=512)
    backend.script = reply
    return backend, create_app(backend, **flags)


def events_of(text: str) -> list[dict]:
    return [json.loads(block.split("data: ", 1)[1]) for block in text.strip().split("\n\n") if "data: " in block]


def test_a_string_input_answers_a_response_with_one_message_and_the_usage():
    backend, app = playing("Hello there")
    r = call(app, "POST", "/v1/responses", json={"input": "hi", "instructions": "be brief", "max_output_tokens": 50})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "response" and body["status"] == "completed" and body["id"].startswith("resp_")
    [item] = body["output"]
    assert item["type"] == "message" and item["content"][0] == {"type": "output_text", "text": "Hello there",
                                                                "annotations": []}
    assert body["usage"]["output_tokens"] == len("Hello there") and body["usage"]["input_tokens"] > 0
    [started] = backend.started  # the instructions came first, as a system message, then the input
    prompt = backend.tokenizer.decode(started.prompt_token_ids)
    assert prompt.index("be brief") < prompt.index("hi") and started.sampling.max_tokens == 50


def test_input_items_with_a_call_and_its_output_reach_the_template_as_chat_turns():
    backend, app = playing("It is cold.")
    backend.tokenizer.chat_template = ("{% for m in messages %}[{{ m.role }}|{{ m.content }}"
                                       "{% for c in m.tool_calls or [] %}|{{ c.function.name }}{{ c.function.arguments | tojson }}"
                                       "{% endfor %}]{% endfor %}")
    items = [{"role": "developer", "content": "sys"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
             {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
             {"type": "function_call_output", "call_id": "c1", "output": "-3 C"}]
    assert call(app, "POST", "/v1/responses", json={"input": items, "tools": [WEATHER], "tool_choice": "none"}).status_code == 200
    prompt = backend.tokenizer.decode(backend.started[0].prompt_token_ids)
    assert prompt.endswith('[system|sys][user|weather?][assistant||get_weather{"city": "Oslo"}][tool|-3 C]')


def test_a_length_cut_is_incomplete_with_its_reason():
    _, app = playing("a long answer that goes on")
    body = call(app, "POST", "/v1/responses", json={"input": "hi", "max_output_tokens": 4}).json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["content"][0]["text"] == "a lo"


@pytest.mark.parametrize("body, param", [
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": [{"type": "image_generation_call"}]}, "input.0"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input.0.role"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools.0"),
    ({"input": 7}, "input"),
])
def test_what_we_cannot_serve_is_a_400_naming_the_field(body, param):
    backend, app = playing("x")
    r = call(app, "POST", "/v1/responses", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert not backend.started


def test_the_stream_sends_the_responses_events_in_order_and_ends_with_the_whole_response():
    _, app = playing("Hi you")
    events = events_of(call(app, "POST", "/v1/responses", json={"input": "hi", "stream": True}).text)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hi you"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == "Hi you" and final["usage"]["output_tokens"] == 6


def test_reasoning_and_a_tool_call_become_their_own_items_whole_and_streamed():
    flags = dict(reasoning_parser="qwen3", enable_auto_tool_choice=True, tool_call_parser="hermes")
    _, app = playing("<think>need weather</think>Let me check." + HERMES_CALL, **flags)
    request = {"input": "weather in Oslo?", "tools": [WEATHER]}
    body = call(app, "POST", "/v1/responses", json=request).json()
    assert [i["type"] for i in body["output"]] == ["reasoning", "message", "function_call"]
    assert body["output"][0]["content"][0]["text"] == "need weather"
    assert body["output"][1]["content"][0]["text"] == "Let me check."
    assert json.loads(body["output"][2]["arguments"]) == {"city": "Oslo"} and body["output"][2]["name"] == "get_weather"
    events = events_of(call(app, "POST", "/v1/responses", json={**request, "stream": True}).text)
    final = events[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["reasoning", "message", "function_call"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == "need weather"
    assert [e["arguments"] for e in events if e["type"] == "response.function_call_arguments.done"] == [
        body["output"][2]["arguments"]]


def test_the_openai_client_reads_a_response_whole_and_streamed():
    openai = pytest.importorskip("openai")
    backend, app = playing("Hello from the server")
    base_url, stop = serve_in_thread(app)
    try:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none")
        whole = client.responses.create(model="fake-model", input="hi", max_output_tokens=100)
        assert whole.output_text == "Hello from the server" and whole.status == "completed"
        with client.responses.stream(model="fake-model", input="hi", max_output_tokens=100) as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
            final = stream.get_final_response()
        assert "".join(deltas) == final.output_text == "Hello from the server"
        assert final.usage.output_tokens == len("Hello from the server")
    finally:
        stop()
