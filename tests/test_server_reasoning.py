"""--reasoning-parser on /v1/chat/completions over the fake backend (its `script` plays the model's
reply): the thinking goes to `reasoning` (and `reasoning_content`), the rest to `content`, the same
whole and streamed, and beside tool calls."""

from __future__ import annotations

import json
import re

import pytest

from api_utils import CHAT, call, sse_events
from fake_backend import FakeBackend
from tetriinfer.model.tokenizer import ByteTokenizer
from tetriinfer.server.app import create_app

R1_REPLY = "The user wants 2+2.\nThat is 4.\n</think>\n\nIt is **4**."
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def chat(app, **body):
    return call(app, "POST", "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 200, **body})


def streamed(app, **body) -> tuple[dict, list[dict]]:
    """The stream's deltas joined per field, and the deltas themselves."""
    events = sse_events(chat(app, stream=True, **body).text)
    deltas = [e["choices"][0]["delta"] for e in events if isinstance(e, dict) and e.get("choices")]
    joined: dict = {}
    for delta in deltas:
        for key in ("reasoning", "reasoning_content", "content"):
            if delta.get(key):
                joined[key] = joined.get(key, "") + delta[key]
        for call_ in delta.get("tool_calls") or []:
            joined.setdefault("tool_calls", []).append(call_)
    finishes = [e["choices"][0]["finish_reason"] for e in events if isinstance(e, dict) and e.get("choices")]
    joined["finish_reason"] = [f for f in finishes if f][-1]
    return joined, deltas


def app_playing(reply: str, **flags):
    backend = FakeBackend(max_model_len=512)
    backend.script = reply
    return create_app(backend, **flags)


def test_deepseek_r1_puts_the_thinking_in_reasoning_and_the_answer_in_content_whole_and_streamed():
    app = app_playing(R1_REPLY, reasoning_parser="deepseek_r1")
    message = chat(app).json()["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == "The user wants 2+2.\nThat is 4.\n"
    assert message["content"] == "\n\nIt is **4**."
    joined, deltas = streamed(app)
    assert joined["reasoning"] == joined["reasoning_content"] == message["reasoning"]
    assert joined["content"] == message["content"]
    assert not any("</think>" in (d.get("content") or "") + (d.get("reasoning") or "") for d in deltas)
    assert sum(1 for d in deltas if d.get("reasoning")) > 1  # the thinking streams, it is not held to the end


def test_qwen3_without_thinking_is_all_content_and_has_no_reasoning_field():
    app = app_playing("Just the answer: 4.", reasoning_parser="qwen3")
    message = chat(app).json()["choices"][0]["message"]
    assert message["content"] == "Just the answer: 4." and "reasoning" not in message
    joined, _ = streamed(app)
    assert joined.get("content") == "Just the answer: 4." and "reasoning" not in joined


def test_a_reply_cut_while_thinking_is_all_reasoning_with_null_content():
    app = app_playing("<think>still weighing it", reasoning_parser="qwen3")
    body = chat(app).json()["choices"][0]
    assert body["message"]["reasoning"] == "still weighing it" and body["message"]["content"] is None


def test_without_a_parser_the_thinking_stays_in_content():
    app = app_playing(R1_REPLY)
    message = chat(app).json()["choices"][0]["message"]
    assert message["content"] == R1_REPLY and "reasoning" not in message


def test_thinking_then_a_tool_call_gives_reasoning_content_and_the_call():
    reply = "<think>Need the weather.</think>Checking. " + HERMES_CALL
    app = app_playing(reply, reasoning_parser="qwen3", enable_auto_tool_choice=True, tool_call_parser="hermes")
    choice = chat(app, tools=[WEATHER]).json()["choices"][0]
    message = choice["message"]
    assert message["reasoning"] == "Need the weather." and message["content"] == "Checking. "
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Zürich"}
    assert choice["finish_reason"] == "tool_calls"
    joined, _ = streamed(app, tools=[WEATHER])
    assert joined["reasoning"] == "Need the weather." and joined["content"] == "Checking. "
    assert json.loads(joined["tool_calls"][0]["function"]["arguments"]) == {"city": "Zürich"}
    assert joined["finish_reason"] == "tool_calls"


def test_an_unknown_reasoning_parser_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown --reasoning-parser 'r2': one of deepseek_r1, qwen3"):
        create_app(FakeBackend(), reasoning_parser="r2")


class ThinkTagTokenizer(ByteTokenizer):
    """Bytes, but `<think>` and `</think>` are one token each (ids 300 and 301), as in Qwen3 and R1."""

    TAGS = {"<think>": 300, "</think>": 301}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.bos_token_id] if add_special_tokens else []
        for piece in re.split("(</?think>)", text):
            ids += [self.TAGS[piece]] if piece in self.TAGS else list(piece.encode())
        return ids


@pytest.mark.parametrize("last_assistant_text, constrained_after", [
    (None, 301),  # the model may think first: the JSON starts after its </think>
    ("<think>\n\n</think>\n\n", None),  # enable_thinking false: the prompt closed the thinking
    ("<think>\n", 301),  # R1's template opens it
])
def test_structured_output_under_a_reasoning_parser_leaves_the_thinking_free(last_assistant_text, constrained_after):
    pytest.importorskip("xgrammar")
    backend = FakeBackend(max_model_len=512, vocab_size=302, tokenizer=ThinkTagTokenizer())
    backend.script = '<think>weighing</think>{"answer": 4}'
    app = create_app(backend, reasoning_parser="qwen3")
    messages = CHAT + ([{"role": "assistant", "content": last_assistant_text}] if last_assistant_text else [])
    body = {"response_format": {"type": "json_object"}, "messages": messages}
    if last_assistant_text:
        body.update(continue_final_message=True, add_generation_prompt=False)
    r = chat(app, **body)
    assert r.status_code == 200, r.text
    assert backend.started[0].sampling.structured_after_token_id == constrained_after
    assert r.json()["choices"][0]["message"]["content"] == '{"answer": 4}'
    plain = FakeBackend(max_model_len=512, vocab_size=302, tokenizer=ThinkTagTokenizer())
    assert chat(create_app(plain), response_format={"type": "json_object"}).status_code == 200
    assert plain.started[0].sampling.structured_after_token_id is None  # no reasoning parser: from the start
