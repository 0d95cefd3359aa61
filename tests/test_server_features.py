"""API features over the fake backend: n > 1 and batched prompts (fan-out, indices, usage, aborts),
stream usage only when asked (continuous_usage_stats too), top-N logprobs, echo + prompt logprobs as
lm-eval sends them, penalties / logit_bias / response_format reaching SamplingParams, the access
and stats log lines; and the official openai client on the same features."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from api_utils import CHAT, MODEL, call, expected_text, hide_xgrammar, server, live, sse_events, wait_until  # noqa: F401
from fake_backend import FakeBackend
from tetriinfer.cluster.messages import ClusterStats
from tetriinfer.server.app import create_app
from tetriinfer.server.logs import LogConfig, StatsLogger


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def app(backend):
    return create_app(backend)


def test_n_choices_fan_out_with_seed_offsets_and_summed_usage(app, backend):
    r = call(app, "POST", "/v1/completions", json={"prompt": "hello", "max_tokens": 3, "n": 3, "seed": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["text"] == "oll" for c in body["choices"])
    assert sorted(s.sampling.seed for s in backend.started) == [7, 8, 9]
    assert len({s.request_id for s in backend.started}) == 3
    assert all(s.request_id.startswith(body["id"]) for s in backend.started)
    assert body["usage"]["prompt_tokens"] == 6 and body["usage"]["completion_tokens"] == 9  # prompt counted once


@pytest.mark.parametrize("prompts", [["ab", "xyz"], [[97, 98], [120, 121, 122]]])
def test_batched_prompts_index_as_vllm(app, backend, prompts):
    r = call(app, "POST", "/v1/completions", json={"prompt": prompts, "max_tokens": 2, "n": 2})
    body = r.json()
    texts = {c["index"]: c["text"] for c in body["choices"]}
    assert texts == {0: "ba", 1: "ba", 2: "zy", 3: "zy"}  # index = prompt_index * n + i
    lengths = [len(backend.tokenizer.encode(p)) if isinstance(p, str) else len(p) for p in prompts]
    assert body["usage"]["prompt_tokens"] == sum(lengths) and body["usage"]["completion_tokens"] == 8


def test_chat_n_choices(app, backend):
    r = call(app, "POST", "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "n": 2})
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1] and choices[0]["message"] == choices[1]["message"]


def test_stream_n_choices_each_with_its_index_and_finish(server):
    backend, url = server
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3, "n": 2, "stream": True,
                                                       "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[-2]["choices"] == []
    assert events[-2]["usage"]["completion_tokens"] == 6
    for index in (0, 1):
        mine = [e["choices"][0] for e in events[:-2] if e["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content") or "" for c in mine[1:]) == expected_text(
            backend, backend.started[0].prompt, 3)
        assert mine[-1]["finish_reason"] == "length" and [c["finish_reason"] for c in mine[:-1]] == [None] * 4


def test_continuous_usage_stats_on_every_chunk(server):
    backend, url = server
    r = httpx.post(f"{url}/v1/completions", json={
        "prompt": "hello", "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    events = sse_events(r.text)[:-1]
    assert all("usage" in e for e in events)
    assert [e["usage"]["completion_tokens"] for e in events] == [1, 2, 3, 3, 3]


def test_a_disconnect_aborts_every_choice(server):
    backend, url = server
    backend.delay_s = 0.05
    with httpx.stream("POST", f"{url}/v1/completions",
                      json={"prompt": ["ab", "cd"], "n": 2, "max_tokens": 50, "stream": True}) as r:
        next(r.iter_lines())
    wait_until(lambda: len(backend.aborted) == 4)
    assert sorted(backend.aborted) == sorted(s.request_id for s in backend.started)


def test_one_failing_choice_aborts_its_siblings(server):
    backend, url = server
    backend.delay_s, backend.fail_after, backend.fail_with = 0.01, 2, "raise"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "n": 3, "max_tokens": 40})
    assert r.status_code == 500
    wait_until(lambda: len(backend.aborted) == 3)


def test_choices_failing_together_are_all_aborted_even_when_an_abort_suspends(server):
    """Every choice raises at the same token; the first abort returns at once, the others suspend in
    the backend, and the first error cancels those choices meanwhile: each abort must still reach
    the backend (CI once lost two)."""
    backend, url = server
    backend.delay_s, backend.fail_after, backend.fail_with, backend.abort_delay_s = 0.01, 2, "raise", 0.05
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "n": 3, "max_tokens": 40})
    assert r.status_code == 500
    wait_until(lambda: len(backend.aborted) == 3)
    assert sorted(backend.aborted) == sorted(s.request_id for s in backend.started)


def test_completion_top_logprobs_and_echo_as_lm_eval_sends_it(app, backend):
    """lm-eval local-completions loglikelihood: token-id prompts, echo, logprobs=1, max_tokens=1,
    temperature 0; it reads token_logprobs[ctxlen:-1] and the top_logprobs dicts."""
    prompt = [104, 101, 108, 108, 111]
    r = call(app, "POST", "/v1/completions", json={"model": MODEL, "prompt": [prompt], "echo": True, "logprobs": 1,
                                                   "max_tokens": 1, "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert backend.started[0].sampling.prompt_logprobs == 1
    lp = choice["logprobs"]
    assert choice["text"] == "hello" + "o"
    assert lp["tokens"] == ["h", "e", "l", "l", "o", "o"]
    assert lp["token_logprobs"] == [None, -0.5, -1.0, -1.5, -2.0, -0.25]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][1] == {"e": -0.5}
    ctxlen = 2
    continuation = lp["token_logprobs"][ctxlen:-1]
    assert sum(continuation) == -4.5
    assert all(t == max(top.values()) for t, top in zip(continuation, lp["top_logprobs"][ctxlen:-1]))


def test_echo_with_max_tokens_zero_returns_the_prompt_only(app, backend):
    r = call(app, "POST", "/v1/completions", json={"prompt": "abc", "echo": True, "logprobs": 0, "max_tokens": 0})
    body = r.json()
    choice = body["choices"][0]
    assert choice["text"] == "abc" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["token_logprobs"] == [None, -0.5, -1.0, -1.5]  # <bos> a b c
    assert body["usage"]["completion_tokens"] == 0 and backend.started[0].sampling.max_tokens == 1


def test_echo_without_logprobs_prefixes_the_prompt(app):
    r = call(app, "POST", "/v1/completions", json={"prompt": "abc", "echo": True, "max_tokens": 2})
    assert r.json()["choices"][0]["text"] == "abccb" and r.json()["choices"][0]["logprobs"] is None


def test_stream_echo_sends_the_prompt_first(server):
    backend, url = server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "abc", "echo": True, "max_tokens": 2, "stream": True})
    texts = [e["choices"][0]["text"] for e in sse_events(r.text)[:-1]]
    assert texts == ["abc", "c", "b", ""]


def test_chat_top_logprobs(app):
    r = call(app, "POST", "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "logprobs": True,
                                                        "top_logprobs": 3})
    content = r.json()["choices"][0]["logprobs"]["content"]
    for entry in content:
        tops = entry["top_logprobs"]
        assert len(tops) == 3 and tops[0]["token"] == entry["token"] and tops[0]["logprob"] == entry["logprob"]
        assert [t["logprob"] for t in tops] == [entry["logprob"] - k for k in range(3)]
        assert all(t["bytes"] == list(t["token"].encode()) for t in tops)


def test_penalties_logit_bias_and_response_format_reach_the_sampler(app, backend):
    r = call(app, "POST", "/v1/chat/completions", json={
        "messages": CHAT, "max_tokens": 2, "presence_penalty": 0.5, "frequency_penalty": -0.25,
        "repetition_penalty": 1.2, "logit_bias": {"65": -100, "66": 3.5}, "min_p": 0.05,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}})
    assert r.status_code == 200, r.text
    s = backend.started[0].sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.min_p) == (0.5, -0.25, 1.2, 0.05)
    assert not s.include_stop_str_in_output
    call(app, "POST", "/v1/completions", json={"prompt": "x", "stop": ["."], "include_stop_str_in_output": True})
    assert backend.started[-1].sampling.include_stop_str_in_output
    assert s.logit_bias == {65: -100.0, 66: 3.5} and s.json_schema == '{"type": "object"}' and not s.json_object
    call(app, "POST", "/v1/completions", json={"prompt": "x", "response_format": {"type": "json_object"}})
    assert backend.started[-1].sampling.json_object


def test_vllms_guided_json_is_a_json_schema_constraint_and_cannot_be_given_with_response_format(app, backend):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for guided in (schema, json.dumps(schema)):
        r = call(app, "POST", "/v1/completions", json={"prompt": "x", "max_tokens": 2, "guided_json": guided})
        assert r.status_code == 200, r.text
        assert json.loads(backend.started[-1].sampling.json_schema) == schema
    started = len(backend.started)
    both = call(app, "POST", "/v1/chat/completions", json={"messages": CHAT, "guided_json": schema,
                                                         "response_format": {"type": "json_object"}})
    bad = call(app, "POST", "/v1/completions", json={"prompt": "x", "guided_json": "{not json"})
    assert (both.status_code, bad.status_code) == (400, 400)
    assert both.json()["error"]["param"] == bad.json()["error"]["param"] == "guided_json"
    assert len(backend.started) == started


def test_vllms_guided_regex_choice_and_grammar_reach_the_sampler_and_bad_ones_are_a_400(app, backend):
    r = call(app, "POST", "/v1/completions", json={"prompt": "x", "max_tokens": 2, "guided_regex": "[0-9]{3}"})
    assert r.status_code == 200, r.text
    assert backend.started[-1].sampling.regex == "[0-9]{3}"
    r = call(app, "POST", "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2,
                                                      "guided_choice": ["yes", "no (maybe)"]})
    assert r.status_code == 200, r.text
    assert backend.started[-1].sampling.regex == r"(yes|no \(maybe\))"
    r = call(app, "POST", "/v1/completions", json={"prompt": "x", "max_tokens": 2,
                                                   "guided_grammar": 'root ::= "yes" | "no"'})
    assert r.status_code == 200, r.text
    assert backend.started[-1].sampling.grammar == 'root ::= "yes" | "no"'
    started = len(backend.started)
    for body, param, words in [({"guided_regex": "([a-z"}, "guided_regex", "unsupported regex"),
                               ({"guided_grammar": "root ::= ("}, "guided_grammar", "unsupported grammar"),
                               ({"guided_choice": []}, "guided_choice", "non-empty"),
                               ({"guided_choice": ["a"], "guided_json": {"type": "object"}}, "guided_choice",
                                "give one output constraint")]:
        r = call(app, "POST", "/v1/completions", json={"prompt": "x", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param and words in r.json()["error"]["message"]
    assert len(backend.started) == started


def test_structured_output_without_the_library_names_the_extra(app, monkeypatch):
    hide_xgrammar(monkeypatch)
    r = call(app, "POST", "/v1/chat/completions", json={"messages": CHAT, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and "pip install 'tetriinfer[structured]'" in r.json()["error"]["message"]


def test_bad_json_schema_is_a_400(app):
    pytest.importorskip("xgrammar")
    r = call(app, "POST", "/v1/chat/completions", json={"messages": CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def test_access_log_line_and_its_switch(backend, caplog):
    caplog.set_level(logging.INFO, logger="tetriinfer.server")
    call(create_app(backend), "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    lines = [r.getMessage() for r in caplog.records if r.name == "tetriinfer.server"]
    assert any("POST /v1/completions 200 ok" in line and "completion_tokens=2" in line for line in lines)
    caplog.clear()
    quiet = create_app(backend, logs=LogConfig(log_requests=False, log_stats=False))
    call(quiet, "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert not [r for r in caplog.records if r.name == "tetriinfer.server"]


def test_stats_line_throughput_and_queues():
    stats = StatsLogger(lambda: ClusterStats([], 0, None, []), lambda: 2, 10.0)
    stats._last = 100.0
    stats.on_finished(500, 120)
    line = stats.line(now=110.0)
    assert "Avg prompt throughput: 50.0 tokens/s" in line and "Avg generation throughput: 12.0 tokens/s" in line
    assert "Running: 2 reqs" in line
    idle = StatsLogger(lambda: None, lambda: 0)
    assert idle.line() is None  # an idle server stays quiet


# ---- the official openai client -------------------------------------------------------------------
def test_openai_client_n_batch_logprobs_echo(server):
    openai = pytest.importorskip("openai")
    backend, url = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=10)
    out = client.completions.create(model=MODEL, prompt=["ab", "cd"], n=2, max_tokens=2, logprobs=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == ["ba", "ba", "dc", "dc"]
    assert out.choices[0].logprobs.top_logprobs[0] == {"b": -0.25, "c": -1.25}
    echo = client.completions.create(model=MODEL, prompt="ab", echo=True, logprobs=1, max_tokens=0)
    assert echo.choices[0].text == "ab" and echo.choices[0].logprobs.token_logprobs == [None, -0.5, -1.0]
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, n=2, logprobs=True, top_logprobs=2,
                                          presence_penalty=0.5, frequency_penalty=0.5)
    assert len(chat.choices) == 2 and len(chat.choices[1].logprobs.content[0].top_logprobs) == 2
    for chunk in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, n=2, stream=True):
        assert chunk.choices[0].index in (0, 1)  # the canonical loop never meets an empty choices list
