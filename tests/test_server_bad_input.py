"""Hostile or broken requests found by probing `tetriinfer serve`: each gets a 4xx (or a 503) with an
OpenAI error body before anything reaches the backend or streams, and none stalls other requests.
Against the in-process app over the fake backend, except where a real socket matters."""

from __future__ import annotations

import argparse
import asyncio
import re
import threading
import time

import httpx
import pytest

from fake_backend import FakeBackend, serve_in_thread
from api_utils import CHAT, app, backend, call, sse_events  # noqa: F401 (app, backend: fixtures)
from tetriinfer.server.app import create_app
from tetriinfer.server.limits import ServerLimits

JSON = {"content-type": "application/json"}
INT64_MAX = 2**63 - 1


def post_raw(app, path: str, body: str | bytes, headers: dict | None = None) -> httpx.Response:
    return call(app, "POST", path, content=body, headers=JSON if headers is None else headers)


def assert_error(r: httpx.Response, status: int, words: str = "", param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert words in error["message"]
    if param != "any":
        assert error["param"] == param
    return error


# ---- 1. nesting ----------------------------------------------------------------------------------
DEEP = 100_000


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", "[" * DEEP + "]" * DEEP),
    ("/v1/completions", '{"prompt": ' + "[" * DEEP + "]" * DEEP + "}"),
    ("/v1/completions", '{"prompt": ' + "[" * 500 + "1" + "]" * 500 + "}"),  # parses, then too deep to check
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": ' + "[" * 900 + "]" * 900 + "}]}"),
    ("/v1/completions", '{"prompt": "hi", "ignored": ' + '{"a": ' * 900 + "1" + "}" * 900 + "}"),
], ids=["top-level-list", "prompt-100k", "prompt-500", "content-900", "ignored-field-900"])
def test_a_deeply_nested_body_is_a_400_not_a_recursion_500(app, backend, path, body):
    assert_error(post_raw(app, path, body), 400, "nested too deeply")
    assert backend.started == []


# ---- 2. lone surrogates --------------------------------------------------------------------------
@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", r'{"prompt": "hi \ud800 there"}', "prompt"),
    ("/v1/completions", r'{"prompt": ["\udfff"]}', "prompt.0"),
    ("/v1/completions", r'{"prompt": "hi", "stop": ["\ud800"]}', "stop.0"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "\ud800"}]}', "messages.0.content"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}',
     "messages.0.content.0.text"),
    ("/v1/chat/completions", r'{"messages": [{"role": "\ud800", "content": "hi"}]}', "messages.0.role"),
], ids=lambda v: v if isinstance(v, str) and not v.startswith(("/", "{")) else "")
def test_a_lone_surrogate_is_a_400_not_a_tokenizer_500(app, backend, path, body, param):
    assert_error(post_raw(app, path, body), 400, "surrogate", param)
    assert backend.started == []


def test_a_surrogate_pair_escape_is_fine(app, backend):
    r = post_raw(app, "/v1/completions", r'{"prompt": "\ud83d\ude00", "max_tokens": 2}')
    assert r.status_code == 200, r.text
    assert backend.started[0].prompt == "\U0001F600"


# ---- 3. integers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("field, value, words", [
    ("seed", 2**70, "64 bits"),
    ("seed", -(2**63) - 1, "64 bits"),
    ("top_k", 2**70, "64 bits"),
    ("top_k", -2, "top_k"),
    ("max_tokens", 2**64, "64 bits"),
    ("min_tokens", 2**63, "64 bits"),
    ("logprobs", 2**70, "64 bits"),
    ("logprobs", 21, "logprobs must be >= 0 and at most 20"),
])
def test_an_out_of_range_integer_is_a_400_before_anything_streams(app, backend, field, value, words, stream):
    r = call(app, "POST", "/v1/completions", json={"prompt": "hi", field: value, "stream": stream})
    assert_error(r, 400, words, field)
    assert backend.started == []


def test_integers_at_the_int64_edges_and_any_top_k_are_fine(app, backend):
    for seed, top_k in ((INT64_MAX, INT64_MAX), (-(2**63), -1), (0, 10**6)):
        r = call(app, "POST", "/v1/completions", json={"prompt": "hi", "seed": seed, "top_k": top_k, "max_tokens": 2})
        assert r.status_code == 200, r.text
    assert [s.sampling.seed for s in backend.started] == [INT64_MAX, -(2**63), 0]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "stop_token_ids": [2**64]}, "stop_token_ids.0"),
    ({"prompt": "hi", "stop_token_ids": [259]}, "stop_token_ids"),
    ({"prompt": [1, 2**70]}, "prompt.1"),
    ({"prompt": "hi", "n": 2**80}, "n"),
])
def test_token_ids_and_other_integers_out_of_range_are_a_400(app, backend, body, param):
    assert_error(call(app, "POST", "/v1/completions", json=body), 400, param=param)
    assert backend.started == []


# ---- 4. floats -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fragment, param", [
    ('"temperature": NaN', "temperature"),
    ('"temperature": Infinity', "temperature"),
    ('"temperature": -Infinity', "temperature"),
    ('"temperature": 1e999', "temperature"),
    ('"top_p": NaN', "top_p"),
    ('"presence_penalty": NaN', "presence_penalty"),
    ('"logit_bias": {"5": Infinity}', "logit_bias.5"),
    ('"some_extension": [1, NaN]', "some_extension.1"),
])
def test_a_nan_temperature_is_a_400_not_garbage(app, backend, fragment, param):
    assert_error(post_raw(app, "/v1/completions", '{"prompt": "hi", ' + fragment + "}"), 400, "finite", param)
    assert backend.started == []


@pytest.mark.parametrize("body, param, words", [
    ({"top_p": 1e-50}, "top_p", "top_p must be > 0"),
    ({"top_p": 5e-46}, "top_p", "float32"),
    ({"temperature": 1e39}, "temperature", "float32"),
])
def test_floats_the_sampler_sees_as_zero_or_infinity_are_a_400(app, backend, body, param, words):
    assert_error(call(app, "POST", "/v1/completions", json={"prompt": "hi", **body}), 400, words, param)
    assert backend.started == []


def test_a_tiny_top_p_that_float32_keeps_is_fine(app, backend):
    assert call(app, "POST", "/v1/completions", json={"prompt": "hi", "top_p": 1e-40}).status_code == 200


# ---- 5. sizes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_over_the_size_limit_is_a_413_before_it_is_all_read(app, backend, declared):
    sent = []

    async def chunks():  # 50 MiB, 1 MiB at a time
        for _ in range(50):
            sent.append(1)
            yield b" " * 2**20

    headers = {**JSON, "content-length": str(50 * 2**20)} if declared else JSON
    assert_error(post_raw(app, "/v1/completions", chunks(), headers), 413, "8388608 bytes")
    assert len(sent) == (0 if declared else 9)  # not one byte read; cut off once past 8 MiB
    assert backend.started == []


def test_the_size_limit_is_configurable(backend):
    app = create_app(backend, limits=ServerLimits(max_body_bytes=4096))
    assert_error(post_raw(app, "/v1/completions", b" " * 4097), 413, "4096 bytes")
    ok = b'{"prompt": "hi", "max_tokens": 1}'.ljust(4096)
    assert post_raw(app, "/v1/completions", ok).status_code == 200


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/completions", {"prompt": "hi", "stop": ["s"] * 17}, "stop", "at most 16"),
    ("/v1/completions", {"prompt": "hi", "stop": "s" * 1025}, "stop", "at most 1024 characters"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [1] * 1025}, "stop_token_ids", "at most 1024"),
    ("/v1/chat/completions", {"messages": CHAT * 4097}, "messages", "at most 4096"),
])
def test_lists_beyond_their_caps_are_a_400(app, backend, path, body, param, words):
    assert_error(call(app, "POST", path, json=body), 400, words, param)
    assert backend.started == []


def test_a_big_body_does_not_stall_a_concurrent_stream():
    """A 50 MB body (413 from its Content-Length) and a 7 MB one (read, parsed and tokenized off the
    event loop, then refused: too long) while a stream sends a token every 20 ms."""
    backend = FakeBackend(delay_s=0.02)
    url, stop = serve_in_thread(create_app(backend))
    gaps, answers = [], {}

    def stream() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 100,
                                                                  "stream": True}, timeout=30) as r:
            last = time.monotonic()
            for _ in r.iter_lines():
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

    def post(name: str, size: int) -> None:
        body = b'{"prompt": "' + b"x" * size + b'"}'
        start = time.monotonic()
        try:
            answers[name] = httpx.post(f"{url}/v1/completions", content=body, headers=JSON, timeout=30).status_code
        except httpx.TransportError as e:  # the server may close before the client has sent it all
            answers[name] = type(e).__name__
        answers[name + "_s"] = time.monotonic() - start

    try:
        streamer = threading.Thread(target=stream)
        streamer.start()
        time.sleep(0.2)
        for name, size in (("huge", 50 * 2**20), ("big", 7 * 2**20)):
            post(name, size)
        streamer.join(30)
    finally:
        stop()
    assert answers["huge"] in (413, "WriteError", "RemoteProtocolError") and answers["huge_s"] < 5
    assert answers["big"] == 400 and answers["big_s"] < 10
    assert len(gaps) > 100 and max(gaps) < 1.5, max(gaps)  # was 2.7 s here, 11.5 s with a real tokenizer


# ---- 6. content type -----------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_a_non_json_content_type_is_a_415(app, backend, content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    for path, body in (("/v1/completions", '{"prompt": "hi"}'), ("/v1/chat/completions", '{"messages": []}')):
        assert_error(post_raw(app, path, body, headers), 415, "application/json")
    assert backend.started == []


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON",
                                          "application/json;charset=UTF-8"])
def test_json_content_types_with_parameters_are_accepted(app, content_type):
    r = post_raw(app, "/v1/completions", '{"prompt": "hi", "max_tokens": 1}', {"content-type": content_type})
    assert r.status_code == 200, r.text


# ---- 7. the cluster cannot take the request now --------------------------------------------------
@pytest.mark.parametrize("message", ["no prefill instance is available", "the cluster is still starting"])
@pytest.mark.parametrize("stream", [False, True])
def test_no_prefill_instance_is_a_503_with_retry_after(app, backend, message, stream):
    backend.fail_after, backend.error_message = 0, message
    r = call(app, "POST", "/v1/completions", json={"prompt": "hi", "stream": stream})
    assert_error(r, 503, message)
    assert int(r.headers["retry-after"]) >= 1
    r = call(app, "POST", "/v1/chat/completions", json={"messages": CHAT, "stream": stream})
    assert_error(r, 503, message)


def test_other_backend_errors_stay_500_and_a_failure_after_output_stays_an_event(app, backend):
    backend.fail_after = 0
    assert_error(call(app, "POST", "/v1/completions", json={"prompt": "hi", "stream": True}), 500,
                 "fake backend failure")
    backend.fail_after = 1
    r = call(app, "POST", "/v1/completions", json={"prompt": "hi", "stream": True})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[1]["error"]["message"] == "fake backend failure" and events[-1] == "[DONE]"


# ---- 8. the API key on the command line ----------------------------------------------------------
def test_api_key_help_warns_that_ps_shows_the_flag(capsys):
    from tetriinfer.entrypoints.serve import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "TETRIINFER_API_KEY" in help_text and re.search(r"\bvisible\b.*\bps\b", help_text)


def test_the_openai_client_still_gets_through(app):
    """The official client sends application/json; so does httpx's json=."""
    import openai

    client = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0,
                                http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app)))
    out = asyncio.run(client.completions.create(model="fake-model", prompt="hello", max_tokens=3))
    assert out.choices[0].text == "oll"


# ---- vLLM extensions that would change the output --------------------------------------------------
@pytest.mark.parametrize("path, field, value", [
    ("/v1/completions", "use_beam_search", True),
    ("/v1/chat/completions", "use_beam_search", True),
])
def test_a_vllm_extension_the_server_would_silently_ignore_is_a_400_naming_it(app, backend, path, field, value):
    body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT}
    assert_error(call(app, "POST", path, json={**body, field: value}), 400, f"'{field}' is not supported", param=field)
    assert backend.started == []


def test_vllm_extensions_at_their_no_op_values_and_unknown_fields_are_accepted(app, backend):
    body = {"prompt": "hi", "max_tokens": 2, "min_p": 0.0, "truncate_prompt_tokens": None, "bad_words": [],
            "allowed_token_ids": [], "prompt_logprobs": None,
            "use_beam_search": False, "skip_special_tokens": False, "chat_template_kwargs": {"enable_thinking": False},
            "some_future_field": 1}
    r = call(app, "POST", "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert len(backend.started) == 1
    s = backend.started[0].sampling
    assert (s.allowed_token_ids, s.bad_words, s.prompt_logprobs) == (None, [], None)
    assert "prompt_logprobs" not in r.json()["choices"][0]
