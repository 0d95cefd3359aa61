"""The OpenAI-compatible server over a fake backend, served by a real uvicorn server: streaming,
client disconnects, concurrent requests, and the official `openai` client."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from api_utils import (  # noqa: F401 (backend, live, server: fixtures)
    API_KEY, CHAT, MODEL, backend, expected_text, live, metric_value, server, sse_events, wait_until,
)
from fake_backend import serve_in_thread
from tetriinfer.server.app import create_app

# ---- a real server: streaming, disconnects ------------------------------------------------------
def test_stream_completion_chunks_finish_usage_done(server):
    backend, url = server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 4, "stream": True, "logprobs": 0,
                                                  "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks, finish, usage = events[:-3], events[-3], events[-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "olle"
    assert all(c["choices"][0]["finish_reason"] is None and c["object"] == "text_completion" for c in chunks)
    assert [c["choices"][0]["logprobs"]["token_logprobs"][0] for c in chunks] == [-0.25, -0.5, -0.75, -1.0]
    assert [c["choices"][0]["logprobs"]["text_offset"][0] for c in chunks] == [0, 1, 2, 3]
    assert finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10,
                                                      "prompt_tokens_details": {"cached_tokens": 0}}
    assert len({e["id"] for e in events[:-1]}) == 1


def test_stream_chat_role_first(server):
    backend, url = server
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3, "stream": True})
    events = sse_events(r.text)
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [e["choices"][0]["delta"]["content"] for e in events[1:-2]]
    prompt = backend.started[0].prompt
    assert "".join(contents) == expected_text(backend, prompt, 3) and len(contents) == 3
    assert events[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length",
                                        "stop_reason": None}
    # no stream_options.include_usage: no usage chunk, and no chunk without choices (as OpenAI)
    assert all(e["choices"] and "usage" not in e for e in events[:-1]) and events[-1] == "[DONE]"


def test_stream_backend_error_event_then_done(server):
    backend, url = server
    backend.fail_after = 2
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 5, "stream": True})
    events = sse_events(r.text)
    assert [e["choices"][0]["text"] for e in events[:2]] == ["o", "l"]
    assert events[2] == {"error": {"message": "fake backend failure", "type": "server_error", "param": None,
                                   "code": None}}
    assert events[3:] == ["[DONE]"]


def test_client_disconnect_mid_stream_aborts(server):
    backend, url = server
    backend.delay_s = 0.05
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", f"{url}/v1/completions",
                           json={"prompt": "hello", "max_tokens": 100, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["text"] == "o"
        # leaving the block closes the connection mid-stream
    request_id = backend.started[0].request_id
    wait_until(lambda: request_id in backend.aborted)
    assert request_id in backend.closed  # the backend's stream was closed too
    wait_until(lambda: metric_value(httpx.get(f"{url}/metrics").text, "tetriinfer_requests_running") == 0)
    text = httpx.get(f"{url}/metrics").text
    assert metric_value(text, 'tetriinfer_requests_total{outcome="aborted"}') >= 1


def test_client_disconnect_mid_request_aborts(server):
    backend, url = server
    backend.delay_s = 0.05
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 100}, timeout=0.3)
    wait_until(lambda: len(backend.aborted) == 1)
    assert backend.aborted == [backend.started[0].request_id]


def test_concurrent_requests_each_get_their_own_output(server):
    backend, url = server
    backend.delay_s = 0.01
    prompts = [f"prompt number {i}" for i in range(8)]

    async def one(client: httpx.AsyncClient, i: int) -> str:
        body = {"prompt": prompts[i], "max_tokens": 6, "stream": i % 2 == 0}
        r = await client.post(f"{url}/v1/completions", json=body)
        if body["stream"]:
            return "".join(e["choices"][0]["text"] for e in sse_events(r.text)[:-1] if e["choices"])
        return r.json()["choices"][0]["text"]

    async def run_all() -> list[str]:
        async with httpx.AsyncClient(timeout=10) as client:
            return await asyncio.gather(*(one(client, i) for i in range(len(prompts))))

    assert asyncio.run(run_all()) == [expected_text(backend, p, 6) for p in prompts]
    assert backend.aborted == []


def test_non_finite_logprob_stays_valid_json():
    from tetriinfer.server import responses

    assert responses.chat_logprobs(["a"], [float("-inf")])["content"][0]["logprob"] == -9999.0
    assert responses.completion_logprobs(["a", "b"], [float("-inf"), -1.0], 0)["token_logprobs"] == [-9999.0, -1.0]


# ---- the official openai client against the real server -----------------------------------------
def _client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=10)


def test_openai_client_completions_chat_models(server):
    backend, url = server
    client = _client(url)
    out = client.completions.create(model=MODEL, prompt="hello", max_tokens=5, temperature=0, seed=1)
    assert out.choices[0].text == "olleh" and out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens == 6 + 5
    assert backend.started[-1].sampling.temperature == 0
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, logprobs=True,
                                          extra_body={"top_k": 4, "ignore_eos": True})
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == expected_text(backend, backend.started[-1].prompt, 3)
    assert [c.logprob for c in chat.choices[0].logprobs.content] == [-0.25, -0.5, -0.75]
    assert backend.started[-1].sampling.top_k == 4 and backend.started[-1].sampling.ignore_eos
    assert [m.id for m in client.models.list()] == [MODEL]


def test_openai_client_streaming(server):
    backend, url = server
    client = _client(url)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(backend, backend.started[-1].prompt, 4)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    # the canonical loop: every chunk has a choice when usage is not asked for
    text = ""
    for chunk in client.completions.create(model=MODEL, prompt="hello", max_tokens=3, stream=True):
        text += chunk.choices[0].text
    assert text == "oll"
    text = ""
    for chunk in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, stream=True):
        text += chunk.choices[0].delta.content or ""
    assert text == expected_text(backend, backend.started[-1].prompt, 3)


def test_openai_client_errors(server):
    backend, url = server
    client = _client(url)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128"):
        client.completions.create(model=MODEL, prompt="x" * 100, max_tokens=100)
    backend.fail_after = 1
    with pytest.raises(openai.InternalServerError, match="fake backend failure"):
        client.completions.create(model=MODEL, prompt="hello", max_tokens=5)
    stream = client.completions.create(model=MODEL, prompt="hello", max_tokens=5, stream=True)
    with pytest.raises(openai.APIError, match="fake backend failure"):
        for _ in stream:
            pass


def test_openai_client_api_key(backend):
    url, stop = serve_in_thread(create_app(backend, api_key=API_KEY))
    try:
        for key in ("wrong", API_KEY + "x"):
            with pytest.raises(openai.AuthenticationError):
                _client(url, key).completions.create(model=MODEL, prompt="hi", max_tokens=1)
        out = _client(url, API_KEY).completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert out.choices[0].text == "ih"
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        stop()


def test_disconnect_aborts_under_asgi_spec_2_4(backend):
    """Starlette stops listening for disconnects at ASGI spec 2.4; our stream must still notice."""
    app = create_app(backend)

    async def spec_2_4(scope, receive, send):
        scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": "2.4"}}
        await app(scope, receive, send)

    backend.delay_s = 1.0  # no token is written while the client leaves
    url, stop = serve_in_thread(spec_2_4)
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions",
                          json={"messages": CHAT, "max_tokens": 50, "stream": True}, timeout=10) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
        request_id = backend.started[0].request_id
        wait_until(lambda: request_id in backend.aborted, timeout_s=0.9)
    finally:
        stop()
