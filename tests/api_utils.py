"""Helpers and fixtures of the API tests (`test_server_*.py`): in-process calls through httpx's ASGI
transport, a real uvicorn server over the fake backend, SSE and /metrics parsing."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from fake_backend import FakeBackend, serve_in_thread
from tetriinfer.bench.server_process import parse_metrics
from tetriinfer.server.app import create_app

MODEL = "fake-model"
API_KEY = "sk-test-key"
CHAT = [{"role": "user", "content": "hi"}]


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    """One request to `app` in-process (httpx's ASGI transport)."""

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def sse_events(text: str) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded except [DONE]."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def metric_value(text: str, sample: str) -> float:
    samples = parse_metrics(text)
    if sample not in samples:
        raise AssertionError(f"{sample} not in /metrics")
    return samples[sample]


def expected_text(backend: FakeBackend, prompt: str, max_tokens: int) -> str:
    ids = backend.tokenizer.encode(prompt)
    return backend.tokenizer.decode(backend.continuation(ids, max_tokens))


def hide_xgrammar(monkeypatch) -> None:
    """Imports of xgrammar fail, as on an install without the `structured` extra."""
    import builtins

    real_import = builtins.__import__

    def no_xgrammar(name, *args, **kwargs):
        if name == "xgrammar":
            raise ImportError("No module named 'xgrammar'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_xgrammar)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def app(backend):
    return create_app(backend)


@pytest.fixture(scope="module")
def live():
    """One uvicorn server for the module; each test gets the backend reset to defaults."""
    backend = FakeBackend()
    base_url, stop = serve_in_thread(create_app(backend))
    yield backend, base_url
    stop()


@pytest.fixture
def server(live):
    backend, base_url = live
    fresh = FakeBackend()
    for name in ("delay_s", "fail_after", "fail_with", "abort_delay_s", "aborts_begun", "error_message", "is_healthy", "stats", "script"):
        setattr(backend, name, getattr(fresh, name))
    backend.started.clear()
    backend.aborted.clear()
    backend.closed.clear()
    return backend, base_url
